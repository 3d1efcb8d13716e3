"""The generation pipeline: conditioning vectors in, uint8 images out.

:class:`RetrievalDiffusionPipeline` composes the :class:`~dprdm.generation.denoiser.LatentDenoiser`,
a diffusers noise scheduler (``DDPMScheduler`` by default; ``DDIMScheduler`` and other schedulers
that accept the same config swap in with ``pipe.scheduler = DDIMScheduler.from_config(...)``)
and the :class:`~dprdm.generation.autoencoder.Autoencoder`, behind one ``__call__``::

    pipe = RetrievalDiffusionPipeline.from_pretrained(DEFAULT_DIR)
    images = pipe(conditions, guidance=3.0, steps=50, generator=torch.Generator().manual_seed(0))

A pipeline may record the content guidance it was chosen at (``content_guidance`` in
``model_index.json``, the shipped demo generator's 6) and the mix of a prompt's PUBLIC neighbours
it was chosen at for public-only generation (``public_lam``, the shipped one's 0.25); the demo
backend uses them when a caller gives none.

``conditions`` are (B, cond_dim) vectors ``c = lam * r + (1 - lam) * x`` (see
:mod:`dprdm.conditioning`); the denoiser L2-normalises them. Guidance is classifier-free against the
learned null condition: ``out = uncond + guidance * (cond - uncond)``; ``guidance == 1`` runs the
conditional branch only and ``guidance == 0`` the unconditional one. Split guidance
(``content_conditions`` + ``content_guidance``, see :meth:`RetrievalDiffusionPipeline.predict`)
gives the pull towards the prompt and the pull towards the condition scales of their own.
A conditioned decoder (``dprdm train --stage decoder``) reads each image's condition too.
Everything random comes from `generator`, so one seed gives the same images every time (on the
same machine and torch build).

Saved like any diffusers pipeline: ``model_index.json`` plus one folder per component
(``config.json`` + ``diffusion_pytorch_model.safetensors``; ``scheduler_config.json``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from dprdm.errors import InvalidParameterError
from dprdm.generation.autoencoder import Autoencoder
from dprdm.generation.denoiser import LatentDenoiser

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "weights" / "demo-generator"


def default_scheduler(prediction_type: str = "v_prediction") -> DDPMScheduler:
    """The training and default sampling schedule: 1000 cosine steps, v-prediction, no clipping.

    ``timestep_spacing="trailing"`` makes short samplers start from pure noise (t = 999).
    """
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction_type, clip_sample=False,
                         timestep_spacing="trailing")


class RetrievalDiffusionPipeline(DiffusionPipeline):
    """Latent diffusion conditioned on retrieval vectors, with classifier-free guidance."""

    model_cpu_offload_seq = "denoiser->autoencoder"

    def __init__(self, autoencoder: Autoencoder, denoiser: LatentDenoiser,
                 scheduler: SchedulerMixin, content_guidance: float | None = None,
                 public_lam: float | None = None) -> None:
        """`content_guidance`: the split guidance this generator was chosen at, saved in
        ``model_index.json``; callers that give none use it (:mod:`dprdm.generation.backends.demo`).
        None: plain classifier-free guidance unless a caller splits it. `public_lam`: the mix
        ``lam * public neighbours + (1 - lam) * text`` it was chosen at for public-only
        generation (None: the private mix's lam is used there too)."""
        super().__init__()
        if content_guidance is not None:
            check_scale("content_guidance", content_guidance)
            content_guidance = float(content_guidance)
        if public_lam is not None:
            from dprdm.conditioning import check_lam

            public_lam = check_lam(public_lam)
        if autoencoder.conditioned and (autoencoder.config.condition_dim
                                        != denoiser.config.cond_dim):
            raise InvalidParameterError("a conditioned decoder must read the denoiser's "
                                        "condition: condition_dim != cond_dim")
        self.register_modules(autoencoder=autoencoder, denoiser=denoiser, scheduler=scheduler)
        self.register_to_config(content_guidance=content_guidance, public_lam=public_lam)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs):
        """Load from a local folder written by ``save_pretrained`` (quietly: no loading bar)."""
        from diffusers.utils import logging as diffusers_logging

        kwargs.setdefault("low_cpu_mem_usage", False)  # no `accelerate` here, and no need
        kwargs.setdefault("dtype", torch.float32)  # shipped weights are stored as float16
        shown = diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        finally:
            if shown:
                diffusers_logging.enable_progress_bar()

    @property
    def cond_dim(self) -> int:
        """Length of the conditioning vectors this generator was trained on."""
        return int(self.denoiser.config.cond_dim)

    @property
    def image_size(self) -> int:
        return int(self.autoencoder.config.sample_size)

    def _conditions(self, conditions: np.ndarray | torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(np.asarray(conditions, dtype=np.float32)
                            if not isinstance(conditions, torch.Tensor) else conditions)
        if c.ndim != 2 or c.shape[1] != self.cond_dim:
            raise InvalidParameterError(
                f"conditions must have shape (B, {self.cond_dim}), got {tuple(c.shape)}")
        if not torch.isfinite(c).all():
            raise InvalidParameterError("conditions contain NaN or infinite values")
        return c.to(device=self.device, dtype=torch.float32)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                guidance: float, content: torch.Tensor | None = None,
                content_guidance: float = 0.0) -> torch.Tensor:
        """One guided model evaluation (what the scheduler steps with).

        With `content` (the prompts' own conditions, e.g. their text embeddings), guidance is
        split in two: ``uncond + content_guidance * (content - uncond) + guidance * (cond -
        content)`` -- the pull towards the prompt and the pull from the prompt towards the
        whole condition (the retrieved style) get their own scales. Equal scales are plain
        classifier-free guidance, and are run as it (two passes, not three).
        """
        null = torch.ones(latents.shape[0], dtype=torch.bool, device=latents.device)
        if content is not None and content_guidance != guidance:
            drop = torch.cat([torch.zeros_like(null), torch.zeros_like(null), null])
            three = self.denoiser(torch.cat([latents] * 3), t, torch.cat([cond, content, cond]),
                                  drop=drop)
            conditional, prompt_only, unconditional = three.chunk(3)
            return (unconditional + content_guidance * (prompt_only - unconditional)
                    + guidance * (conditional - prompt_only))
        if guidance == 1.0:
            return self.denoiser(latents, t, cond)
        if guidance == 0.0:
            return self.denoiser(latents, t, cond, drop=null)
        drop = torch.cat([torch.zeros_like(null), null])
        both = self.denoiser(torch.cat([latents, latents]), t, torch.cat([cond, cond]), drop=drop)
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    @torch.no_grad()
    def __call__(self, conditions: np.ndarray | torch.Tensor, guidance: float = 3.0,
                 steps: int = 50, generator: torch.Generator | None = None,
                 batch_size: int = 64, progress: bool = False,
                 content_conditions: np.ndarray | torch.Tensor | None = None,
                 content_guidance: float | None = None) -> np.ndarray:
        """Generate one image per condition row: uint8 (B, S, S, 3) RGB on white.

        `guidance` >= 0 is the classifier-free guidance scale, `steps` the number of sampler
        steps (1..num_train_timesteps), `generator` the only source of randomness, `batch_size`
        how many images go through the networks at once. `content_conditions` (one row per
        condition) with `content_guidance` >= 0 split the guidance (:meth:`predict`; a third
        denoiser pass per step); give both or neither.
        """
        check_scale("guidance", guidance)
        if content_guidance is not None:
            check_scale("content_guidance", content_guidance)
        if (content_conditions is None) != (content_guidance is None):
            raise InvalidParameterError("give content_conditions and content_guidance together")
        n_train = int(self.scheduler.config.num_train_timesteps)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n_train:
            raise InvalidParameterError(f"steps must be a whole number in [1, {n_train}]")
        cond = self._conditions(conditions)
        content = None
        if content_conditions is not None:
            content = self._conditions(content_conditions)
            if len(content) != len(cond):
                raise InvalidParameterError("give one content condition per condition row")
        self.denoiser.eval()
        self.autoencoder.eval()
        channels = self.denoiser.config.latent_channels
        size = self.denoiser.config.latent_size
        scale = float(self.autoencoder.config.scaling_factor)
        out = []
        bar = self.progress_bar(total=steps * math.ceil(len(cond) / batch_size)) if progress \
            else None
        for start in range(0, len(cond), batch_size):
            chunk = cond[start:start + batch_size]
            latents = torch.randn((len(chunk), channels, size, size), generator=generator,
                                  device=self.device, dtype=torch.float32)
            latents = latents * self.scheduler.init_noise_sigma
            self.scheduler.set_timesteps(steps, device=self.device)
            for t in self.scheduler.timesteps:
                model_input = self.scheduler.scale_model_input(latents, t)
                output = self.predict(model_input, t, chunk, float(guidance),
                                      None if content is None
                                      else content[start:start + batch_size],
                                      float(content_guidance or 0.0))
                latents = self.scheduler.step(output, t, latents, generator=generator).prev_sample
                if bar is not None:
                    bar.update()
            images = self.autoencoder.decode(latents / scale, chunk).clamp(-1, 1)
            out.append(((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        if bar is not None:
            bar.close()
        if not out:
            return np.zeros((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        return torch.cat(out).numpy()


def check_scale(name: str, value: object, maximum: float = math.inf) -> None:
    """A guidance scale: a number (not a bool) in [0, maximum], finite; `name` is how the caller
    spelled it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0 <= value <= maximum):
        bound = "" if math.isinf(maximum) else f" and <= {maximum:g}"
        raise InvalidParameterError(f"{name} must be a finite number >= 0{bound}, got {value!r}")


def export_weights(source: str | Path, destination: str | Path, half: bool = True,
                   training_dir: str | Path | None = None,
                   denoiser_step: int | None = None,
                   content_guidance: float | None = None,
                   public_lam: float | None = None) -> Path:
    """Copy a trained pipeline folder to `destination` for shipping: the same layout, weights
    stored as float16 when `half` (half the bytes; ``from_pretrained`` loads them as float32),
    plus ``training.json`` (each stage's settings and last log line) from `training_dir`
    (default: `source`) when the training run's files are there; `denoiser_step` picks the
    denoiser log line of a snapshot taken before the run went on; `content_guidance` records
    the split guidance the weights were chosen at and `public_lam` their public-only mix
    (default: keep the source's)."""
    import json

    source, destination = Path(source), Path(destination)
    pipe = RetrievalDiffusionPipeline.from_pretrained(
        source, dtype=torch.float16 if half else torch.float32)
    if content_guidance is not None:
        check_scale("content_guidance", content_guidance)
        pipe.register_to_config(content_guidance=float(content_guidance))
    if public_lam is not None:
        from dprdm.conditioning import check_lam

        pipe.register_to_config(public_lam=check_lam(public_lam))
    destination.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(destination)
    for written in [destination / "model_index.json", *destination.glob("*/config.json")]:
        config = json.loads(written.read_text(encoding="utf-8"))
        if config.pop("_name_or_path", None) is not None:  # a local path, meaningless elsewhere
            written.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    runs = Path(training_dir) if training_dir is not None else source
    record = {}
    for stage in ("autoencoder", "denoiser"):
        settings, log = runs / f"{stage}.train.json", runs / f"{stage}.log.jsonl"
        if settings.is_file():
            lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
            if stage == "denoiser" and denoiser_step is not None:
                lines = [line for line in lines if json.loads(line)["step"] <= denoiser_step]
            record[stage] = {"settings": json.loads(settings.read_text(encoding="utf-8")),
                             "last_log": json.loads(lines[-1]) if lines else None}
    if record:
        (destination / "training.json").write_text(json.dumps(record, indent=2) + "\n",
                                                   encoding="utf-8")
    return destination


def load_default(device: str | torch.device = "cpu") -> RetrievalDiffusionPipeline:
    """The shipped demo generator (``dprdm/weights/demo-generator``)."""
    if not (DEFAULT_DIR / "model_index.json").is_file():
        raise InvalidParameterError(f"no generator weights at {DEFAULT_DIR}")
    return RetrievalDiffusionPipeline.from_pretrained(DEFAULT_DIR).to(device)
