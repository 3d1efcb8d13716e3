"""Training the demo encoder on PUBLIC emoji only: one function, settings in one dataclass.

Owns how ``dprdm/weights/demo-encoder`` is made (``dprdm encoders train-demo``). Read top to
bottom:

1. Sources. The public styles (``data/twemoji``, ``data/google``) are sources 0..1; every generic
   style augmentation of :mod:`dprdm.data.styles`, applied once (fixed seed) to all public images,
   is one more source. Concepts of the held-out OpenMoji set (``holdout/``) are left out of
   training in every style (``exclude_holdout_concepts``), so evaluation only ever sees concepts
   the encoder never trained on. No OpenMoji pixel is read.
2. Text. The frozen MiniLM embeds every training caption once; only the 384 -> dim projection
   trains on the text side (LiT: the text space is locked, the image tower learns to match it).
3. Steps. A batch holds ``batch_size`` DISTINCT concepts (so the contrastive targets are
   unambiguous); each concept shows one of its images, original with probability
   ``p_original`` or else one augmentation chosen uniformly, shifted by up to ``max_shift`` px.
   Loss = symmetric CLIP loss (learned temperature) + ``style_weight`` x cross-entropy of a
   linear style head on the unit image embedding, predicting the source. The head is dropped
   after training; what it leaves behind is a style direction in the embedding.
   **Family mode** (``family_size > 0``, issue 18): the sources are instead each real public style
   as it is, plus ``family_size`` procedural styles of :mod:`dprdm.data.style_family` (recipe j
   drawn on ``family_images_per_source`` images of one real style). A batch holds
   ``sources_per_batch`` sources with ``batch_size / sources_per_batch`` images each; the style
   objective is a supervised contrastive loss (Khosla et al. 2020) with "same source" as the
   positive pair, across concepts, so the embedding learns style as what images of ONE source
   share, for any style, not as a choice among a few known ones. The CLIP loss runs over the
   batch's distinct concepts.
4. AdamW with a cosine schedule and warmup, one thread by default, seeded: the same settings
   give the same weights on the same machine. A ``training_state.pt`` in the output directory
   every ``checkpoint_every`` steps makes an interrupted run resumable; it is deleted at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from torch import nn

from dprdm.data import load_folder
from dprdm.data.styles import STYLE_AUGMENTATIONS
from dprdm.encoders.demo import DemoEncoder, DemoEncoderConfig, preprocess_images
from dprdm.errors import InvalidParameterError

PUBLIC_SPLITS = ("data/twemoji", "data/google")
HOLDOUT_SPLIT = "holdout"
DATA_SIZE = 64  # images are loaded (and augmented) at this side, then resized by the model
STATE_NAME = "training_state.pt"

_stderr = Console(stderr=True)


@dataclass
class TrainConfig:
    dim: int = 64
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 128, 256)
    steps: int = 1000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    style_weight: float = 1.0
    p_original: float = 0.5
    max_shift: int = 2  # pixels at image_size
    exclude_holdout_concepts: bool = True
    public_splits: tuple[str, ...] = PUBLIC_SPLITS
    family_size: int = 0  # > 0: family mode (module docstring)
    family_seed: int = 12345
    family_images_per_source: int = 64
    sources_per_batch: int = 64
    supcon_temperature: float = 0.1
    init_from: str = ""  # an encoder directory whose weights start the run (fine-tuning)
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.public_splits = tuple(str(p) for p in self.public_splits)
        if self.family_size < 0 or (self.family_size and (
                self.batch_size % self.sources_per_batch or self.sources_per_batch < 1
                or self.batch_size // self.sources_per_batch < 2)):
            raise InvalidParameterError(
                "family mode needs batch_size = sources_per_batch x (>= 2 images per source)")
        if not 0 < self.supcon_temperature <= 1:
            raise InvalidParameterError("supcon_temperature must be in (0, 1]")
        for name in ("dim", "image_size", "steps", "batch_size", "threads", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.p_original <= 1.0:
            raise InvalidParameterError(f"p_original must be in [0, 1], got {self.p_original}")
        if self.lr <= 0 or self.style_weight < 0 or self.max_shift < 0:
            raise InvalidParameterError("lr must be > 0; style_weight and max_shift >= 0")

    def model_config(self) -> DemoEncoderConfig:
        return DemoEncoderConfig(dim=self.dim, image_size=self.image_size, channels=self.channels)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["channels"] = list(self.channels)
        out["public_splits"] = list(self.public_splits)
        return out


@dataclass
class Sources:
    """Every training image: public originals first, then one block per augmentation."""

    images: np.ndarray  # uint8 (S * n, DATA_SIZE, DATA_SIZE, 3)
    n: int  # public images per block
    concept: np.ndarray  # int (n,): concept id of public image i (same in every block)
    style: np.ndarray  # int (n,): 0 twemoji, 1 google
    names: list[str]  # source names: public styles, then augmentations
    captions: list[str]  # caption of concept id c
    by_concept: list[np.ndarray]  # public image indices of concept id c


@dataclass
class FamilySources:
    """Family mode: every training image with its source (style) and concept."""

    images: np.ndarray  # uint8 (M, DATA_SIZE, DATA_SIZE, 3)
    source: np.ndarray  # int (M,)
    concept: np.ndarray  # int (M,)
    names: list[str]  # source id -> name ("twemoji", "fluent+recipe17", ...)
    captions: list[str]  # concept id -> caption
    members: list[np.ndarray]  # source id -> its image rows


def _holdout_concepts(data_root: Path, config: TrainConfig) -> set[str]:
    if not config.exclude_holdout_concepts:
        return set()
    holdout_dir = data_root / HOLDOUT_SPLIT
    if not holdout_dir.is_dir():
        raise InvalidParameterError(f"{holdout_dir} is missing; prepare the demo data first "
                                    "(or train with exclude_holdout_concepts=False)")
    # only the captions file is read: which concepts to leave out, never a pixel
    rows = (json.loads(line) for line in
            (holdout_dir / "captions.jsonl").read_text(encoding="utf-8").splitlines() if line)
    return {row["concept"] for row in rows}


def _public_splits(data_root: Path, config: TrainConfig
                   ) -> list[tuple[np.ndarray, list[str], list[str]]]:
    """Per public split (config order): its images, concepts and captions, held-out concepts
    dropped."""
    holdout = _holdout_concepts(data_root, config)
    out = []
    for split in config.public_splits:
        directory = data_root / split
        if not directory.is_dir():
            raise InvalidParameterError(f"{directory} is missing; prepare the demo data first")
        data = load_folder(directory, DATA_SIZE, show_progress=False)
        keep = [i for i, row in enumerate(data.extra) if row.get("concept") not in holdout]
        out.append((data.images[keep], [data.extra[i]["concept"] for i in keep],
                    [data.captions[i] for i in keep]))
    return out


def load_family_sources(data_root: Path, config: TrainConfig) -> FamilySources:
    """The real public styles as they are + ``family_size`` procedural styles drawn on them."""
    from dprdm.data.style_family import family_sources

    styles, concepts, captions = [], [], []
    for images_of_split, concepts_of_split, captions_of_split in _public_splits(data_root, config):
        styles.append(images_of_split)
        concepts.append(concepts_of_split)
        captions += captions_of_split
    concept_names = sorted({c for group in concepts for c in group})
    concept_id = {c: i for i, c in enumerate(concept_names)}
    caption_of = dict(zip((c for group in concepts for c in group), captions))
    images = list(styles)
    source = [np.full(len(block), i) for i, block in enumerate(styles)]
    concept = [np.array([concept_id[c] for c in group]) for group in concepts]
    names = [Path(split).name for split in config.public_splits]
    rng = np.random.default_rng(config.seed)
    for j, base, rows, styled in family_sources(styles, config.family_size, config.family_seed,
                                                config.family_images_per_source, rng):
        images.append(styled)
        source.append(np.full(len(rows), len(names)))
        concept.append(concept[base][rows])
        names.append(f"{names[base]}+recipe{j}")
    source_all = np.concatenate(source)
    members = [np.flatnonzero(source_all == i) for i in range(len(names))]
    return FamilySources(np.concatenate(images), source_all, np.concatenate(concept), names,
                         [caption_of[c] for c in concept_names], members)


def sample_family_batch(sources: FamilySources, config: TrainConfig, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image rows, their concept ids, their source ids): ``sources_per_batch`` sources, the
    real styles with probability ``p_original`` each draw, ``batch_size / sources_per_batch``
    distinct images of each."""
    n_real = len(sources.names) - config.family_size
    per_source = config.batch_size // config.sources_per_batch
    real = rng.random(config.sources_per_batch) < config.p_original
    picked = np.where(real, rng.integers(0, n_real, config.sources_per_batch),
                      n_real + rng.integers(0, max(config.family_size, 1),
                                            config.sources_per_batch))
    rows = np.concatenate([rng.choice(sources.members[s], per_source, replace=False)
                           for s in picked])
    return rows, sources.concept[rows], sources.source[rows]


def load_sources(data_root: Path, config: TrainConfig) -> Sources:
    """Public images + their augmented copies; holdout concepts dropped if configured."""
    images, concepts, captions, styles = [], [], [], []
    for style_id, (images_of_split, concepts_of_split, captions_of_split) in enumerate(
            _public_splits(data_root, config)):
        images.append(images_of_split)
        concepts += concepts_of_split
        captions += captions_of_split
        styles += [style_id] * len(concepts_of_split)
    names = [Path(split).name for split in config.public_splits]
    public = np.concatenate(images)
    concept_names = sorted(set(concepts))
    concept_id = {c: i for i, c in enumerate(concept_names)}
    caption_of = {}
    for concept, caption in zip(concepts, captions):
        caption_of.setdefault(concept, caption)
    rng = np.random.default_rng(config.seed)
    blocks = [public]
    for name, transform in STYLE_AUGMENTATIONS.items():
        blocks.append(transform(public, rng))
        names.append(name)
    ids = np.array([concept_id[c] for c in concepts], dtype=int)
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(len(concept_names) + 1))
    by_concept = [order[bounds[i]:bounds[i + 1]] for i in range(len(concept_names))]
    return Sources(np.concatenate(blocks), len(public), ids, np.array(styles), names,
                   [caption_of[c] for c in concept_names], by_concept)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift px (white fill), one integer offset per image."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=1.0)  # 1.0 is white after preprocessing
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    rows = (offsets[:, 0:1] + torch.arange(h)).view(b, 1, h, 1).expand(b, 3, h, w)
    cols = (offsets[:, 1:2] + torch.arange(w)).view(b, 1, 1, w).expand(b, 3, h, w)
    return _take(padded, rows, cols)


def _take(padded: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    b, c, h, w = rows.shape
    flat = padded.flatten(2)  # (b, c, H*W) of the padded image
    index = (rows * padded.shape[-1] + cols).flatten(2)
    return flat.gather(2, index).view(b, c, h, w)


class Trainee(nn.Module):
    """The encoder plus what only training needs: temperature and the style head."""

    def __init__(self, config: TrainConfig, n_sources: int) -> None:
        super().__init__()
        self.encoder = DemoEncoder(config.model_config())
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.style_head = nn.Linear(config.dim, n_sources)

    def family_forward(self, pixels: torch.Tensor, text_features: torch.Tensor,
                       concepts: torch.Tensor, sources: torch.Tensor, style_weight: float,
                       temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
        """CLIP loss over the batch's distinct concepts + supervised contrastive style loss."""
        img = F.normalize(self.encoder.embed_pixels(pixels), dim=-1)
        unique, target = torch.unique(concepts, return_inverse=True)
        txt = F.normalize(self.encoder.project_text(text_features[unique]), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.T
        positives_t = (target[None, :] == torch.arange(len(unique))[:, None]).float()
        clip_loss = (F.cross_entropy(logits, target) + F.cross_entropy(
            logits.T, positives_t / positives_t.sum(1, keepdim=True))) / 2
        style_loss = supervised_contrastive_loss(img, sources, temperature)
        accuracy = (logits.argmax(1) == target).float().mean()
        similarity = img @ img.T - 3.0 * torch.eye(len(img))
        style_acc = (sources[similarity.argmax(1)] == sources).float().mean()
        stats = {"clip": clip_loss.item(), "style": style_loss.item(),
                 "acc": accuracy.item(), "style_acc": style_acc.item()}
        return clip_loss + style_weight * style_loss, stats

    def forward(self, pixels: torch.Tensor, text_features: torch.Tensor, sources: torch.Tensor,
                style_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
        img = F.normalize(self.encoder.embed_pixels(pixels), dim=-1)
        txt = F.normalize(self.encoder.project_text(text_features), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.T
        target = torch.arange(len(img))
        clip_loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        style_logits = self.style_head(img * 10.0)  # unit vectors: scale so CE can get small
        style_loss = F.cross_entropy(style_logits, sources)
        accuracy = (logits.argmax(1) == target).float().mean()
        style_acc = (style_logits.argmax(1) == sources).float().mean()
        stats = {"clip": clip_loss.item(), "style": style_loss.item(),
                 "acc": accuracy.item(), "style_acc": style_acc.item()}
        return clip_loss + style_weight * style_loss, stats


def supervised_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                                temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al. 2020, the "out" form): for each anchor, the mean over its positives
    (same label, itself excluded) of -log softmax over all other batch items. Unit embeddings."""
    n = len(embeddings)
    logits = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positive.sum(1)
    mean_log_prob = torch.where(positive, log_prob, 0.0).sum(1) / counts.clamp(min=1)
    return -(mean_log_prob[counts > 0]).mean()


def lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def sample_batch(sources: Sources, config: TrainConfig, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image rows into sources.images, concept ids, source labels) for one batch."""
    n_concepts = len(sources.captions)
    concepts = rng.choice(n_concepts, size=min(config.batch_size, n_concepts), replace=False)
    public = np.array([rng.choice(sources.by_concept[c]) for c in concepts])
    n_aug = len(sources.names) - len(config.public_splits)
    augmented = rng.random(len(public)) >= config.p_original
    which = rng.integers(0, n_aug, size=len(public))
    block = np.where(augmented, 1 + which, 0)
    labels = np.where(augmented, len(config.public_splits) + which, sources.style[public])
    return block * sources.n + public, concepts, labels


def train_demo(data_root: str | Path, out: str | Path, config: TrainConfig | None = None, *,
               show_progress: bool = True, resume: bool = True) -> dict:
    """Train, save ``out/config.json`` + ``out/model.safetensors``, return a summary dict."""
    config = config or TrainConfig()
    data_root, out = Path(data_root), Path(out)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()

    family = config.family_size > 0
    sources = (load_family_sources if family else load_sources)(data_root, config)
    trainee = Trainee(config, 1 if family else len(sources.names))
    if config.init_from:
        start = DemoEncoder.from_pretrained(config.init_from)
        if start.config.to_dict() != config.model_config().to_dict():
            raise InvalidParameterError(
                f"--init-from {config.init_from}: its architecture {start.config.to_dict()} "
                f"differs from the configured {config.model_config().to_dict()}")
        trainee.encoder.load_state_dict(start.state_dict())
    with torch.no_grad():
        text_features = torch.cat([trainee.encoder.sentence_features(sources.captions[i:i + 256])
                                   for i in range(0, len(sources.captions), 256)])
    decay = [p for n, p in trainee.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in trainee.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    rng = np.random.default_rng(config.seed + 1)
    generator = torch.Generator().manual_seed(config.seed + 2)
    step = 0

    state_path = out / STATE_NAME
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["config"] == config.to_dict():
            trainee.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            rng.bit_generator.state = state["rng"]
            generator.set_state(state["generator"])
            step = state["step"]
            _stderr.print(f"resuming from step {step} ({state_path})")
        else:
            _stderr.print(f"[yellow]ignoring {state_path}: it was made with other settings[/]")

    prep_seconds = time.perf_counter() - started
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn())
    recent: list[dict[str, float]] = []
    trainee.train()
    with Progress(*columns, console=_stderr, disable=not show_progress) as progress:
        task = progress.add_task("training demo encoder", total=config.steps, completed=step,
                                 stats="")
        while step < config.steps:
            sample = sample_family_batch if family else sample_batch
            rows, concepts, labels = sample(sources, config, rng)
            pixels = preprocess_images(sources.images[rows], config.image_size)
            pixels = random_shift(pixels, config.max_shift, generator)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            if family:
                loss, stats = trainee.family_forward(
                    pixels, text_features, torch.from_numpy(concepts),
                    torch.from_numpy(labels), config.style_weight, config.supcon_temperature)
            else:
                loss, stats = trainee(pixels, text_features[torch.from_numpy(concepts)],
                                      torch.from_numpy(labels), config.style_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            recent = (recent + [stats])[-20:]
            mean = {k: sum(s[k] for s in recent) / len(recent) for k in stats}
            progress.update(task, advance=1, stats=" ".join(f"{k} {v:.3f}"
                                                            for k, v in mean.items()))
            if step % config.checkpoint_every == 0 and step < config.steps:
                out.mkdir(parents=True, exist_ok=True)
                torch.save({"config": config.to_dict(), "model": trainee.state_dict(),
                            "optimizer": optimizer.state_dict(), "rng": rng.bit_generator.state,
                            "generator": generator.get_state(), "step": step},
                           state_path.with_suffix(".tmp"))
                state_path.with_suffix(".tmp").replace(state_path)

    trainee.encoder.eval().save_pretrained(out)
    state_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    summary = {"out": str(out), "dim": config.dim, "image_size": config.image_size,
               "steps": config.steps,
               "sources": sources.names if not family else
               sources.names[:len(sources.names) - config.family_size]
               + [f"{config.family_size} procedural styles (seed {config.family_seed})"],
               "train_images": int(len(sources.images) if family else sources.n),
               "train_concepts": len(sources.captions),
               "final_train_stats": mean if recent else {},
               "prep_seconds": round(prep_seconds, 1), "seconds": round(seconds, 1),
               "settings": config.to_dict()}
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
