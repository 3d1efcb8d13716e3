"""Training the generator on PUBLIC images only, stage by stage (``dprdm train --stage ...``).

1. ``autoencoder`` -- the KL-regularised :class:`~dprdm.generation.autoencoder.Autoencoder` on the
   public styles: L1 + edge L1 + a small KL, and the decoder reads the posterior sample plus
   extra Gaussian noise of ``latent_noise`` x the latent std (the KL alone, at a weight that keeps
   reconstructions sharp, leaves the posterior ~1 % of the latent scale; the extra noise is what
   makes near-miss denoiser samples decode cleanly). Half of every batch passes through a random
   style augmentation (:mod:`dprdm.data.styles`), so the decoder can draw what the denoiser will
   be trained to produce. Its scaling factor is set from the latent means of the public images.
2. ``denoiser`` -- the :class:`~dprdm.generation.denoiser.LatentDenoiser` in the frozen
   autoencoder's latent. Every training image belongs to a SOURCE (a public style, or a public style
   passed through one of the generic style augmentations of :mod:`dprdm.data.styles`); its
   condition imitates what generation will receive (:func:`make_conditions`):

   * r = mean of its k nearest neighbours (k drawn per sample) inside ITS OWN source, itself
     excluded, found with the encoder's IMAGE embedding of the target (or, for a share of samples,
     with the TEXT embedding of its caption, the query generation uses; or, for
     ``random_neighbour_share`` of samples, k random images of its source: style without its
     content), + Gaussian noise with a std drawn per sample from U[0, sigma_max] ("DP-RDM adapt");
   * c = lam * r + (1 - lam) * x, x the caption's text embedding, lam ~ U[0, 1] (or, for
     ``text_only_share`` of the images of the public styles as they are, lam = 0: the caption
     alone, the content branch of split guidance, anchored to content-bearing real styles);
   * c is L2-normalised (the pipeline does the same), and replaced by the learned null condition
     for ``cond_dropout`` of the samples (classifier-free guidance).

   Batches draw every image equally often, or (``real_share`` > 0) that share of each batch
   from the public styles as they are and the rest from the restyled sources.

   Embeddings, latents and neighbour lists are computed once and cached under ``OUT/cache``, so a
   step costs one denoiser forward + backward.

3. ``decoder`` -- optional: the decoder of a trained generator (``init_from``) learns to read
   the generation condition too (:func:`train_conditioned_decoder`), from the denoiser's own
   drawings of training images back to the images: what the denoiser draws only faintly (thin
   outlines), the decoder draws where the condition's style asks for it.

Every stage keeps an EMA copy (what is saved with ``save_pretrained``), checkpoint every few minutes
(``OUT/<stage>.state.pt`` holds raw weights, EMA, optimiser and step for ``--resume``), log one JSON
line per logging interval to ``OUT/<stage>.log.jsonl``, write a sample grid
``OUT/<stage>.samples.png``, and stop at ``--steps`` or ``--max-minutes``, whichever comes first.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from dprdm.errors import InvalidParameterError
from dprdm.generation.autoencoder import Autoencoder, edge_l1, kl_divergence
from dprdm.generation.denoiser import LatentDenoiser

STAGES = ("autoencoder", "denoiser", "decoder")
_stderr = Console(stderr=True)


@dataclass
class TrainConfig:
    """Every setting of a training run; saved beside the checkpoints as ``<stage>.train.json``."""

    stage: str = "denoiser"
    data: str = ".dprdm-demo"
    data_is_public: bool = False  # the user's acknowledgement that a plain --data folder is public
    caption_column: str | None = None  # the captions file's text column (default caption/text)
    out: str = ".dprdm-demo/train/generator"
    encoder: str = "demo"
    size: int = 32
    steps: int = 0  # 0: no step limit (then --max-minutes must bound the run)
    max_minutes: float = 0.0  # 0: no time limit
    batch_size: int = 0  # 0: the stage's default (32 autoencoder, 64 denoiser)
    lr: float = 1e-3
    warmup_steps: int = 200
    decay_start: int = 0  # > 0 (with steps > 0): lr falls linearly to 0 from this step to `steps`
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    save_every_minutes: float = 5.0
    log_every: int = 25
    resume: bool = False
    # autoencoder
    kl_weight: float = 1e-4
    edge_weight: float = 1.0
    augment_share: float = 0.5  # share of autoencoder batch images passed through a style aug.
    latent_noise: float = 0.1  # extra N(0, (this * latent std)^2) on decoder inputs
    decoder_only: bool = False  # train the decoder alone (needs init_from): the latent space,
    # its scaling factor and so a denoiser trained on it stay valid
    # denoiser
    k_choices: tuple[int, ...] = (1, 2, 4, 8, 16)
    neighbours: int = 16  # cached neighbours per image (>= max(k_choices))
    text_query_share: float = 0.5  # share of samples whose neighbours are found by caption text
    random_neighbour_share: float = 0.0  # share whose neighbours are random same-source images
    text_only_share: float = 0.0  # share of unrestyled images conditioned on their caption alone
    real_share: float = 0.0  # > 0: this share of every batch from the styles as they are
    sigma_max: float = 0.1
    cond_dropout: float = 0.1
    augment_copies: int = 1  # augmented copies of every public image per style augmentation
    # issue 18: a procedural family of public styles instead of the 7 augmentations
    public_splits: tuple[str, ...] = ()  # demo-root split folders to train on (): every public
    family_size: int = 0  # > 0: sources = the real styles + this many procedural styles
    family_seed: int = 12345
    family_images_per_source: int = 64
    init_from: str = ""  # a pipeline folder whose weights initialise the stage's model
    prediction_type: str = "v_prediction"
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0 turns it off
    input_perturbation: float = 0.0  # extra noise on the denoiser's input only (Ning et al. 2023)
    pixel_loss_weight: float = 0.0  # > 0: L1 of the decoded x0 estimate against the target's
    # conditioned decoder (stage "decoder"; init_from: the generator whose drawings it reads)
    decoder_pairs: int = 8192  # the denoiser's own drawings of training images to learn from
    decoder_clean_share: float = 0.25  # share of samples reading the image's own latent instead
    decoder_pair_starts: tuple[int, ...] = (300, 450, 600, 750)  # timesteps drawn back from
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        if self.stage not in STAGES:
            raise InvalidParameterError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.steps <= 0 and self.max_minutes <= 0:
            raise InvalidParameterError("give --steps or --max-minutes (or both) to bound the run")
        config = copy.deepcopy(self)
        if config.batch_size <= 0:
            config.batch_size = 64 if config.stage == "denoiser" else 32
        if config.lr <= 0:
            raise InvalidParameterError(f"lr must be > 0, got {config.lr}")
        if config.decay_start < 0 or (config.decay_start > 0 and config.decay_start >= config.steps):
            raise InvalidParameterError("decay_start must be 0 or below --steps")
        config.public_splits = tuple(str(p) for p in config.public_splits)
        if config.family_size < 0 or config.family_images_per_source <= config.neighbours:
            raise InvalidParameterError("family_size must be >= 0 and family_images_per_source "
                                        "above neighbours")
        if not 0.0 <= config.real_share <= 1.0:
            raise InvalidParameterError(f"real_share must be in [0, 1], got {config.real_share}")
        if not 0.0 <= config.text_query_share <= 1.0:
            raise InvalidParameterError(f"text_query_share must be in [0, 1], got "
                                        f"{config.text_query_share}")
        if not 0.0 <= config.random_neighbour_share <= 1.0:
            raise InvalidParameterError(f"random_neighbour_share must be in [0, 1], got "
                                        f"{config.random_neighbour_share}")
        if not 0.0 <= config.text_only_share <= 1.0:
            raise InvalidParameterError(f"text_only_share must be in [0, 1], got "
                                        f"{config.text_only_share}")
        if config.decoder_only and (config.stage != "autoencoder" or not config.init_from):
            raise InvalidParameterError("decoder_only trains the decoder of an autoencoder "
                                        "given by init_from (autoencoder stage)")
        if config.stage == "decoder" and not config.init_from:
            raise InvalidParameterError("the decoder stage conditions the decoder of a trained "
                                        "generator: give it with init_from")
        if config.decoder_pairs < 1 or not 0.0 <= config.decoder_clean_share <= 1.0:
            raise InvalidParameterError("decoder_pairs must be >= 1 and decoder_clean_share in "
                                        "[0, 1]")
        config.decoder_pair_starts = tuple(int(t) for t in config.decoder_pair_starts)
        if not config.decoder_pair_starts or not all(
                0 < t < 1000 for t in config.decoder_pair_starts):
            raise InvalidParameterError("decoder_pair_starts must be timesteps in [1, 999]")
        if config.neighbours < max(config.k_choices):
            raise InvalidParameterError("neighbours must be >= max(k_choices)")
        for name in ("min_snr_gamma", "input_perturbation", "pixel_loss_weight"):
            if not getattr(config, name) >= 0:  # also refuses NaN
                raise InvalidParameterError(f"{name} must be >= 0, got {getattr(config, name)}")
        return config


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class PublicImages:
    """Public training images with their caption and source (style) name."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    captions: list[str]
    sources: list[str]


def load_public(data: str | Path, size: int, data_is_public: bool = False,
                caption_column: str | None = None,
                splits: Sequence[str] | None = None) -> PublicImages:
    """The PUBLIC images under `data`, never anything else.

    `data` is a demo root (``data/manifest.json``, written by the tool that built the demo, names
    each split's role; only splits whose role is ``public`` are read) or one folder with a
    captions file (its ``style`` column, else the folder name, is the source). Nothing can tell a
    plain folder's images apart from private ones, so a folder is refused unless the user
    acknowledged it as public (`data_is_public`, ``--data-is-public``).

    In a demo root, `splits` names the public splits to read, by name (``twemoji``) or folder
    (``data/twemoji``), each of which must be public in the manifest; by default (None or empty)
    those of :data:`dprdm.data.emoji.DEMO_PUBLIC_SPLITS` (Twemoji + Noto) that the manifest
    lists, so that public splits added later (Fluent, EmojiOne) change nothing until named.
    """
    from dprdm.data import load_folder
    from dprdm.data.emoji import DEMO_PUBLIC_SPLITS
    from dprdm.provenance import require_public_folder

    root = Path(data)
    manifest = root / "data" / "manifest.json"
    if manifest.is_file():
        listed = json.loads(manifest.read_text(encoding="utf-8"))["splits"]
        public = {name: s for name, s in listed.items() if s.get("role") == "public"}
        by_path = {s["path"]: name for name, s in public.items()}
        if not splits:
            names = [name for name in DEMO_PUBLIC_SPLITS if name in public]
        else:
            names = [by_path.get(name, name) for name in splits]
            missing = [name for name in names if name not in public]
            if missing:
                raise InvalidParameterError(f"{missing} is not a public split of {manifest} "
                                            f"(public splits: {', '.join(public) or 'none'})")
        folders = [root / public[name]["path"] for name in names]
        if not folders:
            raise InvalidParameterError(f"{manifest} names no public split")
    elif root.is_dir():
        require_public_folder(root, data_is_public, "train the generator")
        folders = [root]
    else:
        raise InvalidParameterError(f"training data not found: {root}")
    images, captions, sources = [], [], []
    for folder in folders:
        dataset = load_folder(folder, size, caption_column=caption_column)
        images.append(dataset.images)
        captions += dataset.captions
        sources += [str(e.get("style") or folder.name) for e in dataset.extra]
    return PublicImages(np.concatenate(images), captions, sources)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), clamped and rounded."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: str | Path, cols: int = 16, scale: int = 2) -> None:
    """Write uint8 (N, H, W, 3) images as one PNG grid (1 px grey gutters), upscaled by `scale`."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), 160, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = image
    picture = Image.fromarray(grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


# ---------------------------------------------------------------------------------------------
# the loop shared by both stages


@dataclass
class Checkpoint:
    """Where one stage writes: EMA weights (save_pretrained), resume state, log, samples."""

    out: Path
    stage: str

    @property
    def model_dir(self) -> Path:
        return self.out / self.stage

    @property
    def state(self) -> Path:
        return self.out / f"{self.stage}.state.pt"

    @property
    def log(self) -> Path:
        return self.out / f"{self.stage}.log.jsonl"

    @property
    def samples(self) -> Path:
        return self.out / f"{self.stage}.samples.png"

    @property
    def settings(self) -> Path:
        return self.out / f"{self.stage}.train.json"


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


@contextmanager
def _progress(total: int | None, label: str) -> Iterator[Callable[..., None]]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=_stderr) as progress:
        task = progress.add_task(label, total=total, info="")
        yield lambda completed, info: progress.update(task, completed=completed, info=info)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant; with `decay_start` a linear fall to 0 at `steps`."""
    lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
    if 0 < config.decay_start < config.steps and step >= config.decay_start:
        lr *= max(0.0, (config.steps - step) / (config.steps - config.decay_start))
    return lr


def run_loop(config: TrainConfig, model: torch.nn.Module,
             loss_fn: Callable[[torch.nn.Module, int, np.random.Generator],
                               tuple[torch.Tensor, dict[str, float]]],
             on_save: Callable[[torch.nn.Module, int], None]) -> dict[str, Any]:
    """Adam + warmup, EMA, checkpoint/resume, logging and limits around a `loss_fn(model, step,
    rng)` that returns (loss, metrics). `on_save(ema, step)` writes the EMA model and samples."""
    ckpt = Checkpoint(Path(config.out), config.stage)
    ckpt.out.mkdir(parents=True, exist_ok=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                  weight_decay=config.weight_decay, foreach=True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    step, minutes_before = 0, 0.0
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    if config.resume and ckpt.state.is_file():
        state = torch.load(ckpt.state, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimiser"])
        step, minutes_before = int(state["step"]), float(state["minutes"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        _stderr.print(f"resumed {config.stage} at step {step} ({minutes_before:.1f} min trained)")
    elif ckpt.log.exists():
        ckpt.log.unlink()  # a fresh run starts a fresh log
    ckpt.settings.write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")

    def save() -> None:
        on_save(ema, step)
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(),
                    "optimiser": optimiser.state_dict(), "step": step,
                    "minutes": minutes_before + (time.time() - start) / 60,
                    "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()},
                   ckpt.state.with_suffix(".tmp"))
        ckpt.state.with_suffix(".tmp").replace(ckpt.state)

    start = last_save = time.time()
    first_step = step
    total = config.steps if config.steps > 0 else None
    window: dict[str, list[float]] = {}
    model.train()
    with _progress(total, f"training {config.stage}") as show, ckpt.log.open("a") as log:
        while True:
            minutes = (time.time() - start) / 60
            if (config.steps > 0 and step >= config.steps) or (
                    config.max_minutes > 0 and minutes >= config.max_minutes):
                break
            lr = learning_rate(config, step)
            for group in optimiser.param_groups:
                group["lr"] = lr
            tic = time.time()
            loss, metrics = loss_fn(model, step, rng)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: {metrics}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimiser.step()
            ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
            step += 1
            metrics = {"loss": loss.item(), **metrics, "grad_norm": grad_norm.item(),
                       "step_s": time.time() - tic}
            for key, value in metrics.items():
                window.setdefault(key, []).append(value)
            if step % config.log_every == 0:
                row = {"step": step, "minutes": round(minutes_before + minutes, 3), "lr": lr,
                       **{k: float(np.mean(v)) for k, v in window.items()}}
                log.write(json.dumps(row) + "\n")
                log.flush()
                window = {}
                if not _stderr.is_terminal:
                    _stderr.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in row.items()))
            show(step, f"loss {metrics['loss']:.4f}")
            if time.time() - last_save > 60 * config.save_every_minutes:
                save()
                last_save = time.time()
    save()
    return {"stage": config.stage, "steps": step, "steps_this_run": step - first_step,
            "minutes_total": round(minutes_before + (time.time() - start) / 60, 2),
            "out": str(ckpt.out)}


# ---------------------------------------------------------------------------------------------
# stage 1: the autoencoder


def train_autoencoder(config: TrainConfig) -> dict[str, Any]:
    config = config.resolved()
    torch.set_num_threads(config.threads)
    public = load_public(config.data, config.size, config.data_is_public, config.caption_column,
                         config.public_splits)
    images = to_tensor(public.images)
    augmentations = (family_augmentations(config) if config.family_size
                     else list(style_augmentations().values()))
    torch.manual_seed(config.seed)  # the initial weights depend on the seed only
    if config.decoder_only:  # the encoder, and so the latent space, stays exactly as it was
        model = load_autoencoder_to_keep(config)
        model.encoder.requires_grad_(False)
    else:
        model = Autoencoder(sample_size=config.size, **config.extra.get("autoencoder", {}))
        initialise_from(model, config, "autoencoder")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _stderr.print(f"autoencoder: {trained / 1e6:.2f}M parameters trained"
                  f"{' (the decoder only)' if config.decoder_only else ''}, {len(images)} public "
                  f"images, {len(augmentations)} augmentations")
    # the preview grid: 16 public images and 16 augmented ones (one augmentation per pair)
    rng_show = np.random.default_rng(1)
    shown_pixels = public.images[rng_show.choice(len(images), min(32, len(images)),
                                                 replace=False)]
    for i, augment in zip(range(16, len(shown_pixels), 2), augmentations * 3):
        shown_pixels[i:i + 2] = augment(shown_pixels[i:i + 2], rng_show)
    shown = to_tensor(shown_pixels)

    def loss_fn(net: torch.nn.Module, step: int, rng: np.random.Generator):
        index = rng.integers(0, len(images), config.batch_size)
        if augmentations:  # teach the decoder the augmented styles the denoiser will train on
            pixels = public.images[index].copy()
            which = rng.integers(0, len(augmentations), len(index))
            chosen = rng.random(len(index)) < config.augment_share
            for a, augment in enumerate(augmentations):
                members = np.flatnonzero(chosen & (which == a))
                if len(members):
                    pixels[members] = augment(pixels[members], rng)
            batch = to_tensor(pixels)
        else:
            batch = images[index]
        flip = torch.from_numpy(rng.random(len(batch)) < 0.5)
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        with torch.set_grad_enabled(not config.decoder_only):
            mean, logvar = net.encode(batch)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        z = z + config.latent_noise * mean.detach().std() * torch.randn_like(mean)
        recon = net.decode(z)
        l1 = F.l1_loss(recon, batch)
        edge = edge_l1(recon, batch)
        kl = kl_divergence(mean, logvar)
        loss = l1 + config.edge_weight * edge + config.kl_weight * kl
        return loss, {"l1": l1.item(), "edge": edge.item(), "kl": kl.item(),
                      "latent_std": mean.detach().std().item(),
                      "posterior_std": torch.exp(0.5 * logvar.detach()).mean().item()}

    def on_save(ema: torch.nn.Module, step: int) -> None:
        with torch.no_grad():
            if not config.decoder_only:  # a kept encoder keeps its latent scale
                mean, _ = ema.encode(images[:: max(1, len(images) // 1024)])
                ema.register_to_config(scaling_factor=float(1.0 / mean.std()))
            recon = ema.decode(ema.encode(shown)[0])
            mse = float(F.mse_loss(recon.clamp(-1, 1), shown) / 4)  # on [0, 1] pixels
        ema.save_pretrained(Checkpoint(Path(config.out), config.stage).model_dir)
        save_grid(np.concatenate([to_uint8(shown), to_uint8(recon)]),
                  Checkpoint(Path(config.out), config.stage).samples)
        _stderr.print(f"saved autoencoder at step {step}: sample MSE {mse:.5f} (0-1 pixels)")

    return run_loop(config, model, loss_fn, on_save)


# ---------------------------------------------------------------------------------------------
# stage 2: the denoiser


class StandInEncoder:
    """A deterministic stand-in with the encoder interface, for tests and development only.

    Images: a fixed random projection of the 8 x 8 area-downsampled, centred pixels. Texts: a
    unit vector seeded by a hash of the text (equal captions -> equal vectors, nothing more).
    """

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        self.dim = dim
        self.projection = np.random.default_rng(seed).standard_normal((8 * 8 * 3, dim))

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        x = F.adaptive_avg_pool2d(x, 8).reshape(len(images), -1).numpy() - 0.5
        return _unit(x @ self.projection)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        import hashlib

        rows = [np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8],
                                                     "little")).standard_normal(self.dim)
                for t in texts]
        return _unit(np.stack(rows) if rows else np.zeros((0, self.dim)))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def load_training_encoder(name: str) -> Any:
    """``stand-in`` -> :class:`StandInEncoder`; anything else -> ``dprdm.encoders.load_encoder``."""
    if name == "stand-in":
        return StandInEncoder()
    from dprdm.encoders import load_encoder  # the encoder package owns its names and weights

    return load_encoder(name)


def family_augmentations(config: TrainConfig
                         ) -> list[Callable[[np.ndarray, np.random.Generator], np.ndarray]]:
    """The procedural family's recipes as augmentations (the autoencoder learns to draw them)."""
    from dprdm.data.style_family import apply_recipe, style_family

    return [lambda images, rng, recipe=recipe: apply_recipe(images, recipe)
            for recipe in style_family(config.family_size, config.family_seed)]


ADDED_CONDITION_PATH = ("cond_tokens.", "cross.")  # a denoiser's condition tokens, if new


def initialise_from(model: torch.nn.Module, config: TrainConfig, part: str) -> None:
    """Load ``config.init_from/<part>`` weights into `model` (fine-tuning), when set."""
    if not config.init_from:
        return
    from safetensors.torch import load_file

    weights = Path(config.init_from) / part / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise InvalidParameterError(f"--init-from: {weights} not found")
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    own = model.state_dict()
    added = {k for k in own.keys() - state.keys() if k.startswith(ADDED_CONDITION_PATH)}
    if state.keys() | added != own.keys():
        raise InvalidParameterError(f"--init-from: {weights} holds another architecture")
    state.update({k: own[k] for k in added})  # the condition tokens: new, the identity at init
    widened = [name for name in own if state[name].shape != own[name].shape]
    if widened and part == "autoencoder":
        state = widen_latent(state, model)
    elif widened and set(widened) <= {"conv_in.weight", "conv_out.weight", "conv_out.bias"}:
        state = widen_denoiser_latent(state, model)
    elif widened:
        raise InvalidParameterError(f"--init-from: {weights} differs in shape at {widened[:3]}")
    model.load_state_dict(state)
    note = f" (latent widened: {len(widened)} tensors)" if widened else ""
    note += " (condition tokens added, starting at zero)" if added else ""
    _stderr.print(f"{part}: initialised from {weights}{note}")


def recorded_generation_settings(init_from: str) -> dict[str, Any]:
    """The content guidance and public lam an ``init_from`` generator records (chosen for it on
    the validation domains), for a run fine-tuned from it to keep; {} without ``init_from``."""
    if not init_from:
        return {}
    index = Path(init_from) / "model_index.json"
    try:
        recorded = json.loads(index.read_text()) if index.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidParameterError(f"--init-from: {index} is not valid JSON ({error})") from None
    if not isinstance(recorded, dict):
        raise InvalidParameterError(f"--init-from: {index} is not a pipeline's model index")
    return {key: recorded[key] for key in ("content_guidance", "public_lam")
            if recorded.get(key) is not None}


def load_autoencoder_to_keep(config: TrainConfig) -> Autoencoder:
    """``config.init_from``'s autoencoder whole (weights, scaling factor), in float32, for a
    decoder-only run: its latent space is what a denoiser was trained on. A deeper decoder
    (``extra["autoencoder"]["decoder_blocks"]``, at least the old count at every level) starts
    as exactly the old one: its extra residual blocks are the identity at initialisation."""
    directory = Path(config.init_from) / "autoencoder"
    if not (directory / "config.json").is_file():
        raise InvalidParameterError(f"--init-from: no autoencoder in {directory}")
    old = Autoencoder.from_pretrained(directory, low_cpu_mem_usage=False).float()
    if old.config.sample_size != config.size:
        raise InvalidParameterError(f"--init-from: the autoencoder is for "
                                    f"{old.config.sample_size}-pixel images, the run for "
                                    f"{config.size}")
    changes = dict(config.extra.get("autoencoder", {}))
    blocks = tuple(changes.pop("decoder_blocks", old.config.decoder_blocks))
    if changes:
        raise InvalidParameterError("--decoder-only keeps the encoder and the latent: only "
                                    f"--decoder-blocks may change, not {sorted(changes)}")
    if len(blocks) != len(old.config.decoder_blocks) or any(
            new < was for new, was in zip(blocks, old.config.decoder_blocks)):
        raise InvalidParameterError(f"--decoder-blocks {list(blocks)}: one count per level, each "
                                    f"at least the old {list(old.config.decoder_blocks)}")
    kept = {key: value for key, value in old.config.items() if not key.startswith("_")}
    model = Autoencoder(**{**kept, "decoder_blocks": blocks})
    missing, unexpected = model.load_state_dict(old.state_dict(), strict=False)
    if unexpected or not all(k.startswith("decoder.") for k in missing):
        raise InvalidParameterError(f"--init-from: {directory} holds another architecture")
    _stderr.print(f"autoencoder: the decoder of {directory} trained on (blocks "
                  f"{list(old.config.decoder_blocks)} -> {list(blocks)}); its encoder is kept")
    return model


def widen_latent(state: dict[str, torch.Tensor], model: Autoencoder) -> dict[str, torch.Tensor]:
    """An autoencoder's weights for MORE latent channels, starting as the narrower model: the
    encoder's old mean / log-variance output channels keep their weights, the new ones start
    from the fresh model's (random) weights; the decoder reads the new channels through zeros.
    So the widened model initially reconstructs exactly as the old one did."""
    own = {k: v.clone() for k, v in model.state_dict().items()}
    old_c = state["decoder.0.weight"].shape[1] if "decoder.0.weight" in state else None
    new_c = int(model.config.latent_channels)
    if old_c is None or old_c >= new_c:
        raise InvalidParameterError("--init-from: only a wider latent can start from a narrower")
    out = dict(state)
    for name, value in state.items():
        target = own[name]
        if value.shape == target.shape:
            continue
        if value.shape[0] == 2 * old_c and target.shape[0] == 2 * new_c:  # encoder output conv
            target[:old_c] = value[:old_c]  # means
            target[new_c:new_c + old_c] = value[old_c:]  # log-variances
        elif value.ndim == 4 and value.shape[1] == old_c and target.shape[1] == new_c:
            target.zero_()  # decoder input conv: new channels read through zeros
            target[:, :old_c] = value
        else:
            raise InvalidParameterError(f"--init-from: cannot widen {name} {tuple(value.shape)} "
                                        f"-> {tuple(target.shape)}")
        out[name] = target
    return out


def widen_denoiser_latent(state: dict[str, torch.Tensor], model: LatentDenoiser
                          ) -> dict[str, torch.Tensor]:
    """A denoiser's weights for a wider latent (see :func:`widen_latent`): the input conv reads
    the old latent channels with the old weights and the new ones through zeros (the condition
    map's channels, which follow the latent's, keep theirs); the output conv predicts the old
    channels as before and the new ones from zero-initialised weights (as a fresh model does)."""
    out = dict(state)
    old_c = state["conv_out.weight"].shape[0]
    new_c = int(model.config.latent_channels)
    if old_c >= new_c:
        raise InvalidParameterError("--init-from: only a wider latent can start from a narrower")
    conv_in = torch.zeros_like(model.state_dict()["conv_in.weight"])
    conv_in[:, :old_c] = state["conv_in.weight"][:, :old_c]
    conv_in[:, new_c:] = state["conv_in.weight"][:, old_c:]
    conv_out = torch.zeros_like(model.state_dict()["conv_out.weight"])
    conv_out[:old_c] = state["conv_out.weight"]
    bias = torch.zeros(new_c)
    bias[:old_c] = state["conv_out.bias"]
    out.update({"conv_in.weight": conv_in, "conv_out.weight": conv_out, "conv_out.bias": bias})
    return out


def family_sources(config: TrainConfig) -> tuple[np.ndarray, list[str], list[str]]:
    """(pixels at ``config.size``, captions, source names): every public style as it is plus
    ``family_size`` procedural styles, recipe j drawn on ``family_images_per_source`` images of
    one public style. Recipes are drawn at 64 px, then resized like every image file is."""
    from dprdm.data import style_family
    from dprdm.data.images import decode_image

    drawn = 64
    public = load_public(config.data, drawn, config.data_is_public, config.caption_column,
                         config.public_splits)
    base_sources = np.array(public.sources)
    styles = sorted(set(public.sources))
    members = [np.flatnonzero(base_sources == style) for style in styles]
    blocks, captions, sources = [public.images], list(public.captions), list(public.sources)
    rng = np.random.default_rng(config.seed)
    for j, base, rows, styled in style_family.family_sources(
            [public.images[m] for m in members], config.family_size, config.family_seed,
            config.family_images_per_source, rng):
        blocks.append(styled)
        captions += [public.captions[i] for i in members[base][rows]]
        sources += [f"{styles[base]}+recipe{j}"] * len(rows)
    pixels = np.concatenate(blocks)
    if config.size != drawn:
        pixels = np.stack([decode_image(p, config.size) for p in pixels])
    return pixels, captions, sources


def style_augmentations() -> dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]]:
    """The generic style augmentations of :mod:`dprdm.data.styles` ({} while it is absent)."""
    try:
        from dprdm.data.styles import STYLE_AUGMENTATIONS
    except ImportError:
        _stderr.print("[yellow]warning:[/] dprdm.data.styles not found: training on the public "
                      "styles only, without style augmentations")
        return {}
    return dict(STYLE_AUGMENTATIONS)


@dataclass
class ConditionBank:
    """Everything a denoiser step reads, computed once (``OUT/cache/denoiser.pt``).

    ``neighbours_image[i]`` / ``neighbours_text[i]``: indices (into the whole bank) of the
    ``neighbours`` nearest images of the same source, found with image i's IMAGE embedding /
    its caption's TEXT embedding, image i itself excluded, nearest first.
    """

    latent_mean: torch.Tensor  # (N, C, h, w), scaled by the autoencoder's scaling factor
    latent_std: torch.Tensor  # (N, C, h, w), same scale
    image_embeddings: torch.Tensor  # (N, d)
    text_embeddings: torch.Tensor  # (N, d), of each image's caption
    neighbours_image: torch.Tensor  # (N, K) long
    neighbours_text: torch.Tensor  # (N, K) long
    sources: list[str]
    captions: list[str]
    key: dict[str, Any]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(asdict(self), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    @classmethod
    def load(cls, path: Path) -> "ConditionBank":
        return cls(**torch.load(path, weights_only=False))


def same_source_neighbours(queries: np.ndarray, keys: np.ndarray, sources: np.ndarray,
                           k: int) -> np.ndarray:
    """(N, k) indices of the k best inner products of query i among keys of i's source, i
    excluded (queries[i] and keys[i] belong to the same record)."""
    out = np.zeros((len(keys), k), dtype=np.int64)
    for source in np.unique(sources):
        members = np.flatnonzero(sources == source)
        if len(members) <= k:
            raise InvalidParameterError(f"source {source!r} has {len(members)} images; "
                                        f"needs more than {k}")
        scores = queries[members] @ keys[members].T
        np.fill_diagonal(scores, -np.inf)
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.take_along_axis(-scores, top, axis=1).argsort(axis=1)
        out[members] = members[np.take_along_axis(top, order, axis=1)]
    return out


def build_condition_bank(config: TrainConfig, autoencoder: Autoencoder,
                         images: tuple[np.ndarray, list[str], list[str]] | None = None
                         ) -> ConditionBank:
    """Public images (+ augmented sources) -> latents, embeddings and neighbour lists.
    `images`: :func:`training_images` of `config` when the caller has them already."""
    family = config.family_size > 0
    public = None if family else load_public(config.data, config.size, config.data_is_public,
                                             config.caption_column, config.public_splits)
    augmentations = {} if family else style_augmentations()
    key = {"data": str(Path(config.data).resolve()), "size": config.size,
           "encoder": config.encoder, "augmentations": sorted(augmentations),
           "augment_copies": config.augment_copies, "neighbours": config.neighbours,
           "seed": config.seed, "n_public": None if family else len(public.images),
           "public_splits": list(config.public_splits), "family": [
               config.family_size, config.family_seed, config.family_images_per_source],
           "autoencoder": _fingerprint(autoencoder)}
    cache = Path(config.out) / "cache" / "denoiser.pt"
    if cache.is_file():
        bank = ConditionBank.load(cache)
        if bank.key == key:
            return bank
        _stderr.print("cache settings changed: recomputing the condition bank")
    pixels, captions, sources = images or training_images(config, public)
    _stderr.print(f"condition bank: {len(pixels)} images in {len(set(sources))} sources")

    encoder = load_training_encoder(config.encoder)
    image_emb = _unit(np.concatenate([encoder.encode_images(pixels[i:i + 512])
                                      for i in range(0, len(pixels), 512)]))
    unique = sorted(set(captions))
    text_of = dict(zip(unique, _unit(encoder.encode_text(unique))))
    text_emb = np.stack([text_of[c] for c in captions])
    source_array = np.array(sources)
    neighbours_image = same_source_neighbours(image_emb, image_emb, source_array,
                                              config.neighbours)
    neighbours_text = same_source_neighbours(text_emb, image_emb, source_array, config.neighbours)

    means, stds = [], []
    scale = float(autoencoder.config.scaling_factor)
    with torch.no_grad():
        for i in range(0, len(pixels), 256):
            mean, logvar = autoencoder.encode(to_tensor(pixels[i:i + 256]))
            means.append(mean * scale)
            stds.append(torch.exp(0.5 * logvar) * scale)
    bank = ConditionBank(torch.cat(means), torch.cat(stds), torch.from_numpy(image_emb),
                         torch.from_numpy(text_emb), torch.from_numpy(neighbours_image),
                         torch.from_numpy(neighbours_text), sources, captions, key)
    bank.save(cache)
    return bank


def training_images(config: TrainConfig, public: PublicImages | None = None
                    ) -> tuple[np.ndarray, list[str], list[str]]:
    """(pixels, captions, source names) of every denoiser training image, in the condition
    bank's order: the procedural family (``family_size`` > 0) or the public styles plus their
    style augmentations. `public`: the public images when already loaded (augmentation mode)."""
    if config.family_size > 0:
        return family_sources(config)
    if public is None:
        public = load_public(config.data, config.size, config.data_is_public,
                             config.caption_column, config.public_splits)
    images, captions, sources = [public.images], list(public.captions), list(public.sources)
    rng = np.random.default_rng(config.seed)
    base_sources = np.array(public.sources)
    for name, augment in style_augmentations().items():
        for copy_index in range(config.augment_copies):
            for style in sorted(set(public.sources)):
                members = np.flatnonzero(base_sources == style)
                images.append(augment(public.images[members], rng))
                captions += [public.captions[i] for i in members]
                suffix = f"#{copy_index}" if config.augment_copies > 1 else ""
                sources += [f"{style}+{name}{suffix}"] * len(members)
    return np.concatenate(images), captions, sources


def _fingerprint(model: torch.nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class SameSourceDraws:
    """Uniform draws of OTHER images of an image's own source (grouped once, drawn per step)."""

    def __init__(self, sources: Sequence[str]):
        codes = np.unique(np.array(sources), return_inverse=True)[1]
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes)
        if counts.min() < 2:
            raise InvalidParameterError("every source needs at least 2 images")
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        self.codes = torch.from_numpy(codes)
        self.order = torch.from_numpy(order)
        self.start = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        self.count = torch.from_numpy(counts)
        self.position = torch.from_numpy(position)

    def __call__(self, index: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """(len(index), k) images of each image's source, itself never, with replacement."""
        code = self.codes[index]
        start, count = self.start[code][:, None], self.count[code][:, None]
        offset = (torch.rand(len(index), k, generator=generator) * (count - 1)).long()
        offset = torch.minimum(offset, count - 2)  # float rounding never reaches count - 1
        offset = offset + (start + offset >= self.position[index][:, None]).long()  # skip self
        return self.order[start + offset]


def make_conditions(bank: ConditionBank, index: torch.Tensor, config: TrainConfig,
                    generator: torch.Generator, *, k: int | None = None,
                    sigma: float | None = None, lam: float | None = None,
                    by_text: bool | None = None,
                    same_source: SameSourceDraws | None = None,
                    restyled: torch.Tensor | None = None) -> torch.Tensor:
    """Training conditions for images `index`, as generation will build them (module docstring):
    lam * (mean of k same-source neighbours + N(0, s^2 I)) + (1 - lam) * (caption's text
    embedding). Per sample, unless fixed by the keyword arguments: k from ``config.k_choices``,
    s ~ U[0, sigma_max], lam ~ U[0, 1], neighbours by text with ``text_query_share``.

    With ``random_neighbour_share`` > 0, that share of samples takes random images of its own
    source instead of its nearest neighbours (`same_source` draws them; built here if not
    given): the condition then carries the style without the caption's content, which only the
    text half can supply. With ``text_only_share`` > 0 (and `lam` not fixed), that share of the
    images of the public styles as they are (`restyled` False; :func:`is_restyled` of the bank's
    sources if not given) take lam = 0: their caption's text embedding alone. At 0 neither
    option draws anything extra (earlier runs replay bit for bit).
    """
    b = len(index)
    if k is None:
        choices = torch.tensor(config.k_choices)
        ks = choices[torch.randint(0, len(choices), (b,), generator=generator)]
    else:
        ks = torch.full((b,), k)
    if by_text is None:
        text = torch.rand(b, generator=generator) < config.text_query_share
    else:
        text = torch.full((b,), by_text)
    neighbours = torch.where(text[:, None], bank.neighbours_text[index],
                             bank.neighbours_image[index])
    if config.random_neighbour_share > 0:
        draws = same_source or SameSourceDraws(bank.sources)
        unrelated = torch.rand(b, generator=generator) < config.random_neighbour_share
        neighbours = torch.where(unrelated[:, None],
                                 draws(index, neighbours.shape[1], generator), neighbours)
    mask = (torch.arange(neighbours.shape[1])[None, :] < ks[:, None]).float()
    released = (bank.image_embeddings[neighbours] * mask[..., None]).sum(1) / ks[:, None]
    std = (torch.rand(b, 1, generator=generator) * config.sigma_max if sigma is None
           else torch.full((b, 1), float(sigma)))
    released = released + std * torch.randn(released.shape, generator=generator)
    weight = torch.rand(b, 1, generator=generator) if lam is None else torch.full((b, 1), lam)
    if config.text_only_share > 0 and lam is None:
        plain = ~(is_restyled(bank.sources) if restyled is None else restyled)[index]
        alone = plain & (torch.rand(b, generator=generator) < config.text_only_share)
        weight = torch.where(alone[:, None], torch.zeros_like(weight), weight)
    return weight * released + (1 - weight) * bank.text_embeddings[index]


def is_restyled(sources: Sequence[str]) -> torch.Tensor:
    """True for images of a restyled source (``style+augmentation`` / ``style+recipeJ``), False
    for the public styles as they are."""
    return torch.tensor(["+" in source for source in sources])


def batch_drawer(restyled: torch.Tensor, real_share: float
                 ) -> Callable[[int, torch.Generator], torch.Tensor]:
    """``draw(batch_size, generator)`` -> indices of one training batch. ``real_share`` 0: every
    image equally likely. Otherwise each sample comes from the unrestyled images with probability
    ``real_share`` and from the restyled ones otherwise, uniformly within its group (a quota that
    keeps the content-bearing real styles in every batch however many procedural sources there
    are). The groups are found, and an impossible quota refused, once, before any step."""
    if real_share == 0.0:
        return lambda b, generator: torch.randint(0, len(restyled), (b,), generator=generator)
    real_rows = torch.nonzero(~restyled).flatten()
    restyled_rows = torch.nonzero(restyled).flatten()
    if len(real_rows) == 0 or (len(restyled_rows) == 0 and real_share < 1.0):
        raise InvalidParameterError("real_share needs real training sources, and restyled ones "
                                    "below 1")

    def uniform(rows: torch.Tensor, b: int, generator: torch.Generator) -> torch.Tensor:
        return rows[torch.randint(0, len(rows), (b,), generator=generator)]

    def draw(b: int, generator: torch.Generator) -> torch.Tensor:
        if real_share == 1.0:
            return uniform(real_rows, b, generator)
        real = torch.rand(b, generator=generator) < real_share
        return torch.where(real, uniform(real_rows, b, generator),
                           uniform(restyled_rows, b, generator))

    return draw


def decoded_x0_l1(autoencoder: Autoencoder, alphas: torch.Tensor, zt: torch.Tensor,
                  pred: torch.Tensor, z0: torch.Tensor, t: torch.Tensor,
                  v_prediction: bool = True) -> torch.Tensor:
    """The denoiser's pixel-space loss (``--pixel-loss-weight``): L1 between the frozen
    decoder's drawing of the x0 estimate implied by `pred` at `zt` and its drawing of the target
    latent `z0` (both scaled latents), each sample weighted by its signal share alpha_bar(t).
    Thin lines are a small part of a latent's MSE but all of an outline's pixels. Computed on the
    batch's first quarter (its rows are random draws): a decoder pass costs about two denoiser
    passes."""
    rows = max(1, len(t) // 4)
    zt, pred, z0, t = zt[:rows], pred[:rows], z0[:rows], t[:rows]
    a = alphas[t].sqrt()[:, None, None, None]
    s = (1 - alphas[t]).sqrt()[:, None, None, None]
    x0 = a * zt - s * pred if v_prediction else (zt - s * pred) / a
    scale = float(autoencoder.config.scaling_factor)
    drawn = autoencoder.decode(x0 / scale)
    with torch.no_grad():
        wanted = autoencoder.decode(z0 / scale)
    return (alphas[t] * (drawn - wanted).abs().mean(dim=(1, 2, 3))).mean()


def train_denoiser(config: TrainConfig) -> dict[str, Any]:
    from dprdm.generation.pipeline import RetrievalDiffusionPipeline, default_scheduler

    config = config.resolved()
    torch.set_num_threads(config.threads)
    out = Path(config.out)
    ae_dir = Checkpoint(out, "autoencoder").model_dir
    if not (ae_dir / "config.json").is_file():
        raise InvalidParameterError(f"no autoencoder in {ae_dir}: run --stage autoencoder first")
    recorded = recorded_generation_settings(config.init_from)  # read before anything is written
    autoencoder = Autoencoder.from_pretrained(ae_dir, low_cpu_mem_usage=False).eval()
    autoencoder.requires_grad_(False)
    bank = build_condition_bank(config, autoencoder)
    scheduler = default_scheduler(config.prediction_type)
    torch.manual_seed(config.seed)  # the initial weights depend on the seed only
    model = LatentDenoiser(cond_dim=bank.image_embeddings.shape[1],
                           latent_channels=autoencoder.config.latent_channels,
                           latent_size=config.size // autoencoder.downsample_factor,
                           **config.extra.get("denoiser", {}))
    initialise_from(model, config, "denoiser")
    _stderr.print(f"denoiser: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                  f"parameters, {len(bank.sources)} training images, "
                  f"cond_dim {bank.image_embeddings.shape[1]}")
    restyled = is_restyled(bank.sources)
    draw_batch = batch_drawer(restyled, config.real_share)
    same_source = SameSourceDraws(bank.sources) if config.random_neighbour_share > 0 else None
    alphas = scheduler.alphas_cumprod.float()
    n_train = scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(config.seed)
    # fixed preview: 4 images of each of the first 8 sources; k=4 image neighbours, sigma 0.05,
    # lam 0.5 -> a grid of (autoencoder reconstruction of the target, generated) row pairs
    preview_rng = np.random.default_rng(2)
    source_array = np.array(bank.sources)
    preview = np.concatenate([preview_rng.choice(np.flatnonzero(source_array == s), 4,
                                                 replace=False)
                              for s in sorted(set(bank.sources))[:8]])
    preview = torch.from_numpy(preview)

    def loss_fn(net: torch.nn.Module, step: int, rng: np.random.Generator):
        gen.manual_seed(int(rng.integers(2**63)))
        index = draw_batch(config.batch_size, gen)
        z0 = bank.latent_mean[index] + bank.latent_std[index] * torch.randn(
            bank.latent_mean[index].shape, generator=gen)
        cond = make_conditions(bank, index, config, gen, same_source=same_source,
                               restyled=restyled)
        drop = torch.rand(len(index), generator=gen) < config.cond_dropout
        t = torch.randint(0, n_train, (len(index),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        seen_noise = noise
        if config.input_perturbation > 0:  # the input is noisier than the target says (exposure
            # bias: at generation the denoiser reads its own, imperfect latents)
            seen_noise = noise + config.input_perturbation * torch.randn(z0.shape, generator=gen)
        zt = a * z0 + s * seen_noise
        v_prediction = config.prediction_type == "v_prediction"
        target = a * noise - s * z0 if v_prediction else noise
        pred = net(zt, t, cond, drop=drop)
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        weight = torch.ones_like(per_sample)
        if config.min_snr_gamma > 0:  # down-weight the easy, low-noise timesteps
            snr = alphas[t] / (1 - alphas[t])
            weight = snr.clamp(max=config.min_snr_gamma) / (snr + 1 if v_prediction else snr)
        loss = (weight * per_sample).mean()
        logged = {"mse": per_sample.mean().item()}
        if config.pixel_loss_weight > 0:
            pixel = decoded_x0_l1(autoencoder, alphas, zt, pred, z0, t, v_prediction)
            loss = loss + config.pixel_loss_weight * pixel
            logged["pixel"] = pixel.item()
        return loss, logged

    def on_save(ema: torch.nn.Module, step: int) -> None:
        pipe = RetrievalDiffusionPipeline(autoencoder=autoencoder, denoiser=ema,
                                          scheduler=scheduler, **recorded)
        pipe.save_pretrained(out)
        pgen = torch.Generator().manual_seed(0)
        cond = make_conditions(bank, preview, config, pgen, k=4, sigma=0.05, lam=0.5,
                               by_text=False)
        images = pipe(cond, guidance=3.0, steps=50, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            targets = to_uint8(autoencoder.decode(bank.latent_mean[preview]
                                                  / autoencoder.config.scaling_factor))
        rows = [np.concatenate([targets[i:i + 16], images[i:i + 16]])
                for i in range(0, len(preview), 16)]
        save_grid(np.concatenate(rows), Checkpoint(out, config.stage).samples)
        _stderr.print(f"saved denoiser at step {step}")

    return run_loop(config, model, loss_fn, on_save)


# ---------------------------------------------------------------------------------------------
# stage 3: the conditioned decoder

PAIR_BATCH = 128
PAIR_SEED_OFFSET = 7  # the pairs draw from a stream of their own, apart from the steps'


@dataclass
class DecoderPairs:
    """The denoiser's own drawings of training images (``OUT/cache/decoder-pairs.pt``).

    Row i: training image ``index[i]``'s latent noised to timestep ``t[i]`` (one of
    ``decoder_pair_starts``, in turn batch by batch), then sampled back to 0 by the generator
    as it generates (50 DDPM steps, guidance 3, its content guidance against the caption's text
    embedding) under the training condition ``conditions[i]``. The result keeps the image's
    layout but lacks what the denoiser does not draw (thin lines); the conditioned decoder
    learns to draw it back (trained by L1, it fades them instead: docs/generator.md item 16)."""

    latents: torch.Tensor  # (N, C, h, w), scaled like the denoiser's
    conditions: torch.Tensor  # (N, d)
    index: torch.Tensor  # (N,) rows of the condition bank
    t: torch.Tensor  # (N,)
    key: dict[str, Any]


@torch.no_grad()
def sample_decoder_pairs(config: TrainConfig, pipe, bank: ConditionBank) -> DecoderPairs:
    """:class:`DecoderPairs` for ``config.decoder_pairs`` training images drawn as the denoiser
    draws its batches (``real_share``), cached under ``OUT/cache``."""
    key = {"bank": bank.key, "denoiser": _fingerprint(pipe.denoiser), "n": config.decoder_pairs,
           "starts": list(config.decoder_pair_starts), "seed": config.seed,
           "content_guidance": pipe.config.content_guidance}
    cache = Path(config.out) / "cache" / "decoder-pairs.pt"
    if cache.is_file():
        pairs = DecoderPairs(**torch.load(cache, weights_only=False))
        if pairs.key == key:
            return pairs
        _stderr.print("cache settings changed: sampling the decoder pairs again")
    restyled = is_restyled(bank.sources)
    draw = batch_drawer(restyled, config.real_share)
    gen = torch.Generator().manual_seed(config.seed + PAIR_SEED_OFFSET)
    alphas = pipe.scheduler.alphas_cumprod.float()
    recorded = pipe.config.content_guidance  # None: plain guidance, as the pipeline does
    content_guidance = 3.0 if recorded is None else float(recorded)
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "conditions": [], "index": [], "t": []}
    batches = math.ceil(config.decoder_pairs / PAIR_BATCH)
    with _progress(batches, "sampling the denoiser's drawings") as show:
        for b in range(batches):
            index = draw(PAIR_BATCH, gen)
            cond = make_conditions(bank, index, config, gen, restyled=restyled)
            text = bank.text_embeddings[index]
            t = config.decoder_pair_starts[b % len(config.decoder_pair_starts)]
            z0 = bank.latent_mean[index]
            latents = alphas[t].sqrt() * z0 + (1 - alphas[t]).sqrt() * torch.randn(
                z0.shape, generator=gen)
            pipe.scheduler.set_timesteps(50)
            for step in pipe.scheduler.timesteps:
                if step <= t:
                    output = pipe.predict(latents, step, cond, 3.0, text, content_guidance)
                    latents = pipe.scheduler.step(output, step, latents,
                                                  generator=gen).prev_sample
            for name, value in (("latents", latents), ("conditions", cond), ("index", index),
                                ("t", torch.full((PAIR_BATCH,), t))):
                parts[name].append(value)
            show(b + 1, "")
    pairs = DecoderPairs(**{name: torch.cat(value)[:config.decoder_pairs]
                            for name, value in parts.items()}, key=key)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(asdict(pairs), cache.with_suffix(".tmp"))
    cache.with_suffix(".tmp").replace(cache)
    return pairs


def conditioned_decoder_from(autoencoder: Autoencoder, condition_dim: int) -> Autoencoder:
    """A copy of `autoencoder` whose decoder also reads a condition of `condition_dim`; it
    decodes exactly as `autoencoder` until trained (its FiLM layers start at zero)."""
    kept = {key: value for key, value in autoencoder.config.items() if not key.startswith("_")}
    model = Autoencoder(**{**kept, "condition_dim": condition_dim})
    missing, unexpected = model.load_state_dict(autoencoder.state_dict(), strict=False)
    if unexpected or not all(".film." in k or k.startswith(("condition_embed.", "null_condition"))
                             for k in missing):
        raise InvalidParameterError("the autoencoder to condition holds another architecture")
    return model


def train_conditioned_decoder(config: TrainConfig) -> dict[str, Any]:
    """Stage ``decoder``: the decoder of the ``init_from`` generator learns to read the
    generation condition (:class:`~dprdm.generation.autoencoder.Autoencoder`, ``condition_dim``)
    and to draw, from the denoiser's own drawings (:func:`sample_decoder_pairs`), the training
    images they came from. ``decoder_clean_share`` of the samples read the image's own latent
    instead (posterior sample), ``cond_dropout`` the null condition; loss L1 + edge L1 as the
    autoencoder's. The encoder, the latent and the denoiser stay exactly as they were."""
    from dprdm.generation.pipeline import RetrievalDiffusionPipeline

    config = config.resolved()
    torch.set_num_threads(config.threads)
    out = Path(config.out)
    pipe = RetrievalDiffusionPipeline.from_pretrained(config.init_from)
    if pipe.autoencoder.conditioned:
        raise InvalidParameterError("--init-from: its decoder is conditioned already")
    pipe.denoiser.requires_grad_(False).eval()
    pipe.autoencoder.requires_grad_(False).eval()
    images = training_images(config)  # drawn once: the bank (if not cached) and the targets
    bank = build_condition_bank(config, pipe.autoencoder, images)
    pairs = sample_decoder_pairs(config, pipe, bank)
    pixels = images[0]
    if len(pixels) != len(bank.sources):
        raise InvalidParameterError("the training images do not match the condition bank")
    torch.manual_seed(config.seed)
    model = conditioned_decoder_from(pipe.autoencoder, pipe.cond_dim)
    model.encoder.requires_grad_(False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _stderr.print(f"conditioned decoder: {trained / 1e6:.2f}M parameters trained on "
                  f"{len(pairs.index)} drawings of the denoiser")
    scale = float(pipe.autoencoder.config.scaling_factor)
    gen = torch.Generator().manual_seed(config.seed)
    shown = torch.arange(0, len(pairs.index), max(1, len(pairs.index) // 16))[:16]

    def loss_fn(net: torch.nn.Module, step: int, rng: np.random.Generator):
        gen.manual_seed(int(rng.integers(2**63)))
        rows = torch.randint(0, len(pairs.index), (config.batch_size,), generator=gen)
        index = pairs.index[rows]
        own = bank.latent_mean[index] + bank.latent_std[index] * torch.randn(
            bank.latent_mean[index].shape, generator=gen)
        clean = torch.rand(len(rows), generator=gen) < config.decoder_clean_share
        latents = torch.where(clean[:, None, None, None], own, pairs.latents[rows]) / scale
        drop = torch.rand(len(rows), generator=gen) < config.cond_dropout
        target = to_tensor(pixels[index.numpy()])
        drawn = net.decode(latents, pairs.conditions[rows], drop=drop)
        l1 = F.l1_loss(drawn, target)
        edge = edge_l1(drawn, target)
        return l1 + config.edge_weight * edge, {"l1": l1.item(), "edge": edge.item()}

    def on_save(ema: torch.nn.Module, step: int) -> None:
        RetrievalDiffusionPipeline(
            autoencoder=ema, denoiser=pipe.denoiser, scheduler=pipe.scheduler,
            content_guidance=pipe.config.content_guidance,
            public_lam=pipe.config.public_lam).save_pretrained(out)
        with torch.no_grad():  # rows: the target, the old decoder's drawing, the new one's
            latents = pairs.latents[shown] / scale
            grid = [pixels[pairs.index[shown].numpy()],
                    to_uint8(pipe.autoencoder.decode(latents)),
                    to_uint8(ema.decode(latents, pairs.conditions[shown]))]
        save_grid(np.concatenate(grid), Checkpoint(out, config.stage).samples)
        _stderr.print(f"saved the conditioned decoder at step {step}")

    return run_loop(config, model, loss_fn, on_save)
