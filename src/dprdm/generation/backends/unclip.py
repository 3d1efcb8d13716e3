"""Stable unCLIP (img2img, ``image_embeds``) as a backend; a full CLIP checkpoint is its encoder.

Owns loading a ``StableUnCLIPImg2ImgPipeline`` folder (local files only) plus the CLIP checkpoint
whose vision tower IS the pipeline's ``image_encoder`` (``-small``: openai/clip-vit-large-patch14,
768-d, the original RDM family; full: laion/CLIP-ViT-H-14-laion2B-s32B-b79K, 1024-d). The
checkpoint's text tower puts the prompt into the image space (the query x); its vision tower embeds
private and public images. The two vision towers must have the same fingerprint, else loading is
refused: text and images would not share the space the decoder reads.

* the release replaces ``image_embeds`` (the prompt still goes to the text encoder as usual);
* scale -- raw CLIP image embeddings, whose expected norm comes from the pipeline's PUBLIC
  ``StableUnCLIPImageNormalizer`` statistics: ``sqrt(|mean|^2 + |std|^2)``;
* ``noise_level`` (default 0) is the pipeline's own augmentation of the embedding; the negative
  is the pipeline's (zeros).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dprdm.generation.backends.base import (BackendLoadError, CLIPEncoderMethods, GeneratorBackend,
                                            RuntimeOptions, clip_vision_space, load_pipeline,
                                            place_pipeline, require_layout)

REPOS = {"small": "stabilityai/stable-diffusion-2-1-unclip-small",
         "full": "stabilityai/stable-diffusion-2-1-unclip"}
CLIP_REPOS = {"small": "openai/clip-vit-large-patch14",
              "full": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
LAYOUT = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "image_encoder",
          "image_normalizer", "image_noising_scheduler", "scheduler")
CLIP_LAYOUT = ("config.json",)


class StableUnCLIPBackend(CLIPEncoderMethods, GeneratorBackend):
    """Stable unCLIP 2.1 (small or full) driven by CLIP image embeddings."""

    name = "stable-unclip"

    def __init__(self, pipe, encoder, options: RuntimeOptions, *, noise_level: int = 0,
                 height: int = 768, width: int = 768) -> None:
        self.pipe, self.encoder, self.options = pipe, encoder, options
        self.noise_level, self.height, self.width = int(noise_level), height, width
        self.space = clip_vision_space(encoder.model, "clip")
        tower = clip_vision_space(pipe.image_encoder, "clip")
        if tower.fingerprint != self.space.fingerprint:
            raise BackendLoadError(
                f"the CLIP checkpoint {encoder.source} is not the unCLIP pipeline's image encoder "
                f"({tower.family}): pass the CLIP model it was built on "
                f"({' or '.join(CLIP_REPOS.values())})")
        normaliser = pipe.image_normalizer
        self.raw_norm = float(torch.sqrt((normaliser.mean.detach().float() ** 2).sum()
                                         + (normaliser.std.detach().float() ** 2).sum()))

    @classmethod
    def load(cls, model_dir: str | os.PathLike, encoder_dir: str | os.PathLike,
             options: RuntimeOptions | None = None, **kwargs) -> StableUnCLIPBackend:
        from diffusers import StableUnCLIPImg2ImgPipeline

        from dprdm.encoders.clip import ClipEncoder

        options = options or RuntimeOptions()
        repo = " or ".join(REPOS.values())
        root = require_layout(model_dir, "Stable unCLIP", repo, LAYOUT)
        clip_root = require_layout(encoder_dir, "CLIP (the unCLIP image tower, with its text "
                                   "tower)", " or ".join(CLIP_REPOS.values()), CLIP_LAYOUT)
        encoder = ClipEncoder.from_pretrained(clip_root, device=options.device)
        pipe = load_pipeline(StableUnCLIPImg2ImgPipeline, root, "Stable unCLIP pipeline", options)
        return cls(place_pipeline(pipe, options), encoder, options, **kwargs)

    @property
    def pipeline(self):
        return self.pipe

    def model_inputs(self, conditions, prompts, n, guidance, steps) -> dict:
        raw = np.repeat(self.to_model_scale(conditions), n, axis=0)
        prompts = list(prompts) if prompts is not None else [""] * len(conditions)
        return {"prompt": [p for p in prompts for _ in range(n)],
                "image_embeds": torch.from_numpy(raw).to(self.options.device,
                                                         self.options.torch_dtype),
                "noise_level": self.noise_level, "num_inference_steps": int(steps),
                "guidance_scale": float(guidance), "height": self.height, "width": self.width}
