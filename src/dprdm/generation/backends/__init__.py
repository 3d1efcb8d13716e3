"""Generator backends: public diffusion models driven by a (P, d) condition, no fine-tuning.

Owns the registry that maps a generator name to its backend and the folders it loads from:

=================  ==========================================  =======================================
name               folders (local only)                        the release replaces
=================  ==========================================  =======================================
``demo``           (shipped) or ``encoder`` + ``model``         the demo denoiser's condition
``kandinsky-2.2``  ``model`` = decoder, ``prior`` = prior      ``image_embeds`` of KandinskyV22Pipeline
``stable-unclip``  ``model`` = unCLIP, ``encoder`` = CLIP      ``image_embeds`` of StableUnCLIPImg2Img
``ip-adapter``     ``model`` = SD 1.5/XL, ``adapter`` = file,  ``ip_adapter_image_embeds``
                   ``encoder`` = CLIP
=================  ==========================================  =======================================

The contract (:class:`GeneratorBackend`, :class:`ConditioningSpace`, :class:`RuntimeOptions`) is
in :mod:`.base`; one small module per backend; :class:`GeneratorChoice` (:mod:`.choice`) builds a
backend, or its image tower alone, from the flags every command shares. See docs/backends.md.
"""

from __future__ import annotations

import os

from dprdm.errors import InvalidParameterError
from dprdm.generation.backends.base import (SPACE_FILE, BackendLoadError, ConditioningSpace,
                                            GeneratorBackend, RuntimeOptions, SpaceMismatchError)
from dprdm.generation.backends.choice import GeneratorChoice, ImageTower


def _load_demo(options, encoder=None, model=None, content_guidance=None, **folders):
    from dprdm.generation.backends.demo import DemoBackend

    _no_folders("demo", folders)
    return DemoBackend.load(options, encoder=encoder, model=model,
                            content_guidance=content_guidance)


def _load_kandinsky(options, model=None, prior=None, **settings):
    from dprdm.generation.backends.kandinsky import KandinskyBackend

    return KandinskyBackend.load(model, prior, options, **settings)


def _load_unclip(options, model=None, encoder=None, **settings):
    from dprdm.generation.backends.unclip import StableUnCLIPBackend

    return StableUnCLIPBackend.load(model, encoder, options, **settings)


def _load_ip_adapter(options, model=None, adapter=None, encoder=None, **settings):
    from dprdm.generation.backends.ip_adapter import IPAdapterBackend

    return IPAdapterBackend.load(model, adapter, encoder, options, **settings)


def _no_folders(name: str, folders: dict) -> None:
    given = [key for key, value in folders.items() if value is not None]
    if given:
        raise InvalidParameterError(f"the {name} generator takes no {', '.join(given)}")


LOADERS = {"demo": _load_demo, "kandinsky-2.2": _load_kandinsky,
           "stable-unclip": _load_unclip, "ip-adapter": _load_ip_adapter}
GENERATORS = tuple(LOADERS)


def load_backend(name: str, options: RuntimeOptions | None = None,
                 **folders: str | os.PathLike | None) -> GeneratorBackend:
    """The backend `name` from local folders (``model``, ``prior``, ``encoder``, ``adapter``)
    and backend settings (e.g. ``prior_steps``, ``noise_level``, ``embed_norm``, ``height``)."""
    if name not in LOADERS:
        raise InvalidParameterError(f"unknown generator {name!r}; choose one of "
                                    f"{', '.join(GENERATORS)}")
    return LOADERS[name](options or RuntimeOptions(), **folders)


__all__ = ["GENERATORS", "SPACE_FILE", "BackendLoadError", "ConditioningSpace",
           "GeneratorBackend", "GeneratorChoice", "ImageTower", "RuntimeOptions",
           "SpaceMismatchError", "load_backend"]
