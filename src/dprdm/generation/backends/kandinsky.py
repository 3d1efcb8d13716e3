"""Kandinsky 2.2 as a backend: the prior folder's CLIP ViT-bigG/14 image tower is the encoder.

Owns loading the two Kandinsky 2.2 folders (local files only) and turning dprdm's conditions into
the decoder's ``image_embeds``:

* space -- the prior folder's ``image_encoder`` (CLIPVisionModelWithProjection, 1280-d for
  ViT-bigG/14); private and public images are embedded with it (``image_processor`` settings);
* the query x -- ``KandinskyV22PriorPipeline(prompt)``: the prior maps the prompt to a RAW image
  embedding (``latents * clip_std + clip_mean``), which dprdm normalises; public and free. Its
  sampler is seeded with ``prior_seed`` (public randomness; nothing private);
* scale -- the decoder was trained on raw image embeddings, whose expected norm is estimated from
  the prior's PUBLIC statistics: ``sqrt(|clip_mean|^2 + |clip_std|^2)``; ``to_model_scale`` keeps
  the direction of c = lam*r + (1-lam)*x and sets that norm (the mix is dprdm's, not the
  pipeline's pixel-space ``interpolate()``);
* the negative -- the prior's embedding of an all-zero image (what the prior pipeline itself
  returns as ``negative_image_embeds``), not a zero vector;
* the decoder -- ``KandinskyV22Pipeline(image_embeds=..., negative_image_embeds=...)``: it sees no
  text, only the condition.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dprdm.generation.backends.base import (GeneratorBackend, RuntimeOptions, check_conditions,
                                            clip_vision_space, load_pipeline, place_pipeline,
                                            require_layout, rescale, unit_rows)

PRIOR_REPO = "kandinsky-community/kandinsky-2-2-prior"
DECODER_REPO = "kandinsky-community/kandinsky-2-2-decoder"
PRIOR_LAYOUT = ("model_index.json", "prior", "image_encoder", "text_encoder", "tokenizer",
                "scheduler")
DECODER_LAYOUT = ("model_index.json", "unet", "movq", "scheduler")
TOWER_LABEL = "kandinsky-2.2 prior image tower"


class KandinskyBackend(GeneratorBackend):
    """Kandinsky 2.2 prior (prompt -> image embedding, image tower) + decoder."""

    name = "kandinsky-2.2"

    def __init__(self, prior, decoder, options: RuntimeOptions, *, prior_steps: int = 25,
                 prior_guidance: float = 4.0, prior_seed: int = 0, height: int = 512,
                 width: int = 512) -> None:
        self.prior, self.decoder, self.options = prior, decoder, options
        self.prior_steps, self.prior_guidance, self.prior_seed = prior_steps, prior_guidance, \
            prior_seed
        self.height, self.width = height, width
        self.space = clip_vision_space(prior.image_encoder, TOWER_LABEL)
        self.preprocessing = preprocessing_of(prior.image_processor, prior.image_encoder)
        statistics = prior.prior
        self.raw_norm = float(torch.sqrt((statistics.clip_mean.detach().float() ** 2).sum()
                                         + (statistics.clip_std.detach().float() ** 2).sum()))
        with torch.no_grad():
            self.negative = prior.get_zero_embed(1).float().cpu().numpy()  # (1, d), raw

    @classmethod
    def load(cls, decoder_dir: str | os.PathLike, prior_dir: str | os.PathLike,
             options: RuntimeOptions | None = None, **kwargs) -> KandinskyBackend:
        from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

        options = options or RuntimeOptions()
        prior_root = require_layout(prior_dir, "Kandinsky 2.2 prior", PRIOR_REPO, PRIOR_LAYOUT)
        decoder_root = require_layout(decoder_dir, "Kandinsky 2.2 decoder", DECODER_REPO,
                                      DECODER_LAYOUT)
        prior = load_pipeline(KandinskyV22PriorPipeline, prior_root, "Kandinsky 2.2 prior",
                              options)
        decoder = load_pipeline(KandinskyV22Pipeline, decoder_root, "Kandinsky 2.2 decoder",
                                options)
        return cls(place_pipeline(prior, options), place_pipeline(decoder, options), options,
                   **kwargs)

    @property
    def pipeline(self):
        return self.decoder

    def embed_images(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        return embed_with_tower(self.prior.image_encoder, self.preprocessing, images,
                                batch_size or max(self.options.batch_size, 32))

    def embed_prompts(self, prompts: list[str]) -> np.ndarray:
        with torch.no_grad():
            output = self.prior(list(prompts), num_inference_steps=self.prior_steps,
                                guidance_scale=self.prior_guidance,
                                generator=torch.Generator().manual_seed(self.prior_seed),
                                output_type="pt")
        return unit_rows(output.image_embeds)

    def to_model_scale(self, conditions: np.ndarray) -> np.ndarray:
        return rescale(check_conditions(conditions, self.dim), self.raw_norm)

    def model_inputs(self, conditions, prompts, n, guidance, steps) -> dict:
        raw = np.repeat(self.to_model_scale(conditions), n, axis=0)
        device, dtype = self.options.device, self.options.torch_dtype
        return {"image_embeds": torch.from_numpy(raw).to(device=device, dtype=dtype),
                "negative_image_embeds": torch.from_numpy(np.repeat(self.negative, len(raw), 0))
                .to(device=device, dtype=dtype),
                "num_inference_steps": int(steps), "guidance_scale": float(guidance),
                "height": self.height, "width": self.width}


def _processor_sizes(processor, image_size: int) -> tuple[int, int, int]:
    """(shortest_edge, crop_height, crop_width) of a CLIPImageProcessor (dict, SizeDict or int)."""
    def field(value, key: str) -> int:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
        found = value.get(key) if hasattr(value, "get") else getattr(value, key, None)
        return int(found) if found else image_size

    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    return field(size, "shortest_edge"), field(crop, "height"), field(crop, "width")


def preprocessing_of(processor, tower):
    """dprdm's CLIP preprocessing with the settings of the prior's ``CLIPImageProcessor``."""
    from dprdm.encoders.clip import ClipPreprocessing

    return ClipPreprocessing(*_processor_sizes(processor, int(tower.config.image_size)),
                             mean=tuple(processor.image_mean), std=tuple(processor.image_std))


def embed_with_tower(tower, preprocessing, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 images -> unit rows of a ``CLIPVisionModelWithProjection``, `batch_size` at a time."""
    from dprdm.encoders.base import check_images

    images = check_images(images)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = preprocessing(images[start:start + batch_size])
            pixels = pixels.to(device=tower.device, dtype=tower.dtype)
            out.append(unit_rows(tower(pixel_values=pixels).image_embeds))
    return np.concatenate(out).astype(np.float32)


class KandinskyImageTower:
    """The prior folder's image tower alone (``image_encoder`` + ``image_processor``), for
    ``dprdm encoders embed``: the same embeddings and space as :class:`KandinskyBackend`."""

    generator = "kandinsky-2.2"

    def __init__(self, tower, processor) -> None:
        self.tower = tower.eval()
        self.preprocessing = preprocessing_of(processor, tower)
        self.space = clip_vision_space(tower, TOWER_LABEL)
        pre = self.preprocessing
        self.load_size = max(pre.shortest_edge, pre.crop_height, pre.crop_width)

    @property
    def dim(self) -> int:
        return self.space.dim

    @classmethod
    def load(cls, prior_dir, options: RuntimeOptions) -> KandinskyImageTower:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from dprdm.generation.backends.base import loading_error

        root = require_layout(prior_dir, "Kandinsky 2.2 prior (its image tower)", PRIOR_REPO,
                              ("image_encoder", "image_processor"))
        try:
            tower = CLIPVisionModelWithProjection.from_pretrained(
                root / "image_encoder", local_files_only=True, dtype=options.torch_dtype)
            processor = CLIPImageProcessor.from_pretrained(root / "image_processor",
                                                           local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
            raise loading_error("Kandinsky 2.2 prior image tower", root, error) from None
        return cls(tower.to(options.device), processor)

    def embed_images(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        return embed_with_tower(self.tower, self.preprocessing, images, batch_size)

    def describe(self) -> dict:
        return {"generator": self.generator, "encoder": TOWER_LABEL,
                "space": self.space.to_dict()}
