"""The CLIP backend: any Hugging Face CLIP checkpoint already on disk, used as an :class:`Encoder`.

Owns loading ``CLIPModel`` + its tokenizer from a local directory (``local_files_only``: nothing
is downloaded; see docs/encoders.md for bringing weights) and CLIP's image preprocessing, done
here with Pillow + numpy from ``preprocessor_config.json`` so that no torchvision is needed:
resize the shortest edge (bicubic by default), centre crop, scale to [0, 1], normalise by the
checkpoint's mean and std. Embeddings are ``get_text_features`` / ``get_image_features``
(the projected pooled outputs), L2-normalised by :class:`Encoder`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dprdm.encoders.base import (Encoder, EncoderLoadError, quiet_transformers, read_config,
                                 resolve_model_dir)

# The values CLIPImageProcessor uses when preprocessor_config.json says nothing.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS,
                2: Image.Resampling.BILINEAR, 3: Image.Resampling.BICUBIC,
                4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}


@dataclass(frozen=True)
class ClipPreprocessing:
    """CLIPImageProcessor's settings, read from ``preprocessor_config.json``."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = True

    @classmethod
    def from_dir(cls, directory: Path, image_size: int) -> ClipPreprocessing:
        """Settings from the checkpoint; missing file or keys fall back to CLIP's defaults."""
        path = directory / "preprocessor_config.json"
        raw: dict = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as error:
                raise EncoderLoadError(f"{path} is not valid JSON: {error}") from None
        size = raw.get("size", image_size)
        edge = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
        crop = raw.get("crop_size", image_size)
        if isinstance(crop, dict):
            height, width = crop.get("height", image_size), crop.get("width", image_size)
        else:
            height = width = int(crop)
        return cls(int(edge), int(height), int(width),
                   tuple(raw.get("image_mean", OPENAI_CLIP_MEAN)),
                   tuple(raw.get("image_std", OPENAI_CLIP_STD)),
                   int(raw.get("resample", 3)), bool(raw.get("do_resize", True)),
                   bool(raw.get("do_center_crop", True)))

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float (N, 3, crop_height, crop_width), normalised."""
        out = np.empty((len(images), self.crop_height, self.crop_width, 3), dtype=np.float32)
        for i, pixels in enumerate(images):
            image = Image.fromarray(pixels)
            if self.do_resize:
                w, h = image.size
                scale = self.shortest_edge / min(w, h)
                size = (max(1, int(w * scale)), max(1, int(h * scale)))
                if w <= h:
                    size = (self.shortest_edge, size[1])
                else:
                    size = (size[0], self.shortest_edge)
                image = image.resize(size, PIL_RESAMPLE.get(self.resample,
                                                            Image.Resampling.BICUBIC))
            if self.do_center_crop:
                image = _center_crop(image, self.crop_height, self.crop_width)
            elif image.size != (self.crop_width, self.crop_height):
                image = image.resize((self.crop_width, self.crop_height),
                                     Image.Resampling.BICUBIC)
            out[i] = np.asarray(image, dtype=np.float32) / 255.0
        out = (out - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Crop the centre (white-padding first if the image is smaller), as CLIP does."""
    w, h = image.size
    if w < width or h < height:
        canvas = Image.new("RGB", (max(w, width), max(h, height)), (255, 255, 255))
        canvas.paste(image, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        image, (w, h) = canvas, canvas.size
    top, left = int((h - height) / 2.0), int((w - width) / 2.0)
    return image.crop((left, top, left + width, top + height))


def _features(output: object) -> torch.Tensor:
    """transformers 4 returns a tensor, 5 a model output whose pooler_output is projected."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise EncoderLoadError("CLIP model returned no pooled features")
    return pooled


class ClipEncoder(Encoder):
    """A Hugging Face ``CLIPModel`` from a local directory; ``dim`` = its projection_dim."""

    name = "clip"

    def __init__(self, model, tokenizer, preprocessing: ClipPreprocessing, source: str = "",
                 device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        self.source = source
        self.device = device
        self.dim = int(model.config.projection_dim)
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str = "cpu") -> ClipEncoder:
        """Load model, tokenizer and preprocessing settings from `path` (files only)."""
        from transformers import AutoTokenizer, CLIPModel

        directory = resolve_model_dir(path)
        config = read_config(directory)
        if config.get("model_type") != "clip":
            raise EncoderLoadError(f"{directory} is not a CLIP checkpoint "
                                   f"(model_type {config.get('model_type')!r})")
        try:
            with quiet_transformers():
                model = CLIPModel.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as error:
            raise EncoderLoadError(f"cannot load CLIP weights from {directory}: {error}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise EncoderLoadError(f"cannot load the CLIP tokenizer from {directory} (it needs "
                                   f"vocab.json + merges.txt or tokenizer.json): {error}") from None
        image_size = int(model.config.vision_config.image_size)
        return cls(model, tokenizer, ClipPreprocessing.from_dir(directory, image_size),
                   str(directory), device)

    @property
    def load_size(self) -> int:
        return max(self.preprocessing.shortest_edge, self.preprocessing.crop_height,
                   self.preprocessing.crop_width)

    def _embed_text_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()
                 if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**batch))

    def _embed_image_batch(self, images: np.ndarray) -> torch.Tensor:
        pixels = self.preprocessing(images).to(self.device)
        return _features(self.model.get_image_features(pixel_values=pixels))

    def _torch_modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def describe(self) -> dict[str, object]:
        return {"encoder": self.name, "dim": self.dim, "source": self.source,
                "image_size": self.preprocessing.crop_height}
