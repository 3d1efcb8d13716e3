"""Train the evaluation classifiers and measure them; the shipped weights come from here.

    python -m dprdm.evaluation.train_classifiers --data .dprdm-demo \\
        --out src/dprdm/weights/eval-classifiers

Five short runs, one CPU thread, fixed seed (the same command gives the same weights):

1. **sanity** concept network trained on Twemoji (+ style augmentations) only, tested on Noto
   (Google): how well the recipe recognises content in a public style it has never seen.
2. **concept** network (the shipped one) on Twemoji + Noto (+ style augmentations), PUBLIC splits
   only (the manifest's ``role``); tested on the held-out OpenMoji images (never seen) and, as a
   fit check, on the public images themselves.
3. **style** network: OpenMoji (``openmoji_private``, label 1) against every public training
   source (Twemoji, Noto and both through each style augmentation, label 0; with
   ``--style-reconstructions``, also images of both classes passed through the generator's
   autoencoder, so that its blur is evidence for neither class: measured worse on real images,
   off by default, see docs/evaluation.md).
   Public images of the held-out concepts are left out, so it is tested concept-disjointly on the
   243 held-out OpenMoji images against the public (and augmented) images of those concepts.
   This is the strict network, ``against="public-and-augmentations"``.
4. **style_public** network (``against="public-styles"``, the default of
   ``openmoji_probability``): the same recipe, same concept-disjoint split, but the negatives are
   the raw public images only (Twemoji + Noto, no style augmentations). Measured on the same
   test sets, including every augmentation of the held-out-concept public images.
5. both style networks on autoencoder reconstructions of public held-out-concept images and of
   the held-out OpenMoji: generated images are blurrier than real ones, and blur alone must not
   read as "OpenMoji".

``--only style_public`` trains only (4) and measures it, loading the concept and strict style
networks unchanged from ``--out`` (and adding to the ``training.json`` there).

``--target fluent_hc`` (or ``emojione``) trains none of the above but that validation domain's
style judge (:mod:`dprdm.evaluation.judge`, :data:`dprdm.validation.DOMAINS`; written to the
domain's folder under ``dprdm/weights`` when ``--out`` is left at its default): the strict
network's recipe with the held-out style as the target, against the domain's public splits as
they are, through the augmentations and through ``style_family(400, seed=12345)`` recipes
(:func:`run_judge`).

Every batch goes through light geometric jitter (scale 0.85-1.1, +-2 px shift, +-8 degrees,
white fill) and colour jitter (fill intensity +-15 %). The measured numbers are printed and
saved as ``OUT/training.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dprdm.data.emoji import DEMO_PUBLIC_SPLITS
from dprdm.data.style_family import StyleRecipe, apply_recipe, style_family
from dprdm.data.styles import STYLE_AUGMENTATIONS
from dprdm.errors import InvalidParameterError
from dprdm.evaluation.classifiers import (IMAGE_SIZE, ClassifierConfig, ConvNet, EvalClassifiers,
                                          build_networks)
from dprdm.validation import DOMAINS


@dataclass
class Settings:
    data: str = ".dprdm-demo"
    out: str = "src/dprdm/weights/eval-classifiers"
    concept_steps: int = 1000
    sanity_steps: int = 500
    style_steps: int = 500
    style_public_steps: int = 500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    label_smoothing: float = 0.1
    category_weight: float = 0.5
    p_original: float = 0.3  # share of a concept batch left in its own style
    style_reconstructions: bool = False  # add autoencoder reconstructions to both classes
    seed: int = 0
    threads: int = 1
    log_every: int = 50
    only: str = ""  # "" = train everything; "style_public" = only that network (rest from out)
    # "openmoji": the yardsticks above; a dprdm.validation domain ("fluent_hc", "emojione"):
    # only its style judge (the held-out style vs its public splits, raw, augmented and through
    # a style family)
    target: str = "openmoji"
    judge_steps: int = 1000
    family_size: int = 400
    family_seed: int = 12345
    family_share: float = 1 / 3  # share of the judge's negatives drawn in a family recipe
    raw_share: float = 1 / 3  # ... kept as they are (the rest: raw or an augmentation, 1/8 each)
    # share of every batch shown to the network without the geometric jitter (0: the yardsticks'
    # recipe, every image resampled; a judge of thin line art needs crisp images too)
    unjittered_share: float = 0.0


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    captions: list[str]
    concepts: list[str]
    categories: list[str]
    style: str


def load_splits(data: str | Path, roles: Sequence[str],
                names: Sequence[str] | None = None) -> dict[str, Split]:
    """The demo splits whose manifest role is in `roles` (and, given `names`, whose name is
    one of them), at 32 px (``load_folder``'s resize)."""
    from dprdm.data import load_folder

    root = Path(data)
    manifest = root / "data" / "manifest.json"
    if not manifest.is_file():
        raise InvalidParameterError(f"{manifest} not found: prepare the demo data (`make demo`)")
    splits = json.loads(manifest.read_text(encoding="utf-8"))["splits"]
    out = {}
    for name, entry in splits.items():
        if entry.get("role") not in roles or (names is not None and name not in names):
            continue
        dataset = load_folder(root / entry["path"], IMAGE_SIZE, show_progress=False)
        out[name] = Split(dataset.images, list(dataset.captions),
                          [str(e.get("concept")) for e in dataset.extra],
                          [str(e.get("category")) for e in dataset.extra],
                          str(entry.get("style") or name))
    return out


def concat(parts: Sequence[Split]) -> Split:
    return Split(np.concatenate([p.images for p in parts]), sum([p.captions for p in parts], []),
                 sum([p.concepts for p in parts], []), sum([p.categories for p in parts], []),
                 "+".join(p.style for p in parts))


def subset(split: Split, keep: np.ndarray) -> Split:
    idx = np.flatnonzero(keep)
    return Split(split.images[idx], [split.captions[i] for i in idx],
                 [split.concepts[i] for i in idx], [split.categories[i] for i in idx],
                 split.style)


def restyle(images: np.ndarray, rng: np.random.Generator, p_original: float) -> np.ndarray:
    """Each image kept with probability `p_original`, else drawn in a random style augmentation."""
    out = images.copy()
    names = list(STYLE_AUGMENTATIONS)
    which = rng.integers(0, len(names), len(images))
    styled = rng.random(len(images)) >= p_original
    for a, name in enumerate(names):
        members = np.flatnonzero(styled & (which == a))
        if len(members):
            out[members] = STYLE_AUGMENTATIONS[name](images[members], rng)
    return out


def augment_all(images: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Every image through every style augmentation once (a fixed evaluation set)."""
    rng = np.random.default_rng(seed)
    return {name: fn(images, rng) for name, fn in STYLE_AUGMENTATIONS.items()}


def jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light geometric + colour jitter of (B, 3, S, S) images in [-1, 1] on white."""
    n = len(x)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    scale = uniform(0.85, 1.1)
    angle = uniform(-8.0, 8.0) * math.pi / 180
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2.0 * 2 / x.shape[-1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    ink = 1.0 - x  # white background = 0, so zero padding fills with white
    ink = F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ink = ink * uniform(0.85, 1.15)[:, None, None, None]
    return (1.0 - ink).clamp(-1.0, 1.0)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# the training loop


def train_network(net: ConvNet, batch_fn: Callable[[int, np.random.Generator, torch.Generator],
                                                   tuple[torch.Tensor, dict[str, torch.Tensor]]],
                  loss_fn: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]],
                                    tuple[torch.Tensor, dict[str, float]]],
                  steps: int, settings: Settings, label: str, seed: int) -> float:
    """AdamW, linear warm-up then cosine decay to 0; returns the seconds it took."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    net.train()
    start = time.perf_counter()
    running: dict[str, float] = {}
    for step in range(steps):
        if step < settings.warmup_steps:
            lr = settings.lr * (step + 1) / settings.warmup_steps
        else:
            progress = (step - settings.warmup_steps) / max(1, steps - settings.warmup_steps)
            lr = settings.lr * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        x, targets = batch_fn(settings.batch_size, rng, generator)
        shown_to_net = jitter(x, generator)
        if settings.unjittered_share > 0:  # resampling softens thin lines: show some as they are
            keep = torch.rand(len(x), generator=generator) < settings.unjittered_share
            shown_to_net = torch.where(keep[:, None, None, None], x, shown_to_net)
        loss, stats = loss_fn(net(shown_to_net), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for key, value in stats.items():
            running[key] = running.get(key, 0.0) + value
        if (step + 1) % settings.log_every == 0 or step + 1 == steps:
            count = settings.log_every if (step + 1) % settings.log_every == 0 else (
                (step + 1) % settings.log_every)
            shown = " ".join(f"{k} {v / count:.3f}" for k, v in running.items())
            elapsed = time.perf_counter() - start
            print(f"[{label}] step {step + 1}/{steps} {shown} lr {lr:.2e} "
                  f"{elapsed:.0f}s (~{elapsed / (step + 1) * (steps - step - 1):.0f}s left)",
                  file=sys.stderr, flush=True)
            running = {}
    net.eval()
    return time.perf_counter() - start


def concept_batches(train: Split, concept_index: dict[str, int], category_index: dict[str, int],
                    p_original: float):
    concepts = torch.tensor([concept_index[c] for c in train.captions])
    categories = torch.tensor([category_index[c] for c in train.categories])

    def batch(n: int, rng: np.random.Generator, generator: torch.Generator):
        idx = rng.integers(0, len(train.images), n)
        x = to_tensor(restyle(train.images[idx], rng, p_original))
        return x, {"concept": concepts[idx], "category": categories[idx]}
    return batch


def concept_loss(settings: Settings):
    def loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]):
        concept = F.cross_entropy(out["concept"], targets["concept"],
                                  label_smoothing=settings.label_smoothing)
        category = F.cross_entropy(out["category"], targets["category"])
        acc = (out["concept"].argmax(1) == targets["concept"]).float().mean()
        return concept + settings.category_weight * category, {
            "loss": concept.item(), "cat_loss": category.item(), "acc": acc.item()}
    return loss


def style_batches(target: np.ndarray, public: np.ndarray,
                  reconstructions: tuple[np.ndarray, np.ndarray] | None,
                  augmentations: bool = True, recipes: Sequence[StyleRecipe] = (),
                  family_share: float = 0.0, raw_share: float = 0.0,
                  public_weights: np.ndarray | None = None):
    """Half `target` style (label 1: OpenMoji for the yardsticks), half public (label 0), in
    equal shares of every public source.

    Public: as it is, or through one of the style augmentations (each source 1/8 of the
    negatives); with ``augmentations=False`` (the public-styles network) always as it is.
    With `reconstructions` = (OpenMoji, public) images passed through the generator's
    autoencoder, a quarter of the positives and a ninth of the negatives are such
    reconstructions, so decoder blur is a cue for neither class. With `recipes` (a style
    family), a `family_share` of the negatives are drawn each in a random recipe instead, a
    further `raw_share` kept as they are, the rest shared as above. `public_weights` (summing
    to 1) draws the public images unevenly, e.g. so that every public collection is an equal
    share whatever its size. Without recipes and
    weights the random draws are exactly those of the shipped yardsticks' training.
    """
    names = list(STYLE_AUGMENTATIONS)

    def draw_public(rng: np.random.Generator, count: int) -> np.ndarray:
        if public_weights is None:
            return public[rng.integers(0, len(public), count)].copy()
        return public[rng.choice(len(public), size=count, p=public_weights)].copy()

    def batch(n: int, rng: np.random.Generator, generator: torch.Generator):
        n_pos = n // 2
        pos = target[rng.integers(0, len(target), n_pos)]
        neg = draw_public(rng, n - n_pos)
        if not augmentations:
            x = to_tensor(np.concatenate([pos, neg]))
            return x, {"openmoji": torch.cat([torch.ones(n_pos), torch.zeros(n - n_pos)])}
        kinds = len(names) + 1 + (1 if reconstructions is not None else 0)
        which = rng.integers(0, kinds, len(neg))
        if recipes:
            u = rng.random(len(neg))
            which[(u >= family_share) & (u < family_share + raw_share)] = len(names)  # raw
            in_family = np.flatnonzero(u < family_share)
            which[in_family] = -1  # neither raw nor augmented: a family recipe
            for i, r in zip(in_family, rng.integers(0, len(recipes), len(in_family))):
                neg[i] = apply_recipe(neg[i:i + 1], recipes[int(r)])[0]
        for a, name in enumerate(names):
            members = np.flatnonzero(which == a)
            if len(members):
                neg[members] = STYLE_AUGMENTATIONS[name](neg[members], rng)
        if reconstructions is not None:
            rec_openmoji, rec_public = reconstructions
            members = np.flatnonzero(which == kinds - 1)
            neg[members] = rec_public[rng.integers(0, len(rec_public), len(members))]
            members = np.flatnonzero(rng.random(n_pos) < 0.25)
            pos[members] = rec_openmoji[rng.integers(0, len(rec_openmoji), len(members))]
        x = to_tensor(np.concatenate([pos, neg]))
        y = torch.cat([torch.ones(n_pos), torch.zeros(n - n_pos)])
        return x, {"openmoji": y}
    return batch


def style_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]):
    """Binary cross-entropy of a one-logit network (its only head, whatever its name)."""
    (logits,), (labels,) = [v[:, 0] for v in out.values()], list(targets.values())
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    acc = ((logits > 0).float() == labels).float().mean()
    return loss, {"loss": loss.item(), "acc": acc.item()}


# ---------------------------------------------------------------------------------------------
# measurements


# The generator whose autoencoder the yardsticks were trained against (its reconstructions are
# negatives and reports): v5, shipped until the issue-18 generator replaced it; kept in the
# repository so that training them again gives the same yardsticks.
YARDSTICK_AUTOENCODER = (Path(__file__).resolve().parents[3] / "checkpoints" / "v5"
                         / "demo-generator")


def concept_accuracy(classifiers: EvalClassifiers, split: Split) -> dict:
    """Top-1 / top-10 concept and category accuracy on the images whose caption the head has."""
    from dprdm.evaluation.metrics import concept_scores

    return concept_scores(split.images, split.captions, classifiers)


def autoencoder_reconstructions(images: np.ndarray, autoencoder: torch.nn.Module | None = None
                                ) -> np.ndarray:
    """Images through `autoencoder` (default: :data:`YARDSTICK_AUTOENCODER`, the one the
    yardsticks were trained against), posterior mean, decoded, clamped: the decoder's ceiling
    on a style (``bench/decoder_ceiling.py``)."""
    from dprdm.generation.pipeline import RetrievalDiffusionPipeline

    if autoencoder is None:
        if not (YARDSTICK_AUTOENCODER / "model_index.json").is_file():
            raise FileNotFoundError(f"no generator at {YARDSTICK_AUTOENCODER}: the yardsticks "
                                    "are trained from a clone of the repository")
        autoencoder = RetrievalDiffusionPipeline.from_pretrained(
            YARDSTICK_AUTOENCODER).autoencoder
    autoencoder = autoencoder.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            mean, _ = autoencoder.encode(to_tensor(images[start:start + 256]))
            recon = autoencoder.decode(mean).clamp(-1, 1)
            out.append(((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:], np.uint8)


def rate(p: np.ndarray, positive: bool) -> float:
    return float(np.mean(p >= 0.5) if positive else np.mean(p < 0.5))


def style_report(classifiers: EvalClassifiers, holdout: Split, public_heldout: Split,
                 seed: int, against: str = "public-and-augmentations") -> dict:
    def prob(images: np.ndarray) -> np.ndarray:
        return classifiers.openmoji_probability(images, against=against)

    p_open = prob(holdout.images)
    p_public = prob(public_heldout.images)
    augmented = augment_all(public_heldout.images, seed + 1)
    p_aug = {name: prob(x) for name, x in augmented.items()}
    all_public = np.concatenate([p_public] + list(p_aug.values()))
    recall, specificity = rate(p_open, True), rate(all_public, False)
    return {
        "against": against, "n_openmoji": len(p_open), "n_public": len(p_public),
        "n_public_augmented": int(sum(len(v) for v in p_aug.values())),
        "recall_openmoji": recall,
        "specificity_public": rate(p_public, False),
        "specificity_public_and_augmented": specificity,
        "specificity_per_augmentation": {k: rate(v, False) for k, v in p_aug.items()},
        "balanced_accuracy": 0.5 * (recall + specificity),
        "accuracy_openmoji_vs_raw_public": float(
            (np.sum(p_open >= 0.5) + np.sum(p_public < 0.5)) / (len(p_open) + len(p_public))),
        "mean_p_openmoji": {"openmoji": float(p_open.mean()), "public": float(p_public.mean()),
                            "augmented": float(np.mean(np.concatenate(list(p_aug.values()))))},
    }


def reconstruction_report(classifiers: EvalClassifiers, holdout: Split,
                          public_heldout: Split, against: str = "public-and-augmentations",
                          reconstructions: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """`reconstructions` = (public held-out, OpenMoji held-out) reconstructions, if computed."""
    rec_public, rec_open = reconstructions or (autoencoder_reconstructions(public_heldout.images),
                                               autoencoder_reconstructions(holdout.images))
    p_public = classifiers.openmoji_probability(rec_public, against=against)
    p_open = classifiers.openmoji_probability(rec_open, against=against)
    return {"against": against,"public_reconstructions_openmoji_like": rate(p_public, True),
            "public_reconstructions_mean_p": float(p_public.mean()),
            "openmoji_reconstructions_openmoji_like": rate(p_open, True),
            "openmoji_reconstructions_mean_p": float(p_open.mean()),
            "n_public": len(p_public), "n_openmoji": len(p_open)}


# ---------------------------------------------------------------------------------------------


def train_style_public(settings: Settings, openmoji: Split, public_train: Split
                       ) -> tuple[ConvNet, float]:
    """The public-styles network: OpenMoji vs raw Twemoji + Noto (no augmentations)."""
    torch.manual_seed(settings.seed + 3)
    net = ConvNet(ClassifierConfig().style_channels, {"openmoji": 1})
    seconds = train_network(
        net, style_batches(openmoji.images, public_train.images, None, augmentations=False),
        style_loss, settings.style_public_steps, settings, "style_public", settings.seed + 3)
    return net, seconds


def measure_style_public(record: dict, classifiers: EvalClassifiers, holdout: Split,
                         public_heldout: Split, settings: Settings,
                         reconstructions: tuple[np.ndarray, np.ndarray]) -> None:
    record["style_public"] = style_report(classifiers, holdout, public_heldout, settings.seed,
                                          against="public-styles")
    print("style_public network:", json.dumps(record["style_public"]), file=sys.stderr)
    record["style_public_on_reconstructions"] = reconstruction_report(
        classifiers, holdout, public_heldout, "public-styles", reconstructions)
    print("style_public network on autoencoder reconstructions:",
          json.dumps(record["style_public_on_reconstructions"]), file=sys.stderr)


def run_style_public_only(settings: Settings, holdout: Split, openmoji: Split,
                          public_train: Split, public_heldout: Split, t0: float) -> dict:
    """Train and measure only the public-styles network; the rest is loaded from settings.out."""
    from dprdm.evaluation.classifiers import TRAINING_NAME

    existing = EvalClassifiers.from_pretrained(settings.out)
    record_path = Path(settings.out) / TRAINING_NAME
    record = json.loads(record_path.read_text("utf-8")) if record_path.is_file() else {}
    net, seconds = train_style_public(settings, openmoji, public_train)
    config = existing.config
    config.style_public_channels = ClassifierConfig().style_channels
    classifiers = EvalClassifiers(config, existing.concept_net, existing.style_net, net)
    record.setdefault("seconds", {})["style_public"] = round(seconds, 1)
    record["style_public_settings"] = asdict(settings)
    record["style_public_train"] = {"n_openmoji": len(openmoji.images),
                                    "n_public": len(public_train.images),
                                    "public_augmentations": False}
    reconstructions = (autoencoder_reconstructions(public_heldout.images),
                       autoencoder_reconstructions(holdout.images))
    measure_style_public(record, classifiers, holdout, public_heldout, settings,
                         reconstructions)
    classifiers.save_pretrained(settings.out, record=record)
    # what ships is float16: the reloaded network should call the same images OpenMoji
    reloaded = EvalClassifiers.from_pretrained(settings.out)
    record["style_public_reloaded_float16_recall"] = rate(
        reloaded.openmoji_probability(holdout.images), True)
    classifiers.save_pretrained(settings.out, record=record)
    print(f"saved to {settings.out} ({time.perf_counter() - t0:.0f}s in all)", file=sys.stderr)
    return record


# target -> (its split, its name in reports, the splits it is judged against: what a generator
# may be trained on while that style is held out): the validation domains of dprdm.validation
JUDGE_TARGETS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    name: (domain.split, domain.title, domain.public_splits) for name, domain in DOMAINS.items()}


def family_styled(images: np.ndarray, recipes: Sequence[StyleRecipe], seed: int) -> np.ndarray:
    """Each image drawn in a random recipe of `recipes` (a fixed evaluation set for a seed)."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    for i, r in enumerate(rng.integers(0, len(recipes), len(images))):
        out[i] = apply_recipe(images[i:i + 1], recipes[int(r)])[0]
    return out


def judge_report(judge, target_test: Split, negatives_test: dict[str, Split],
                 recipes: Sequence[StyleRecipe], seed: int,
                 openmoji_holdout: Split | None = None) -> dict:
    """A judge on held-out concepts: recall on the target's images, specificity on every
    negative collection as it is, through each augmentation and through family recipes."""
    p_target = judge.probability(target_test.images)
    raw = {name: judge.probability(split.images) for name, split in negatives_test.items()}
    all_negatives = np.concatenate([split.images for split in negatives_test.values()])
    augmented = {name: judge.probability(x)
                 for name, x in augment_all(all_negatives, seed + 1).items()}
    p_family = judge.probability(family_styled(all_negatives, recipes, seed + 2))
    p_raw = np.concatenate(list(raw.values()))
    recall = rate(p_target, True)
    out = {
        "target": judge.target, "n_target": len(p_target), "n_negatives": len(p_raw),
        "recall_target": recall,
        "specificity_raw": {name: rate(p, False) for name, p in raw.items()},
        "specificity_raw_all": rate(p_raw, False),
        "specificity_per_augmentation": {k: rate(v, False) for k, v in augmented.items()},
        "specificity_augmented_all": rate(np.concatenate(list(augmented.values())), False),
        "specificity_family": rate(p_family, False),
        "accuracy_target_vs_raw": float((np.sum(p_target >= 0.5) + np.sum(p_raw < 0.5))
                                        / (len(p_target) + len(p_raw))),
        "balanced_accuracy_raw": 0.5 * (recall + rate(p_raw, False)),
        "mean_p_target": {"target": float(p_target.mean()), "raw": float(p_raw.mean()),
                          "family": float(p_family.mean())},
        "target_through_family_called_target": rate(
            judge.probability(family_styled(target_test.images, recipes, seed + 3)), True),
    }
    if openmoji_holdout is not None:
        out["openmoji_holdout_called_target"] = rate(judge.probability(openmoji_holdout.images),
                                                     True)
    return out


def run_judge(settings: Settings, t0: float) -> dict:
    """Train and measure the style judge of ``settings.target`` (``--target fluent_hc``)."""
    from dprdm.evaluation.classifiers import DEFAULT_DIR as CLASSIFIERS_DIR
    from dprdm.evaluation.judge import HEAD, StyleJudge

    if settings.target not in JUDGE_TARGETS:
        raise InvalidParameterError(f"--target must be 'openmoji' or one of "
                                    f"{', '.join(JUDGE_TARGETS)}, got {settings.target!r}")
    out = Path(settings.out)
    if out.resolve() == CLASSIFIERS_DIR.resolve():  # the default --out: never the yardsticks'
        out = DOMAINS[settings.target].judge_dir
    if (out / "config.json").is_file() and "dprdm-style-judge" not in (
            out / "config.json").read_text(encoding="utf-8"):
        raise InvalidParameterError(f"{out} holds other weights than a style judge")
    split_name, label, against = JUDGE_TARGETS[settings.target]
    splits = load_splits(settings.data, ["public"], (split_name, *against))
    missing = [name for name in (split_name, *against) if name not in splits]
    if missing:
        raise InvalidParameterError(f"the demo data under {settings.data} lacks {missing}: "
                                    f"prepare it with `python -m dprdm.data.emoji "
                                    f"{settings.data}`")
    evaluation = load_splits(settings.data, ["evaluation"])
    if not evaluation:
        raise InvalidParameterError(f"no held-out split under {settings.data}")
    openmoji_holdout = concat(list(evaluation.values()))
    held = set(openmoji_holdout.concepts)  # the held-out concepts stay out of training

    def split(part: Split) -> tuple[Split, Split]:
        inside = np.array([c in held for c in part.concepts])
        return subset(part, ~inside), subset(part, inside)

    target_train, target_test = split(splits[split_name])
    negatives = {name: split(splits[name]) for name in against}
    public_train = concat([negatives[name][0] for name in against])
    # every negative collection an equal share, whatever its size
    weights = np.concatenate([np.full(len(negatives[name][0].images),
                                      1.0 / (len(against) * len(negatives[name][0].images)))
                              for name in against])
    recipes = style_family(settings.family_size, settings.family_seed)
    print(f"judge {label}: {len(target_train.images)} {split_name} images vs "
          f"{', '.join(f'{n} {len(negatives[n][0].images)}' for n in against)} "
          f"(+ 7 augmentations, {len(recipes)} family recipes); held out: "
          f"{len(target_test.images)} vs {sum(len(negatives[n][1].images) for n in against)}",
          file=sys.stderr)
    torch.manual_seed(settings.seed + 5)
    net = ConvNet(ClassifierConfig().style_channels, {HEAD: 1})
    # --style-reconstructions: decoder blur is a cue for neither class (a generated image is
    # always decoded; a judge that needs crisp pixels never calls one the target)
    reconstructions = ((autoencoder_reconstructions(target_train.images),
                        autoencoder_reconstructions(public_train.images))
                       if settings.style_reconstructions else None)
    batches = style_batches(target_train.images, public_train.images, reconstructions,
                            recipes=recipes, family_share=settings.family_share,
                            raw_share=settings.raw_share, public_weights=weights)

    def relabelled(n: int, rng: np.random.Generator, generator: torch.Generator):
        x, targets = batches(n, rng, generator)
        return x, {HEAD: targets["openmoji"]}

    seconds = train_network(net, relabelled, style_loss, settings.judge_steps, settings,
                            f"judge {label}", settings.seed + 5)
    judge = StyleJudge(label, ClassifierConfig().style_channels, net,
                       against=[f"{name} (raw, 7 augmentations, {len(recipes)} family recipes)"
                                for name in against])
    record: dict = {
        "settings": asdict(settings), "target": label, "target_split": split_name,
        "against": list(against),
        "train": {"n_target": len(target_train.images),
                  **{f"n_{name}": len(negatives[name][0].images) for name in against},
                  "family": {"size": settings.family_size, "seed": settings.family_seed,
                             "share_of_negatives": settings.family_share},
                  "raw_share_of_negatives": settings.raw_share + (
                      1 - settings.family_share - settings.raw_share) / 8},
        "seconds": {"train": round(seconds, 1)},
    }
    negatives_test = {name: negatives[name][1] for name in against}
    record["judge"] = judge_report(judge, target_test, negatives_test, recipes, settings.seed,
                                   openmoji_holdout)
    print("judge:", json.dumps(record["judge"]), file=sys.stderr)
    public_test = concat(list(negatives_test.values()))
    rec_public = autoencoder_reconstructions(public_test.images)
    rec_target = autoencoder_reconstructions(target_test.images)
    record["judge_on_reconstructions"] = {
        "public_reconstructions_called_target": rate(judge.probability(rec_public), True),
        "target_reconstructions_called_target": rate(judge.probability(rec_target), True),
        "n_public": len(rec_public), "n_target": len(rec_target)}
    print("judge on autoencoder reconstructions:",
          json.dumps(record["judge_on_reconstructions"]), file=sys.stderr)
    record["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    judge.save_pretrained(out, record=record)
    reloaded = StyleJudge.from_pretrained(out)  # what ships is float16
    record["reloaded_float16_recall"] = rate(reloaded.probability(target_test.images), True)
    judge.save_pretrained(out, record=record)
    print(f"saved to {out} ({record['seconds']['total']:.0f}s in all)", file=sys.stderr)
    return record


def run(settings: Settings) -> dict:
    if settings.target != "openmoji":
        torch.set_num_threads(settings.threads)
        return run_judge(settings, time.perf_counter())
    if settings.only not in ("", "style_public"):
        raise InvalidParameterError(f"--only must be 'style_public' or empty, got "
                                    f"{settings.only!r}")
    torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    public = load_splits(settings.data, ["public"], DEMO_PUBLIC_SPLITS)  # the yardsticks' data
    evaluation = load_splits(settings.data, ["evaluation"])
    private = load_splits(settings.data, ["private"])
    if set(public) != {"twemoji", "google"} or not evaluation or not private:
        raise InvalidParameterError(f"expected the emoji demo splits under {settings.data}")
    holdout = concat(list(evaluation.values()))
    openmoji = concat(list(private.values()))
    all_public = concat([public["twemoji"], public["google"]])
    # the style networks' concept-disjoint split: public images of held-out concepts left out
    holdout_concepts = set(holdout.concepts)
    public_train = subset(all_public, np.array([c not in holdout_concepts
                                                for c in all_public.concepts]))
    public_heldout = subset(all_public, np.array([c in holdout_concepts
                                                  for c in all_public.concepts]))
    overlap = holdout_concepts & set(openmoji.concepts)
    if overlap:
        raise InvalidParameterError(f"private and holdout share {len(overlap)} concepts")
    if settings.only == "style_public":
        return run_style_public_only(settings, holdout, openmoji, public_train, public_heldout,
                                     t0)

    # the class lists: every public concept (caption), every category, sorted
    category_of: dict[str, str] = {}
    for caption, category in zip(all_public.captions, all_public.categories):
        category_of.setdefault(caption, category)
    concepts = sorted(category_of)
    categories = sorted(set(category_of.values()))
    config = ClassifierConfig(concepts=concepts, categories=categories,
                              concept_categories=[category_of[c] for c in concepts])
    concept_index = {c: i for i, c in enumerate(concepts)}
    category_index = {c: i for i, c in enumerate(categories)}
    in_head = sum(c in concept_index for c in holdout.captions)
    print(f"{len(all_public.images)} public images, {len(concepts)} concepts, "
          f"{len(categories)} categories; {in_head}/{len(holdout.images)} held-out OpenMoji "
          f"captions are public concepts; data {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    record: dict = {"settings": asdict(settings), "n_public": len(all_public.images),
                    "n_concepts": len(concepts), "n_categories": len(categories),
                    "holdout_captions_in_head": in_head, "n_holdout": len(holdout.images),
                    "seconds": {}}

    # 1. sanity: Twemoji only -> Noto
    if settings.sanity_steps > 0:
        torch.manual_seed(settings.seed)
        sanity_net, _ = build_networks(config)
        record["seconds"]["sanity"] = train_network(
            sanity_net, concept_batches(public["twemoji"], concept_index, category_index,
                                        settings.p_original),
            concept_loss(settings), settings.sanity_steps, settings, "sanity: twemoji only",
            settings.seed)
        sanity = EvalClassifiers(config, concept_net=sanity_net)
        record["sanity_twemoji_only"] = {
            "steps": settings.sanity_steps,
            "google": concept_accuracy(sanity, public["google"]),
            "holdout_openmoji": concept_accuracy(sanity, holdout)}
        print("sanity (trained on Twemoji only):", json.dumps(record["sanity_twemoji_only"]),
              file=sys.stderr)

    # 2. the concept network: all public images
    torch.manual_seed(settings.seed + 1)
    concept_net, _ = build_networks(config)
    record["seconds"]["concept"] = train_network(
        concept_net, concept_batches(all_public, concept_index, category_index,
                                     settings.p_original),
        concept_loss(settings), settings.concept_steps, settings, "concept", settings.seed + 1)

    # 3. the strict style network: OpenMoji vs public (+ augmented), held-out concepts left out
    extra = (autoencoder_reconstructions(openmoji.images),
             autoencoder_reconstructions(public_train.images)) if (
        settings.style_reconstructions) else None
    torch.manual_seed(settings.seed + 2)
    _, style_net = build_networks(config)
    record["seconds"]["style"] = train_network(
        style_net, style_batches(openmoji.images, public_train.images, extra), style_loss,
        settings.style_steps, settings, "style", settings.seed + 2)
    record["style_train"] = {"n_openmoji": len(openmoji.images),
                             "n_public": len(public_train.images),
                             "public_reconstructions": settings.style_reconstructions}

    # 4. the public-styles network: OpenMoji vs raw public, same split
    style_public_net, record["seconds"]["style_public"] = train_style_public(
        settings, openmoji, public_train)
    record["style_public_train"] = {"n_openmoji": len(openmoji.images),
                                    "n_public": len(public_train.images),
                                    "public_augmentations": False}
    config.style_public_channels = config.style_channels
    classifiers = EvalClassifiers(config, concept_net, style_net, style_public_net)
    record["concept"] = {"holdout_openmoji": concept_accuracy(classifiers, holdout),
                         "twemoji": concept_accuracy(classifiers, public["twemoji"]),
                         "google": concept_accuracy(classifiers, public["google"])}
    print("concept network:", json.dumps(record["concept"]), file=sys.stderr)
    record["style"] = style_report(classifiers, holdout, public_heldout, settings.seed)
    print("style network:", json.dumps(record["style"]), file=sys.stderr)
    reconstructions = (autoencoder_reconstructions(public_heldout.images),
                       autoencoder_reconstructions(holdout.images))
    record["style_on_reconstructions"] = reconstruction_report(
        classifiers, holdout, public_heldout, "public-and-augmentations", reconstructions)
    print("style network on autoencoder reconstructions:",
          json.dumps(record["style_on_reconstructions"]), file=sys.stderr)
    measure_style_public(record, classifiers, holdout, public_heldout, settings,
                         reconstructions)
    record["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    record["seconds"] = {k: round(v, 1) for k, v in record["seconds"].items()}
    classifiers.save_pretrained(settings.out, record=record)
    # what ships is float16: measure the reloaded weights too (they should agree)
    reloaded = EvalClassifiers.from_pretrained(settings.out)
    record["reloaded_float16_holdout"] = concept_accuracy(reloaded, holdout)
    classifiers.save_pretrained(settings.out, record=record)
    print(f"saved to {settings.out} ({record['seconds']['total']:.0f}s in all)", file=sys.stderr)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    record = run(Settings(**vars(args)))
    print(json.dumps({k: record.get(k) for k in ("concept", "style", "style_on_reconstructions",
                                                 "style_public",
                                                 "style_public_on_reconstructions", "judge",
                                                 "judge_on_reconstructions", "seconds")
                      if k in record}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
