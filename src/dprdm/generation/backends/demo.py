"""The demo backend: dprdm's own encoder + :class:`RetrievalDiffusionPipeline` as a backend.

Owns the adapter that lets the shipped 32x32 emoji model (or any dprdm :class:`Encoder` paired
with a pipeline of the same call) stand behind the :class:`GeneratorBackend` interface. Its space
is the encoder's (64-d for the shipped demo encoder); the denoiser L2-normalises its conditions
itself, so :meth:`to_model_scale` is the identity; prompts are embedded with the encoder's text
tower, images with its image tower, exactly as before backends existed.

Split guidance (``content_guidance``, docs/generator.md): the prompts' own text embeddings are
the content conditions, so the pull towards the prompt and the pull towards the retrieved style
get their own scales. Only this backend has it (the pipeline is dprdm's own). A pipeline that
records the content guidance it was chosen at (``content_guidance`` in its ``model_index.json``,
the shipped generator's) gets it when the caller gives none; equal guidance and content guidance
are plain classifier-free guidance. Likewise ``public_lam``: the mix of a prompt's public
neighbours the pipeline was chosen at for public-only generation (:attr:`DemoBackend.public_lam`).
"""

from __future__ import annotations

import numpy as np
import torch

from dprdm.errors import InvalidParameterError
from dprdm.generation.backends.base import (ConditioningSpace, GeneratorBackend, RuntimeOptions,
                                            check_conditions, check_render_args,
                                            clip_vision_space, fingerprint, seeded)


def split_guidance(value: object, generator: str, name: str = "content_guidance"
                   ) -> dict[str, float]:
    """A user's content guidance, checked (`name` is how the user spelled it): {} for None, else
    ``{"content_guidance": float(value)}``. Only the demo backend (dprdm's own pipeline) can
    split its guidance; the value is bounded as a user's guidance is (rdm.MAX_GUIDANCE)."""
    from dprdm.generation.pipeline import check_scale
    from dprdm.rdm import MAX_GUIDANCE

    if value is None:
        return {}
    check_scale(name, value, MAX_GUIDANCE)
    if generator != "demo":
        raise InvalidParameterError(f"{name} needs the demo generator (dprdm's own pipeline), "
                                    f"not {generator}")
    return {"content_guidance": float(value)}


def recorded_content_guidance(pipeline) -> float | None:
    """The content guidance `pipeline` records it was chosen at (its config's
    ``content_guidance``), or None: plain classifier-free guidance."""
    config = getattr(pipeline, "config", None)
    value = config.get("content_guidance") if hasattr(config, "get") else None
    return None if value is None else float(value)


def recorded_public_lam(pipeline) -> float | None:
    """The public-only mix `pipeline` records it was chosen at (its config's ``public_lam``), or
    None: public-only generation mixes at the private mix's lam."""
    config = getattr(pipeline, "config", None)
    value = config.get("public_lam") if hasattr(config, "get") else None
    return None if value is None else float(value)


def encoder_space(encoder) -> ConditioningSpace:
    """The space of a dprdm encoder: a CLIP checkpoint's vision tower, or the whole module."""
    from dprdm.encoders.clip import ClipEncoder

    if isinstance(encoder, ClipEncoder):
        return clip_vision_space(encoder.model, "clip")
    described = {k: v for k, v in encoder.describe().items() if k not in ("source", "device")}
    tensors = encoder.state_dict() if isinstance(encoder, torch.nn.Module) else {}
    return ConditioningSpace(f"{encoder.name} ({encoder.dim}-d)", int(encoder.dim),
                             fingerprint(described, tensors))


class DemoBackend(GeneratorBackend):
    """A dprdm encoder + a dprdm generation pipeline (conditions of the encoder's dimension)."""

    name = "demo"

    def __init__(self, encoder, pipeline, options: RuntimeOptions | None = None,
                 content_guidance: float | None = None) -> None:
        self.encoder = encoder
        # None: plain classifier-free guidance; a number: split guidance (the pipeline's
        # `content_guidance`), the prompts' text embeddings being the content conditions.
        # Not given: the one the pipeline records it was chosen at (None if it records none)
        self.content_guidance = (content_guidance if content_guidance is not None
                                 else recorded_content_guidance(pipeline))
        # public-only generation: the mix of public neighbours the pipeline was chosen at
        self.public_lam = recorded_public_lam(pipeline)
        self._pipeline = pipeline
        self.options = options or RuntimeOptions(device="cpu")
        self.space = encoder_space(encoder)
        cond_dim = getattr(pipeline, "cond_dim", encoder.dim)
        if cond_dim != encoder.dim:
            raise InvalidParameterError(f"the generator expects {cond_dim}-d conditions, the "
                                        f"encoder makes {encoder.dim}-d ones")

    @classmethod
    def load(cls, options: RuntimeOptions | None = None, encoder: str | None = None,
             model: str | None = None, content_guidance: float | None = None) -> DemoBackend:
        """A dprdm encoder ('demo' or a CLIP / demo-encoder folder; default the shipped one)
        and a dprdm generation pipeline folder (default the shipped demo generator);
        `content_guidance` as in the constructor."""
        from pathlib import Path

        from dprdm.encoders import load_encoder
        from dprdm.errors import NotFoundError
        from dprdm.generation.pipeline import DEFAULT_DIR, RetrievalDiffusionPipeline

        options = options or RuntimeOptions(device="cpu")
        model_dir = Path(model or DEFAULT_DIR)
        if not (model_dir / "model_index.json").is_file():
            raise NotFoundError(f"no generator pipeline (model_index.json) in {model_dir}")
        pipeline = RetrievalDiffusionPipeline.from_pretrained(str(model_dir)).to(options.device)
        return cls(load_encoder(encoder or "demo", device=options.device), pipeline, options,
                   content_guidance)

    @property
    def pipeline(self):
        return self._pipeline

    def embed_images(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        kwargs = {"batch_size": batch_size} if batch_size is not None else {}
        return self.encoder.encode_images(images, **kwargs)

    def embed_prompts(self, prompts: list[str]) -> np.ndarray:
        return self.encoder.encode_text(list(prompts))

    def to_model_scale(self, conditions: np.ndarray) -> np.ndarray:
        return check_conditions(conditions, self.dim)  # the denoiser normalises them itself

    def model_inputs(self, conditions, prompts, n, guidance, steps,
                     content_guidance: float | None = None) -> dict:
        conditions = self.to_model_scale(conditions)
        inputs = {"conditions": np.repeat(conditions, n, axis=0), "guidance": float(guidance),
                  "steps": int(steps)}
        content_guidance = (self.content_guidance if content_guidance is None
                            else content_guidance)
        if content_guidance is not None:
            if prompts is None or len(prompts) != len(conditions):
                raise InvalidParameterError("content guidance needs one prompt per condition row")
            inputs["content_conditions"] = np.repeat(self.embed_prompts(prompts), n, axis=0)
            inputs["content_guidance"] = float(content_guidance)
        return inputs

    def render(self, conditions: np.ndarray, prompts: list[str] | None = None, n: int = 1,
               guidance: float = 3.0, steps: int = 50, seed: int | None = None,
               content_guidance: float | None = None) -> np.ndarray:
        """As every backend's, plus `content_guidance` (default: the backend's own setting)."""
        conditions = check_conditions(conditions, self.dim)
        check_render_args(n, guidance, steps)
        images = np.asarray(self._pipeline(**self.model_inputs(conditions, prompts, n, guidance,
                                                                steps, content_guidance),
                                           generator=seeded(seed)))
        return images.reshape(len(conditions), n, *images.shape[1:])
