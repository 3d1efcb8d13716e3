"""The encoder contract every backend meets, and :func:`load_encoder`, which picks the backend.

Owns what "an embedding" means in dprdm: ``float32 (N, dim)`` rows of unit L2 norm, text and
images in ONE space (inner product = cosine similarity), computed in eval mode under
``torch.no_grad`` so that the same input always gives the same output, whatever the batch size
(up to float rounding). :class:`Encoder` validates inputs, batches them, shows a rich progress
bar for large inputs and normalises; a backend only implements the two ``_embed_*_batch`` hooks.

Backends: :mod:`dprdm.encoders.clip` (any Hugging Face CLIP checkpoint on disk) and
:mod:`dprdm.encoders.demo` (the small shipped emoji encoder). :func:`load_encoder` maps a spec --
``"demo"`` or a directory -- to one of them; it never downloads anything.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from dprdm.errors import DprdmError, InvalidParameterError

PROGRESS_MIN_ITEMS = 512  # inputs larger than this get a progress bar (on stderr)
DEFAULT_BATCH_SIZE = 256
DEMO_SPEC = "demo"
DEMO_MODEL_TYPE = "dprdm-demo-encoder"  # config.json "model_type" of our own checkpoints

_stderr = Console(stderr=True)


class EncoderLoadError(DprdmError):
    """An encoder could not be loaded: missing path, unknown checkpoint, unreadable weights."""

    code = "model_unavailable"


# ---------------------------------------------------------------------------------------------
# input validation


def check_texts(texts: object) -> list[str]:
    """A list (or tuple) of strings; a bare string is refused, it is almost always a mistake."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InvalidParameterError(
            f"texts must be a list of strings, got {type(texts).__name__}"
        )
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise InvalidParameterError(f"texts must all be strings; item {bad[0]} is "
                                    f"{type(texts[bad[0]]).__name__}")
    return list(texts)


def check_images(images: object) -> np.ndarray:
    """A ``uint8 (N, H, W, 3)`` array (what :mod:`dprdm.data` loaders produce)."""
    if not isinstance(images, np.ndarray):
        raise InvalidParameterError(
            f"images must be a numpy array, got {type(images).__name__}"
        )
    if images.dtype != np.uint8:
        raise InvalidParameterError(f"images must have dtype uint8 (0-255), got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] < 1 or images.shape[2] < 1:
        raise InvalidParameterError(
            f"images must have shape (N, H, W, 3), got {tuple(images.shape)}"
        )
    return images


def check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (an all-zero row stays zero instead of becoming NaN)."""
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-12)


@contextmanager
def _progress(total: int, label: str, show: bool | None) -> Iterator[Progress | None]:
    if show is None:
        show = total > PROGRESS_MIN_ITEMS
    if not show:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_stderr, transient=True) as progress:
        yield progress


# ---------------------------------------------------------------------------------------------
# the contract


class Encoder(ABC):
    """Text and images -> unit-norm ``float32 (N, dim)`` embeddings in one shared space.

    Subclasses set :attr:`dim` and implement :meth:`_embed_text_batch` and
    :meth:`_embed_image_batch`, which get one already-validated batch and return a
    ``torch.Tensor (B, dim)``; normalising, batching and progress live here.
    """

    dim: int
    name: str = "encoder"
    load_size: int = 224  # the side at which callers should load images for this encoder

    @abstractmethod
    def _embed_text_batch(self, texts: list[str]) -> torch.Tensor: ...

    @abstractmethod
    def _embed_image_batch(self, images: np.ndarray) -> torch.Tensor: ...

    def _torch_modules(self) -> list[torch.nn.Module]:
        """The torch modules to put in eval mode before encoding."""
        return []

    def encode_text(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE, *,
                    progress: bool | None = None) -> np.ndarray:
        """Embed captions/prompts: ``float32 (len(texts), dim)``, unit rows."""
        texts = check_texts(texts)
        return self._run(texts, len(texts), check_batch_size(batch_size), self._embed_text_batch,
                         "encoding texts", progress)

    def encode_images(self, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE, *,
                      progress: bool | None = None) -> np.ndarray:
        """Embed ``uint8 (N, H, W, 3)`` images: ``float32 (N, dim)``, unit rows."""
        images = check_images(images)
        return self._run(images, len(images), check_batch_size(batch_size),
                         self._embed_image_batch, "encoding images", progress)

    def _run(self, items, n: int, batch_size: int, embed, label: str,
             progress: bool | None) -> np.ndarray:
        out = np.empty((n, self.dim), dtype=np.float32)
        for module in self._torch_modules():
            module.eval()
        with torch.no_grad(), _progress(n, label, progress) as bar:
            task = bar.add_task(label, total=n) if bar is not None else None
            for start in range(0, n, batch_size):
                batch = items[start:start + batch_size]
                emb = embed(batch)
                if emb.shape != (len(batch), self.dim):
                    raise DprdmError(f"{type(self).__name__} returned {tuple(emb.shape)}, "
                                     f"expected {(len(batch), self.dim)}")
                out[start:start + len(batch)] = l2_normalise(emb).cpu().numpy()
                if bar is not None:
                    bar.advance(task, len(batch))
        return out

    def describe(self) -> dict[str, object]:
        """A small JSON-able summary for the CLI."""
        return {"encoder": self.name, "dim": self.dim, "load_size": self.load_size}


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' tqdm bar while loading a local checkpoint (a second or two)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# picking a backend


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a path, following a Hugging Face cache layout if given one.

    ``.../models--org--name`` (a hub cache entry) resolves to the snapshot named by
    ``refs/main``, or to its only snapshot.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise EncoderLoadError(f"no encoder at {root}: the path does not exist")
    if not root.is_dir():
        raise EncoderLoadError(f"{root} is not a directory; an encoder is a checkpoint directory")
    snapshots = root / "snapshots"
    if not (root / "config.json").is_file() and snapshots.is_dir():
        ref = root / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        found = sorted(p for p in snapshots.iterdir() if (p / "config.json").is_file())
        if len(found) == 1:
            return found[0]
        raise EncoderLoadError(f"{root} is a hub cache entry with {len(found)} usable snapshots; "
                               "pass the snapshot directory itself")
    return root


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise EncoderLoadError(f"{directory} has no config.json; it is not a model checkpoint")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EncoderLoadError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise EncoderLoadError(f"{path} must hold a JSON object")
    return config


def load_encoder(spec: str | os.PathLike, *, device: str = "cpu") -> Encoder:
    """``"demo"`` -> the shipped demo encoder; a directory -> the backend its config.json names.

    * ``model_type == "dprdm-demo-encoder"`` -> :class:`dprdm.encoders.demo.DemoEncoder`
    * ``model_type == "clip"`` (any Hugging Face CLIP checkpoint) ->
      :class:`dprdm.encoders.clip.ClipEncoder`

    Local files only: nothing is downloaded (see docs/encoders.md to bring CLIP weights).
    """
    if isinstance(spec, str) and spec == DEMO_SPEC:
        from dprdm.encoders.demo import DemoEncoder, shipped_weights_dir

        return DemoEncoder.from_pretrained(shipped_weights_dir(), device=device)
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise InvalidParameterError(f"encoder spec must be 'demo' or a directory, got {spec!r}")
    directory = resolve_model_dir(spec)
    model_type = read_config(directory).get("model_type")
    if model_type == DEMO_MODEL_TYPE:
        from dprdm.encoders.demo import DemoEncoder

        return DemoEncoder.from_pretrained(directory, device=device)
    if model_type == "clip":
        from dprdm.encoders.clip import ClipEncoder

        return ClipEncoder.from_pretrained(directory, device=device)
    raise EncoderLoadError(
        f"{directory}: config.json model_type {model_type!r} is not a supported encoder "
        f"(supported: 'clip', {DEMO_MODEL_TYPE!r}, or the spec 'demo')"
    )
