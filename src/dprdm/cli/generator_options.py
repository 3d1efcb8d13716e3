"""The generator flags shared by ``generate``, ``serve``, ``eval`` and ``encoders embed``.

Owns the one definition of the options that pick and place a generator backend, and the
decorator that adds them to a command::

    @generator_options
    def generate(..., choice: GeneratorChoice = GENERATOR_CHOICE) -> None:
        backend = choice.load_backend()

==========================  ====================================================================
``--generator NAME``        demo (default), kandinsky-2.2, stable-unclip, ip-adapter
``--model DIR``             the generator folder (demo: a dprdm pipeline; kandinsky-2.2: the
                            decoder; stable-unclip: the unCLIP pipeline; ip-adapter: SD 1.5/XL)
``--prior DIR``             kandinsky-2.2: the prior folder (its image tower is the encoder)
``--encoder DIR``           demo: 'demo' or a CLIP folder; stable-unclip / ip-adapter: the CLIP
                            folder whose vision tower is the image tower
``--adapter FILE``          ip-adapter: the IP-Adapter weight file (non-"plus")
``--device``                auto (CUDA, else MPS, else CPU), cpu, cuda, mps; float16 on CUDA
``--attention-slicing``     diffusers' attention slicing (less memory, a little slower)
``--cpu-offload``           diffusers' model CPU offload (needs `accelerate`)
``--batch-size N``          images per pipeline call
``--image-size PX``         output side (default: the backend's; not for demo)
==========================  ====================================================================

A command gets them all, in this order, after its own options; the decorated function receives
one :class:`~dprdm.generation.backends.GeneratorChoice` (validated: a folder the generator does
not use is refused) in its ``choice`` parameter. Other commands that drive a generator (``dprdm
synthesize``) take the same decorator.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable, get_type_hints

import typer

from dprdm.cli.output import cli_errors

GENERATOR_NAMES = ("demo", "kandinsky-2.2", "stable-unclip", "ip-adapter")

# name -> (annotation, typer option); the order is the order in --help
OPTIONS: dict[str, tuple[Any, Any]] = {
    "generator": (str, typer.Option(
        "demo", "--generator", metavar="NAME", rich_help_panel="Generator",
        help=f"Generator backend: {', '.join(GENERATOR_NAMES)}.")),
    "model": (Path, typer.Option(
        None, "--model", metavar="DIR", rich_help_panel="Generator",
        help="Generator folder: demo pipeline (default: shipped), kandinsky-2.2 decoder, "
             "stable-unclip pipeline, ip-adapter SD 1.5/XL.")),
    "prior": (Path, typer.Option(
        None, "--prior", metavar="DIR", rich_help_panel="Generator",
        help="kandinsky-2.2: the prior folder (its image tower embeds the images).")),
    "encoder": (str, typer.Option(
        None, "--encoder", metavar="DIR", rich_help_panel="Generator",
        help="demo: 'demo' (default) or a CLIP folder; stable-unclip / ip-adapter: the CLIP "
             "folder of the image tower.")),
    "adapter": (Path, typer.Option(
        None, "--adapter", metavar="FILE", rich_help_panel="Generator",
        help="ip-adapter: the IP-Adapter weight file (.safetensors / .bin, non-'plus').")),
    "device": (str, typer.Option(
        "auto", "--device", rich_help_panel="Generator",
        help="auto, cpu, cuda or mps (float16 on CUDA).")),
    "attention_slicing": (bool, typer.Option(
        False, "--attention-slicing", rich_help_panel="Generator",
        help="Attention slicing: less GPU memory, a little slower.")),
    "cpu_offload": (bool, typer.Option(
        False, "--cpu-offload", rich_help_panel="Generator",
        help="Model CPU offload (needs `accelerate`): least GPU memory.")),
    "batch_size": (int, typer.Option(
        8, "--batch-size", metavar="N", rich_help_panel="Generator",
        help="Images per pipeline call.")),
    "image_size": (int, typer.Option(
        None, "--image-size", metavar="PX", rich_help_panel="Generator",
        help="Output side in pixels, a multiple of 8 (default: kandinsky-2.2 512, "
             "stable-unclip 768, ip-adapter the model's; not for demo).")),
}

GENERATOR_CHOICE: Any = None  # the default of a decorated command's `choice` parameter


def choice_from_flags(**flags: Any):
    """A validated GeneratorChoice from the flags (invalid combinations: a clean CLI error)."""
    from dprdm.generation.backends.choice import GeneratorChoice

    return GeneratorChoice(**flags)


def generator_options(command: Callable[..., Any] | None = None, *,
                      exclude: tuple[str, ...] = ()) -> Any:
    """Add the generator flags to a typer command; it receives them as ``choice``.

    ``@generator_options(exclude=("batch_size",))`` leaves some out (they keep their defaults):
    for a command that has its own meaning for one. Invalid flags are reported like any other
    refusal (one JSON error with ``--json``)."""
    if command is None:
        return functools.partial(generator_options, exclude=exclude)
    unknown = set(exclude) - set(OPTIONS)
    if unknown:
        raise TypeError(f"no generator option {sorted(unknown)}")
    names = [name for name in OPTIONS if name not in exclude]
    signature = inspect.signature(command)
    hints = get_type_hints(command)
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in signature.parameters.values() if p.name != "choice"]
    if "choice" not in signature.parameters:
        raise TypeError(f"{command.__name__} needs a `choice` parameter")
    tail = [p for p in own if p.name == "as_json"]  # keep --json last
    own = [p for p in own if p.name != "as_json"]
    added = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               default=OPTIONS[name][1], annotation=OPTIONS[name][0])
             for name in names]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        flags = {name: kwargs.pop(name) for name in names}
        with cli_errors(bool(kwargs.get("as_json"))):
            choice = choice_from_flags(**flags)
        return command(**kwargs, choice=choice)

    wrapper.__signature__ = signature.replace(parameters=own + added + tail)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + added + tail}
    del wrapper.__wrapped__  # typer must read the new signature, not the command's
    return wrapper


def check_content_guidance(value: float | None, generator: str) -> dict[str, float]:
    """``--content-guidance``, checked before anything is loaded or charged: {} when not given,
    else ``{"content_guidance": value}`` (the demo backend's split guidance; other generators
    refuse it)."""
    from dprdm.generation.backends.demo import split_guidance

    return split_guidance(value, generator, "--content-guidance")
