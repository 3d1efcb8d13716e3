"""Which generator to run and where: :class:`GeneratorChoice`, the one place a backend is built
from user-facing settings (CLI flags, the service's config file, the synthesis job).

Owns the mapping from the generator flags every command shares (``--generator``, ``--model``,
``--prior``, ``--encoder``, ``--adapter``, ``--device``, ``--attention-slicing``,
``--cpu-offload``, ``--batch-size``; see :mod:`dprdm.cli.generator_options`) to

* :meth:`GeneratorChoice.load_backend` -- the full :class:`GeneratorBackend` (generate, serve,
  eval, synthesize);
* :meth:`GeneratorChoice.load_image_tower` -- only the backend's image tower (``dprdm encoders
  embed``): Kandinsky's prior ``image_encoder``, the CLIP folder of unCLIP / IP-Adapter, or the
  demo's encoder. Its :class:`ConditioningSpace` is the backend's, so an index embedded with it
  is accepted by the backend and by nothing else.

Which folders each generator takes (a folder given to a generator that does not use it is
refused, so a typo never silently picks another model):

=================  =====================================================================
``demo``           ``--encoder`` ('demo' or a CLIP folder), ``--model`` (a dprdm pipeline)
``kandinsky-2.2``  ``--model`` decoder folder, ``--prior`` prior folder (its image tower)
``stable-unclip``  ``--model`` unCLIP folder, ``--encoder`` CLIP folder (its image tower)
``ip-adapter``     ``--model`` SD 1.5/XL folder, ``--adapter`` file, ``--encoder`` CLIP folder
=================  =====================================================================
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from dprdm.errors import InvalidParameterError
from dprdm.generation.backends.base import ConditioningSpace, GeneratorBackend, RuntimeOptions

USES = {"demo": ("encoder", "model"), "kandinsky-2.2": ("model", "prior"),
        "stable-unclip": ("model", "encoder"), "ip-adapter": ("model", "adapter", "encoder")}
FLAGS = {"model": "--model", "prior": "--prior", "encoder": "--encoder", "adapter": "--adapter"}


@dataclass(frozen=True)
class GeneratorChoice:
    """The generator flags, validated (folders are checked when something is loaded)."""

    generator: str = "demo"
    model: str | None = None
    prior: str | None = None
    encoder: str | None = None
    adapter: str | None = None
    device: str = "auto"
    attention_slicing: bool = False
    cpu_offload: bool = False
    batch_size: int = 8
    image_size: int | None = None  # output side in pixels (None: the backend's default)

    def __post_init__(self) -> None:
        if self.generator not in USES:
            raise InvalidParameterError(f"unknown generator {self.generator!r}; choose one of "
                                        f"{', '.join(USES)}")
        for key in FLAGS:
            value = getattr(self, key)
            object.__setattr__(self, key, None if value in (None, "") else os.fspath(value))
        unused = [FLAGS[key] for key in FLAGS
                  if getattr(self, key) is not None and key not in USES[self.generator]]
        if unused:
            raise InvalidParameterError(
                f"the {self.generator} generator takes no {', '.join(unused)} (it uses "
                f"{', '.join(FLAGS[key] for key in USES[self.generator])})")
        self.runtime()  # validates device and batch size
        if self.image_size is not None:
            size = self.image_size
            if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096 \
                    or size % 8:
                raise InvalidParameterError(f"image size must be a multiple of 8 in [8, 4096], "
                                            f"got {size!r}")
            if self.generator == "demo":
                raise InvalidParameterError("the demo generator renders at its trained size: "
                                            "drop --image-size")

    def runtime(self) -> RuntimeOptions:
        return RuntimeOptions(device=self.device, attention_slicing=self.attention_slicing,
                              cpu_offload=self.cpu_offload, batch_size=self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GeneratorChoice:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidParameterError(f"unknown generator settings: {', '.join(unknown)}")
        return cls(**data)

    def load_backend(self, **settings) -> GeneratorBackend:
        """The backend, from local folders only (`settings`: backend settings such as
        ``height``, ``prior_steps``, ``noise_level``, ``embed_norm``)."""
        from dprdm.generation.backends import load_backend

        folders = {key: getattr(self, key) for key in USES[self.generator]}
        if self.image_size is not None:
            settings = {"height": self.image_size, "width": self.image_size, **settings}
        return load_backend(self.generator, self.runtime(), **folders, **settings)

    def load_image_tower(self) -> ImageTower:
        """Only the backend's image tower (no diffusion model is loaded)."""
        options = self.runtime()
        if self.generator == "kandinsky-2.2":
            from dprdm.generation.backends.kandinsky import KandinskyImageTower

            return KandinskyImageTower.load(self.prior, options)
        if self.generator == "demo":
            from dprdm.encoders import load_encoder
            from dprdm.generation.backends.demo import encoder_space

            encoder = load_encoder(self.encoder or "demo", device=options.device)
            return ImageTower(encoder, encoder_space(encoder), self.generator)
        from dprdm.encoders.clip import ClipEncoder
        from dprdm.generation.backends.base import clip_vision_space, require_layout

        repos = {"stable-unclip": "openai/clip-vit-large-patch14 (small) or "
                 "laion/CLIP-ViT-H-14-laion2B-s32B-b79K (full)",
                 "ip-adapter": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
        root = require_layout(self.encoder, f"CLIP (the {self.generator} image tower)",
                              repos[self.generator], ("config.json",))
        encoder = ClipEncoder.from_pretrained(root, device=options.device)
        return ImageTower(encoder, clip_vision_space(encoder.model, "clip"), self.generator)


class ImageTower:
    """A backend's image tower alone: images -> unit rows in the backend's space."""

    def __init__(self, encoder, space: ConditioningSpace, generator: str) -> None:
        self.encoder, self.space, self.generator = encoder, space, generator

    @property
    def load_size(self) -> int:
        return int(self.encoder.load_size)

    @property
    def dim(self) -> int:
        return self.space.dim

    def embed_images(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        return np.asarray(self.encoder.encode_images(images, batch_size, progress=False),
                          dtype=np.float32)

    def describe(self) -> dict:
        return {"generator": self.generator, "encoder": self.encoder.describe().get("encoder"),
                "space": self.space.to_dict()}


def choice_of(generator: str = "demo", **flags) -> GeneratorChoice:
    """A :class:`GeneratorChoice` from keyword flags (None = not given)."""
    given = {key: value for key, value in flags.items() if value is not None}
    if "model" in given and isinstance(given["model"], Path):
        given["model"] = os.fspath(given["model"])
    return GeneratorChoice(generator=generator, **given)
