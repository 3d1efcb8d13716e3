"""The evaluation experiment behind ``dprdm eval``: generate per setting, then score.

Owns :class:`EvalPlan` (what to run) and :func:`run_evaluation` (running it). The prompts are the
captions of held-out private images, which are also the reference set of the distribution
metrics. Per prompt, one image for each setting (``repeats`` images with ``repeats`` > 1):

* ``public-only``  -- no private data: the prompt's text embedding mixed with the mean of its k
  nearest PUBLIC neighbours (or the text alone without a public index);
* ``dp``           -- DP-RDM through :class:`~dprdm.rdm.RetrievalAugmentedGenerator`, with sigma
  calibrated so that ``queries`` releases reach ``epsilon`` at ``delta``; charged to in-memory
  EXPERIMENT ledgers, never to the index's own ledger;
* ``non-private``  -- the exact mean of the k nearest private neighbours with no subsampling and
  no noise (sigma = 0, q = 1), at its own k and lam when the plan gives them (without noise the
  k that DP's sensitivity asks for need not be the best). NOT private: a reference for utility
  only.

Every setting uses the same diffusion seeds, so differences come from the conditioning alone.
With ``repeats`` = R > 1 every prompt is generated R times per setting with different diffusion
seeds (R x P images, repeat-major); the metrics are computed on all of them, and each setting's
KID is compared with public-only's by a paired bootstrap over the held-out images
(:func:`~dprdm.evaluation.metrics.paired_kid_difference`, in every run whatever R).
When there are more prompts than ``queries``, the prompts are split over several experiment
ledgers of ``queries`` releases each (independent deployments with the same mechanism), so no
experiment ledger ever exceeds the budget its sigma was calibrated for.

Choosing hyper-parameters (k, q, lam, epsilon) by looking at these metrics on private held-out
data leaks private information that no ledger records; the report says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np

from dprdm.conditioning import interpolate
from dprdm.errors import InvalidParameterError
from dprdm.generation.backends.demo import split_guidance
from dprdm.privacy import InMemoryLedger, MechanismParams, accounting
from dprdm.rdm import (MechanismSettings, RetrievalAugmentedGenerator, neighbour_mean,
                       sharded_neighbour_mean)
from dprdm.retrieval import EmbeddingIndex
from dprdm.style_estimate import estimate_style

PROMPT_BATCH = 32  # prompts generated (and charged) per call; one diffusion seed per batch
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EvalPlan:
    """What ``dprdm eval`` runs. Mechanism (k, q, lam) is shared by every DP setting."""

    epsilons: tuple[float, ...] = (1.0, 5.0, 10.0)
    queries: tuple[int, ...] = (100, 1000)
    k: int = 40
    q: float = 0.1
    lam: float = 0.8
    delta: float = 1e-5
    samples: int | None = None  # number of held-out prompts (None: all)
    guidance: float = 3.0
    content_guidance: float | None = None  # demo generator: split guidance (None: plain CFG)
    steps: int = 50
    seed: int = 0  # diffusion sampler and prompt subset only; never the privacy noise
    repeats: int = 1  # images per prompt and setting, each with other diffusion seeds
    kid_subsets: int = 100
    public_only: bool = True
    non_private: bool = True
    pool: bool = True  # DP: shrink each call's releases towards their mean (free; rdm.py)
    prompt_batch: int = PROMPT_BATCH  # prompts per DP call (1: one request at a time, a service)
    # operator prompts of a stored style estimate: each experiment ledger spends one query per
    # prompt on it first (of its T), and its releases are then shrunk towards it (rdm.py)
    style_prompts: tuple[str, ...] = ()
    public_lam: float | None = None  # public-only's mix of public neighbours (None: lam)
    # non-private's own neighbours and mix (None: k and lam). It has no noise, so the k that DP
    # needs (sensitivity 2/k) need not be its best; the demo's are chosen on validation domains.
    non_private_k: int | None = None
    non_private_lam: float | None = None

    def __post_init__(self) -> None:
        if not self.epsilons or any(not (math.isfinite(e) and e > 0) for e in self.epsilons):
            raise InvalidParameterError("epsilons must be finite numbers > 0")
        if not self.queries or any(isinstance(t, bool) or int(t) != t or t < 1
                                   for t in self.queries):
            raise InvalidParameterError("queries must be whole numbers >= 1")
        MechanismParams(1.0, self.q, self.k)  # validates q and k
        if not 0.0 < self.delta < 1.0:
            raise InvalidParameterError(f"delta must lie in (0, 1), got {self.delta}")
        if self.samples is not None and self.samples < 2:
            raise InvalidParameterError("samples must be >= 2 (the metrics need two images)")
        split_guidance(self.content_guidance, "demo")  # its value (run_evaluation: the generator)
        if not 0.0 <= self.lam <= 1.0:
            raise InvalidParameterError(f"lam must lie in [0, 1], got {self.lam}")
        if self.public_lam is not None and not 0.0 <= self.public_lam <= 1.0:
            raise InvalidParameterError(f"public_lam must lie in [0, 1], got {self.public_lam}")
        own_k = self.non_private_k
        if own_k is not None and (isinstance(own_k, bool) or int(own_k) != own_k or own_k < 1):
            raise InvalidParameterError(
                f"non_private_k must be a whole number >= 1, got {self.non_private_k}")
        if self.non_private_lam is not None and not 0.0 <= self.non_private_lam <= 1.0:
            raise InvalidParameterError(
                f"non_private_lam must lie in [0, 1], got {self.non_private_lam}")
        if not isinstance(self.pool, bool):
            raise InvalidParameterError(f"pool must be True or False, got {self.pool!r}")
        if (isinstance(self.prompt_batch, bool) or int(self.prompt_batch) != self.prompt_batch
                or not 1 <= self.prompt_batch <= PROMPT_BATCH):
            raise InvalidParameterError(f"prompt_batch must be a whole number in [1, "
                                        f"{PROMPT_BATCH}], got {self.prompt_batch}")
        if self.style_prompts:
            if not self.pool:
                raise InvalidParameterError("a style estimate is what releases are pooled "
                                            "towards: it needs pool on")
            if len(self.style_prompts) < 2 or len(self.style_prompts) >= min(self.queries):
                raise InvalidParameterError(
                    f"a style estimate of {len(self.style_prompts)} operator prompts must take "
                    f"at least 2 and fewer than the smallest T ({min(self.queries)}) queries")
        if self.kid_subsets < 1:
            raise InvalidParameterError("kid_subsets must be >= 1")
        if isinstance(self.repeats, bool) or int(self.repeats) != self.repeats or self.repeats < 1:
            raise InvalidParameterError(f"repeats must be a whole number >= 1, got {self.repeats}")


@dataclass
class HeldOut:
    """The reference set: held-out private images and their captions (= the prompts)."""

    images: np.ndarray  # uint8 (P, S, S, 3)
    captions: list[str]


@dataclass
class Setting:
    name: str  # "public-only" | "dp" | "non-private"
    epsilon: float | None = None
    queries: int | None = None
    sigma: float | None = None

    @property
    def label(self) -> str:
        if self.name == "dp":
            return f"DP eps={self.epsilon:g} T={self.queries}"
        return self.name


@dataclass
class EvalResult:
    runs: list[dict[str, Any]]
    images: dict[str, np.ndarray]  # setting label -> uint8 (R * P, S, S, 3), repeat-major
    held_out: HeldOut
    notes: dict[str, Any] = field(default_factory=dict)


def choose_prompts(held_out: HeldOut, samples: int | None, seed: int) -> HeldOut:
    """A seeded subset of the held-out set (kept in its original order)."""
    if samples is None or samples >= len(held_out.captions):
        return held_out
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(held_out.captions), size=samples, replace=False))
    return HeldOut(held_out.images[keep], [held_out.captions[i] for i in keep])


def public_only_lam(plan: EvalPlan) -> float:
    """The public-only setting's mix of public neighbours: its own, else the DP settings' lam."""
    return plan.lam if plan.public_lam is None else plan.public_lam


def non_private_mix(plan: EvalPlan) -> tuple[int, float]:
    """The non-private setting's (k, lam): its own, else the DP settings'."""
    return (plan.k if plan.non_private_k is None else int(plan.non_private_k),
            plan.lam if plan.non_private_lam is None else plan.non_private_lam)


def plan_settings(plan: EvalPlan) -> list[Setting]:
    """The settings in report order, with sigma calibrated for every (epsilon, queries)."""
    settings = [Setting("public-only")] if plan.public_only else []
    for queries in plan.queries:
        for epsilon in plan.epsilons:
            sigma = accounting.calibrate_sigma(epsilon, plan.q, plan.k, int(queries), plan.delta)
            settings.append(Setting("dp", float(epsilon), int(queries), sigma))
    if plan.non_private:
        settings.append(Setting("non-private"))
    return settings


class _Generator:
    """Conditions -> images with the same diffusion seeds for every setting."""

    def __init__(self, backend, plan: EvalPlan) -> None:
        self.backend = backend
        self.plan = plan

    def images(self, conditions: np.ndarray, prompts: list[str], batch_number: int,
               repeat: int = 0) -> np.ndarray:
        # one stream per (seed, repeat, batch): other seeds and repeats share no noise
        stream = np.random.SeedSequence([self.plan.seed, repeat, batch_number])
        split = ({} if self.plan.content_guidance is None
                 else {"content_guidance": self.plan.content_guidance})
        images = self.backend.render(conditions, prompts, n=1, guidance=self.plan.guidance,
                                     steps=self.plan.steps, seed=int(stream.generate_state(1)[0]),
                                     **split)
        return images[:, 0]


def as_backend(encoder, pipeline):
    """`pipeline` when it is a generator backend, else the demo backend of (encoder, pipeline)."""
    from dprdm.generation.backends import GeneratorBackend
    from dprdm.generation.backends.demo import DemoBackend

    if isinstance(pipeline, GeneratorBackend):
        return pipeline
    return DemoBackend(encoder, pipeline)


class BackendEncoder:
    """A backend's own towers seen as an encoder: prompts -> its query space, images -> its image
    tower (the text-image alignment and the default feature space of a non-demo backend)."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.name = f"{backend.name} ({backend.space.family})"
        self.dim = backend.dim

    def encode_text(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        return self.backend.embed_prompts(list(texts))

    def encode_images(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        return self.backend.embed_images(images)


def _batches(n: int) -> list[slice]:
    return [slice(i, min(n, i + PROMPT_BATCH)) for i in range(0, n, PROMPT_BATCH)]


def generate_setting(setting: Setting, prompts: list[str], plan: EvalPlan, encoder, pipeline,
                     private_index, public_index: EmbeddingIndex | None,
                     progress: Progress | None = None,
                     private_shards=None) -> tuple[np.ndarray, dict[str, Any]]:
    """``plan.repeats`` images for every prompt under one setting (repeat-major), and what the
    run spent. Every DP image is a release of its own, charged like any other. `pipeline` is a
    generator backend (then `encoder` is unused) or the demo pipeline of `encoder`.
    `private_index` is an EmbeddingIndex, or a ShardedIndex whose shards `private_shards` (a
    started :class:`~dprdm.privacy.sharded.ShardBackend`, in this process or on Ray) serve."""
    backend = as_backend(encoder, pipeline)
    generator = _Generator(backend, plan)
    text = backend.embed_prompts(prompts)
    out, info = [], {}
    ledgers: list[InMemoryLedger] = []
    mechanism = rag = None
    used_in_ledger = 0
    batches = [(repeat, number, part) for repeat in range(plan.repeats)
               for number, part in enumerate(_batches(len(prompts)))]
    for repeat, number, part in batches:
        if setting.name == "public-only":
            if public_index is None:
                conditions = text[part]
            else:
                conditions = interpolate(neighbour_mean(public_index, text[part], plan.k),
                                         text[part], public_only_lam(plan))
        elif setting.name == "non-private":
            k, lam = non_private_mix(plan)
            mean = (neighbour_mean(private_index, text[part], k) if private_shards is None
                    else sharded_neighbour_mean(private_shards, text[part], k))
            conditions = interpolate(mean, text[part], lam)
        else:
            mechanism = MechanismSettings(setting.sigma, plan.q, plan.k, plan.lam)
            conditions_parts, i = [], part.start
            while i < part.stop:
                if rag is None or used_in_ledger == setting.queries:
                    ledgers.append(InMemoryLedger(setting.epsilon, plan.delta))
                    rag = RetrievalAugmentedGenerator(backend=backend,
                                                      private_index=private_index,
                                                      ledger=ledgers[-1], settings=mechanism,
                                                      shards=private_shards, pool=plan.pool)
                    used_in_ledger = 0
                    if plan.style_prompts:  # the operator's share of this ledger's T, first
                        rag.style_estimate = estimate_style(rag, list(plan.style_prompts),
                                                            caller="dprdm eval")
                        used_in_ledger = len(plan.style_prompts)
                take = min(part.stop - i, setting.queries - used_in_ledger, plan.prompt_batch)
                conditions_parts.append(rag.conditions(prompts[i:i + take], public_only=False,
                                                       caller="dprdm eval"))
                used_in_ledger += take
                i += take
            conditions = np.concatenate(conditions_parts)
        out.append(generator.images(conditions, prompts[part], number, repeat))
        if progress is not None:
            progress(repeat * len(prompts) + part.stop, plan.repeats * len(prompts))
    if ledgers:
        spent = [ledger.summary() for ledger in ledgers]
        info = {"experiment_ledgers": len(ledgers),
                "queries_charged": int(sum(s.queries for s in spent)),
                "epsilon_spent_max": float(max(s.epsilon_spent for s in spent)),
                "ledger": "in-memory experiment ledgers (the index's own ledger is not charged)"}
    return np.concatenate(out), info


def released_noise_ratio(plan: EvalPlan, sigma: float, dim: int,
                         public_index: EmbeddingIndex | None, text: np.ndarray) -> float | None:
    """sigma * sqrt(d) over the typical norm of a k-neighbour mean, measured on the PUBLIC index
    (a public proxy: the private aggregates' norms are pre-noise statistics and stay private)."""
    if public_index is None:
        return None
    norms = np.linalg.norm(neighbour_mean(public_index, text, plan.k), axis=1)
    return float(sigma * math.sqrt(dim) / max(float(np.median(norms)), 1e-12))


def score(images: np.ndarray, held_out: HeldOut, classifiers, encoder, extractor,
          plan: EvalPlan) -> dict[str, Any]:
    from dprdm.evaluation.metrics import (alignment_score, concept_scores, distribution_metrics,
                                          style_scores)

    captions = held_out.captions * (len(images) // len(held_out.captions))  # one per image
    row: dict[str, Any] = {}
    row.update(distribution_metrics(held_out.images, images, extractor,
                                    kid_subsets=plan.kid_subsets, seed=plan.seed))
    align = alignment_score(images, captions, encoder)
    row.update({"alignment": align["alignment"], "alignment_std": align["alignment_std"],
                "alignment_mismatched": align["alignment_mismatched"]})
    if classifiers is None:  # not the emoji demo: its concept and style scores mean nothing
        return row
    row.update(style_space_metrics(images, held_out, classifiers, plan))
    concepts = concept_scores(images, captions, classifiers)
    row.update({key: concepts[key] for key in ("concept_top1", "concept_top10", "category_acc")})
    row["n_concepts_scored"] = concepts["n"]
    style = style_scores(images, classifiers)
    row.update({key: style.get(key) for key in STYLE_KEYS})
    return row


STYLE_KEYS = ("openmoji_like", "openmoji_probability_mean", "openmoji_like_strict",
              "openmoji_probability_mean_strict")
DEFAULT_STYLE_TARGET = "OpenMoji"


def style_target(classifiers) -> str:
    """The style the classifiers' style networks recognise (OpenMoji, or a judge's target)."""
    return str(getattr(classifiers, "style_target", DEFAULT_STYLE_TARGET))


def retarget_key(key: str, target: str) -> str:
    """``openmoji_like_strict`` -> ``emojione_like_strict`` (``fluent_high_contrast_like_strict``
    for "Fluent High Contrast") for a judge of another style."""
    if target == DEFAULT_STYLE_TARGET:
        return key
    slug = "_".join("".join(c if c.isalnum() else " " for c in target.lower()).split())
    return key.replace("openmoji", slug)


# FID / KID are also read in the style networks' feature spaces: "style" (OpenMoji vs the raw
# public styles) and "strict" (vs the public styles and their augmentations).
STYLE_SPACES = (("style", "public-styles"), ("strict", "public-and-augmentations"))


def style_space_metrics(images: np.ndarray, held_out: HeldOut, classifiers,
                        plan: EvalPlan) -> dict[str, float]:
    """fid_/kid_ (+ _std) in each style network's feature space, where the classifiers have it.

    The concept network's space (the primary FID / KID) is trained to recognise concepts across
    styles; these spaces see the look. Same held-out reference, subsets and seed."""
    from dprdm.evaluation.classifiers import StyleFeatures
    from dprdm.evaluation.metrics import distribution_metrics

    out: dict[str, float] = {}
    for name, against in STYLE_SPACES:
        if not hasattr(classifiers, "style_features") or (
                against == "public-styles" and not classifiers.has_public_styles_net):
            continue
        metrics = distribution_metrics(held_out.images, images, StyleFeatures(classifiers, against),
                                       kid_subsets=plan.kid_subsets, seed=plan.seed)
        for key in ("fid", "fid_std", "kid", "kid_std"):
            out[key.replace("fid", f"fid_{name}").replace("kid", f"kid_{name}")] = metrics[key]
    return out


PAIRED_RESAMPLES = 200


def compare_with_public_only(runs: list[dict[str, Any]], images: dict[str, np.ndarray],
                             held_out: HeldOut, extractor, plan: EvalPlan) -> None:
    """Add to every other row its KID minus public-only's, by a paired bootstrap over the
    held-out images (each resample draws the same images and prompts, all repeats, for both),
    with its std and the share of resamples in which the row is closer to the held-out set."""
    from dprdm.evaluation.metrics import paired_kid_difference

    if "public-only" not in images or len(held_out.captions) < 4:
        return
    for row in runs:
        if row["label"] == "public-only":
            continue
        paired = paired_kid_difference(held_out.images, images[row["label"]],
                                       images["public-only"], extractor,
                                       resamples=PAIRED_RESAMPLES, seed=plan.seed)
        row.update({"kid_vs_public_only": paired["difference"],
                    "kid_vs_public_only_std": paired["std"],
                    "closer_than_public_only": paired["share_a_better"]})


def real_reference_row(held_out: HeldOut, classifiers, encoder) -> dict[str, Any]:
    """Scores of the held-out real images themselves (the level generations are read against)."""
    from dprdm.evaluation.metrics import alignment_score, concept_scores, style_scores

    align = alignment_score(held_out.images, held_out.captions, encoder)
    if classifiers is None:
        return {"setting": "real held-out", "alignment": align["alignment"],
                "alignment_mismatched": align["alignment_mismatched"]}
    concepts = concept_scores(held_out.images, held_out.captions, classifiers)
    style = style_scores(held_out.images, classifiers)
    return {"setting": "real held-out", "concept_top1": concepts["concept_top1"],
            "concept_top10": concepts["concept_top10"], "category_acc": concepts["category_acc"],
            **{key: style.get(key) for key in STYLE_KEYS},
            "alignment": align["alignment"], "alignment_mismatched": align["alignment_mismatched"]}


def feature_space(extractor) -> str:
    """What FID/KID/PRDC were measured in, in words, for the report."""
    describe = getattr(extractor, "describe", None)
    return describe() if callable(describe) else type(extractor).__name__


def run_evaluation(plan: EvalPlan, held_out: HeldOut, encoder, pipeline,
                   private_index, public_index: EmbeddingIndex | None,
                   classifiers=None, extractor=None,
                   progress_for: Callable[[str], Any] | None = None,
                   private_shards=None, domain: str | None = None) -> EvalResult:
    """Generate and score every setting of `plan`. `progress_for(label)` returns a context
    manager yielding a `(done, total)` callback (or None), e.g. ``cli.output.progress_callback``.
    `pipeline` is any generator backend (`encoder` None: the backend's own towers embed prompts
    and images) or the demo pipeline of `encoder`. `private_index` may be sharded: its shards
    run in this process, or in the ShardBackend `private_shards` given (e.g. Ray actors).

    `classifiers` (the emoji demo's concept and style networks) are for the demo data only; with
    None the report holds the distribution metrics and the text-image alignment alone, in the
    feature space of `extractor` (default: the encoder's image tower). Classifiers whose style
    judge recognises another style than OpenMoji (``style_target``, e.g. the validation
    domain's EmojiOne judge) give their style keys that style's name
    (``emojione_like_strict``).
    `domain` is a sentence for the report saying which domain this is (e.g. the validation
    domain).
    """
    from contextlib import nullcontext

    backend = as_backend(encoder, pipeline)
    split_guidance(plan.content_guidance, backend.name)
    if plan.content_guidance is None and getattr(backend, "content_guidance", None) is not None:
        # the guidance the generator records it was chosen at: run and report it as given
        plan = replace(plan, content_guidance=backend.content_guidance)
    if (plan.public_lam is None and public_index is not None
            and getattr(backend, "public_lam", None) is not None):
        plan = replace(plan, public_lam=backend.public_lam)  # the generator's public-only mix
    if encoder is None:
        encoder = BackendEncoder(backend)
    if private_index.dim != encoder.dim:
        raise InvalidParameterError(
            f"the index holds {private_index.dim}-d embeddings, the encoder makes {encoder.dim}-d")
    for index, what in ((private_index, "private"), (public_index, "public")):
        if index is not None:  # before any experiment ledger is charged
            backend.space.check_index(index.path, index.dim, what,
                                      require_record=backend.name != "demo")
    from dprdm.retrieval.shards import ShardedIndex

    if isinstance(private_index, ShardedIndex) and private_shards is None:
        from dprdm.privacy.sharded import shard_backend

        private_shards = shard_backend(private_index, None)  # every shard in this process
    held_out = choose_prompts(held_out, plan.samples, plan.seed)
    if len(held_out.captions) < 2:
        raise InvalidParameterError("the held-out set needs at least 2 captioned images")
    from dprdm.evaluation.metrics import EncoderImageFeatures

    if extractor is None:
        extractor = classifiers if classifiers is not None else EncoderImageFeatures(encoder)
    settings = plan_settings(plan)
    text = encoder.encode_text(held_out.captions)
    runs, images = [], {}
    for setting in settings:
        started = time.perf_counter()
        context = progress_for(setting.label) if progress_for else nullcontext(None)
        with context as progress:
            generated, spent = generate_setting(setting, held_out.captions, plan, encoder,
                                                backend, private_index, public_index, progress,
                                                private_shards)
        seconds = time.perf_counter() - started
        images[setting.label] = generated
        k, mix = non_private_mix(plan) if setting.name == "non-private" else (plan.k, plan.lam)
        if setting.name == "public-only" and public_index is not None:
            mix = public_only_lam(plan)
        row: dict[str, Any] = {
            "setting": setting.name, "label": setting.label, "epsilon": setting.epsilon,
            "queries": setting.queries, "delta": plan.delta if setting.name == "dp" else None,
            "sigma": setting.sigma if setting.name == "dp" else (
                0.0 if setting.name == "non-private" else None),
            "q": plan.q if setting.name == "dp" else (1.0 if setting.name == "non-private"
                                                       else None),
            "k": k, "lam": mix, "prompts": len(held_out.captions),
            "private": setting.name == "dp",
            "noise_to_signal": (released_noise_ratio(plan, setting.sigma, encoder.dim,
                                                     public_index, text)
                                if setting.name == "dp" else None),
            "generation_s": round(seconds, 1),
        }
        row.update(score(generated, held_out, classifiers, encoder, extractor, plan))
        row.update(spent)
        runs.append(row)
    compare_with_public_only(runs, images, held_out, extractor, plan)
    reference = real_reference_row(held_out, classifiers, encoder)
    target = style_target(classifiers)
    runs = [{retarget_key(key, target): value for key, value in row.items()} for row in runs]
    reference = {retarget_key(key, target): value for key, value in reference.items()}
    notes = {
        "reference": reference,
        "style_target": target if classifiers is not None else None,
        "domain": domain,
        "feature_space": feature_space(extractor),
        "demo_metrics": classifiers is not None,
        "plan": {**asdict(plan), "style_prompts": len(plan.style_prompts)},
        "warning": ("Hyper-parameters chosen by looking at these private-data metrics leak "
                    "privacy that no ledger records; choose them on public data."),
        "non_private": "non-private retrieval (sigma=0, q=1) is NOT private: an upper reference",
    }
    return EvalResult(runs, images, held_out, notes)
