"""IP-Adapter (SD 1.5 or SDXL, non-"plus" adapters) as a backend; a full CLIP is its encoder.

Owns loading a Stable Diffusion (1.5 or XL) folder, an IP-Adapter weight file and the CLIP
checkpoint the adapter was trained on (ip-adapter_sd15 / ip-adapter_sdxl_vit-h: ViT-H/14,
1024-d; ip-adapter_sdxl: ViT-bigG/14, 1280-d), all local files only. The CLIP's vision tower
embeds the images, its text tower the prompts (the query x).

* the release replaces ``ip_adapter_image_embeds=[tensor(batch, 1, dim)]``, stacked
  [negative; positive] when guidance is on (the negative is zeros, as diffusers uses for
  non-"plus" adapters); the prompt still reaches the text encoder(s);
* only non-"plus" adapters take a pooled embedding: a "plus" adapter is refused at load;
* scale -- raw CLIP image embeddings; the model ships no statistics, so the norm is the mean raw
  norm of PUBLIC images' embeddings: :meth:`calibrate_norm` with a public image set, or
  ``embed_norm``; by default a fixed synthetic probe set (colour fields and gradients, generated
  here) gives a rough public estimate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from dprdm.generation.backends.base import (BackendLoadError, CLIPEncoderMethods, GeneratorBackend,
                                            RuntimeOptions, check_conditions, clip_vision_space,
                                            load_pipeline, place_pipeline, require_layout)

SD_REPOS = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
ADAPTER_REPO = "h94/IP-Adapter"
CLIP_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
LAYOUT = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def probe_images(size: int = 224, count: int = 16) -> np.ndarray:
    """A fixed, public, synthetic image set: colour fields and linear gradients."""
    rng = np.random.default_rng(20240601)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = ramp[None, :, None] if i % 2 else ramp[:, None, None]
        out[i] = np.clip(a * (1 - t) + b * t, 0, 255).astype(np.uint8)
    return out


class IPAdapterBackend(CLIPEncoderMethods, GeneratorBackend):
    """Stable Diffusion 1.5 / XL + a non-"plus" IP-Adapter, conditioned on CLIP image embeds."""

    name = "ip-adapter"
    # diffusers repeats ip_adapter_image_embeds batch_size * num_images_per_prompt times (one
    # embedding per call, not one per prompt), so each condition row gets its own call.
    rows_per_call = 1

    def __init__(self, pipe, encoder, options: RuntimeOptions, *, embed_norm: float | None = None,
                 height: int | None = None, width: int | None = None) -> None:
        from diffusers.models.embeddings import ImageProjection

        self.pipe, self.encoder, self.options = pipe, encoder, options
        self.height, self.width = height, width
        self.space = clip_vision_space(encoder.model, "clip")
        layers = getattr(getattr(pipe.unet, "encoder_hid_proj", None),
                         "image_projection_layers", None)
        if not layers or len(layers) != 1 or not isinstance(layers[0], ImageProjection):
            raise BackendLoadError("load exactly one non-'plus' IP-Adapter (ip-adapter_sd15, "
                                   "ip-adapter_sdxl, ip-adapter_sdxl_vit-h): 'plus' adapters "
                                   "take patch features, not a pooled embedding")
        adapter_dim = int(layers[0].image_embeds.in_features)
        if adapter_dim != self.space.dim:
            raise BackendLoadError(f"the IP-Adapter takes {adapter_dim}-d image embeddings but "
                                   f"the CLIP checkpoint makes {self.space.dim}-d ones: pass the "
                                   f"CLIP the adapter was trained on")
        self.raw_norm = float(embed_norm) if embed_norm is not None else \
            self.calibrate_norm(probe_images(encoder.load_size))

    @classmethod
    def load(cls, model_dir: str | os.PathLike, adapter_file: str | os.PathLike,
             encoder_dir: str | os.PathLike, options: RuntimeOptions | None = None,
             scale: float = 1.0, **kwargs) -> IPAdapterBackend:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from dprdm.encoders.clip import ClipEncoder

        options = options or RuntimeOptions()
        root = require_layout(model_dir, "Stable Diffusion 1.5 / XL", " or ".join(
            SD_REPOS.values()), LAYOUT)
        adapter = Path(adapter_file).expanduser() if adapter_file else None
        if adapter is None or not adapter.is_file():
            raise BackendLoadError(
                f"no IP-Adapter weight file at {adapter}: on a connected machine run "
                f"`huggingface-cli download {ADAPTER_REPO} models/ip-adapter_sd15.safetensors "
                f"--local-dir DIR` (SDXL: sdxl_models/ip-adapter_sdxl.safetensors)")
        clip_root = require_layout(encoder_dir, "CLIP (the IP-Adapter's image tower, with its "
                                   "text tower)", CLIP_REPO, ("config.json",))
        kind = json.loads((root / "model_index.json").read_text(encoding="utf-8")).get(
            "_class_name", "")
        pipeline_class = StableDiffusionXLPipeline if "XL" in kind else StableDiffusionPipeline
        pipe = load_pipeline(pipeline_class, root, "Stable Diffusion pipeline", options,
                             safety_checker=None, feature_extractor=None, image_encoder=None)
        try:
            pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name,
                                 image_encoder_folder=None, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise BackendLoadError(f"cannot load the IP-Adapter {adapter}: {error}") from None
        pipe.set_ip_adapter_scale(float(scale))
        encoder = ClipEncoder.from_pretrained(clip_root, device=options.device)
        return cls(place_pipeline(pipe, options), encoder, options, **kwargs)

    @property
    def pipeline(self):
        return self.pipe

    def calibrate_norm(self, public_images: np.ndarray) -> float:
        """Set (and return) the raw scale from PUBLIC images: their embeddings' mean raw norm."""
        from dprdm.encoders.base import check_images

        images = check_images(public_images)
        with torch.no_grad():
            raw = self.encoder._embed_image_batch(images).float()
        self.raw_norm = float(raw.norm(dim=-1).mean())
        return self.raw_norm

    def model_inputs(self, conditions, prompts, n, guidance, steps) -> dict:
        conditions = check_conditions(conditions, self.dim)
        if len(conditions) != 1:
            raise ValueError("the IP-Adapter pipeline takes one condition row per call")
        raw = torch.from_numpy(self.to_model_scale(conditions))[:, None]  # (1, 1, d)
        raw = raw.to(self.options.device, self.options.torch_dtype)
        if guidance > 1.0:  # diffusers' classifier-free guidance: [negative; positive]
            raw = torch.cat([torch.zeros_like(raw), raw])
        kwargs = {"prompt": list(prompts) if prompts is not None else [""],
                  "num_images_per_prompt": int(n), "ip_adapter_image_embeds": [raw],
                  "num_inference_steps": int(steps), "guidance_scale": float(guidance)}
        if self.height is not None:
            kwargs["height"], kwargs["width"] = self.height, self.width
        return kwargs
