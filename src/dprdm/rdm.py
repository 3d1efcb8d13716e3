"""Prompt -> image through DP retrieval: encoder -> private step -> ledger -> generator.

Owns :class:`RetrievalAugmentedGenerator`, the one composition that ``dprdm generate``, the
evaluation harness and the service share, and :class:`MechanismSettings`, the operator-fixed
(sigma, q, k, lam) of a private index, pinned in its ledger by ``dprdm budget init`` (the ledger is
the only source: there is no mechanism file to edit).

Per prompt p with text embedding x:
* DP mode: r = PrivateRetrieval.release(x) (one query each, charged first); with ``pool`` (the
  default) the releases of one call are shrunk towards the operator's stored style estimate when
  the index has one (:func:`shrink_towards`; one-prompt calls too), else towards their own mean
  (:func:`pool_releases`); both free;
  c = lam*r + (1-lam)*x;
* public-only mode: no private data at all; r is replaced by the mean of x's k nearest neighbours
  in a PUBLIC index when one is given (c = lam_pub*m + (1-lam_pub)*x, lam_pub the caller's, else
  the one the generator records (``public_lam``), else lam), else c = x.
All n images of a prompt come from the same c: post-processing, no extra privacy cost. The user's
seed reaches only the diffusion sampler.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from dprdm.conditioning import check_lam, interpolate, pool_releases, shrink_towards
from dprdm.errors import InvalidParameterError
from dprdm.privacy import MechanismParams, PrivateRetrieval, SqliteLedger
from dprdm.privacy.receipts import call_figures
from dprdm.retrieval import EmbeddingIndex, ExactSearcher

MAX_PROMPTS = 256
MAX_PROMPT_CHARS = 500
MAX_IMAGES_PER_PROMPT = 64
MAX_GUIDANCE = 30.0  # the largest guidance (and content guidance) a user may ask for


@dataclass(frozen=True)
class MechanismSettings:
    """What the operator fixes for an index: the mechanism (sigma, q, k) and the mix lam."""

    sigma: float
    q: float
    k: int
    lam: float = 1.0

    def __post_init__(self) -> None:
        params = MechanismParams(self.sigma, self.q, self.k)  # validates
        object.__setattr__(self, "sigma", params.sigma)
        object.__setattr__(self, "q", params.q)
        object.__setattr__(self, "lam", check_lam(self.lam))

    @property
    def params(self) -> MechanismParams:
        return MechanismParams(self.sigma, self.q, self.k)

    @classmethod
    def from_ledger(cls, ledger: SqliteLedger, lam: float | None = None) -> MechanismSettings:
        """The ledger's pinned mechanism; `lam` (post-processing, free) overrides its lam."""
        params = ledger.mechanism
        return cls(params.sigma, params.q, params.k, ledger.lam if lam is None else lam)


def check_prompts(prompts: object) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise InvalidParameterError("prompts must be a list of strings")
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise InvalidParameterError(f"give 1 to {MAX_PROMPTS} prompts, got {len(prompts)}")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidParameterError("every prompt must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidParameterError(f"prompts are limited to {MAX_PROMPT_CHARS} characters")
    return [prompt.strip() for prompt in prompts]


def check_sampling(n: int, guidance: float, steps: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES_PER_PROMPT:
        raise InvalidParameterError(f"n must be an integer in [1, {MAX_IMAGES_PER_PROMPT}]")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise InvalidParameterError("steps must be an integer in [1, 1000]")
    if not isinstance(guidance, (int, float)) or not np.isfinite(guidance) or not (
            0 <= guidance <= MAX_GUIDANCE):
        raise InvalidParameterError(f"guidance must be a number in [0, {MAX_GUIDANCE:g}]")


def neighbour_mean(index: EmbeddingIndex, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact mean of each query's k nearest neighbours in `index`, with NO privacy: for PUBLIC
    indexes (public-only mode), or the evaluation's non-private upper reference."""
    rows = ExactSearcher(index).ranked_candidates(queries, k)
    means = np.zeros((len(queries), index.dim), dtype=np.float64)
    for i, found in enumerate(rows):
        found = np.sort(found[found >= 0])
        means[i] = index.rows_float32(found).sum(axis=0) / k
    return means.astype(np.float32)


def sharded_neighbour_mean(shards, queries: np.ndarray, k: int) -> np.ndarray:
    """:func:`neighbour_mean` over a sharded PRIVATE index (`shards`: a
    :class:`~dprdm.privacy.sharded.ShardBackend`), with NO privacy: the evaluation's non-private
    upper reference. Every shard returns its exact local top-k (a q = 1 "subsample" is the whole
    shard); the merge keeps the k best by the canonical score, ties by global row."""
    from dprdm.privacy.mechanism import normalise_queries
    from dprdm.retrieval.search import canonical_top_rows

    queries = normalise_queries(queries, shards.dim)
    answers = shards.neighbours(queries, MechanismParams(1.0, 1.0, k), "subsample", 1)
    means = np.zeros((len(queries), shards.dim), dtype=np.float64)
    for i, query in enumerate(queries):
        rows = np.concatenate([answer[i][0] for answer in answers]).astype(np.int64)
        vectors = np.concatenate([answer[i][1] for answer in answers]).astype(np.float32)
        top = np.sort(canonical_top_rows(query, rows, vectors, k))
        order = {row: j for j, row in enumerate(rows.tolist())}
        means[i] = vectors[[order[row] for row in top.tolist()]].sum(axis=0) / k
    return means.astype(np.float32)


@dataclass
class GenerationResult:
    images: np.ndarray  # (prompts, n, H, W, 3) uint8
    report: dict = field(default_factory=dict)


class RetrievalAugmentedGenerator:
    """A generator backend + (private index, ledger, settings) + optional public index.

    Give either ``backend=`` (any :class:`~dprdm.generation.backends.GeneratorBackend`) or, as
    before, an ``encoder`` and a demo ``pipeline`` (wrapped in the demo backend). An index that
    records another conditioning space than the backend's is refused here, before anything is
    charged (demo: an index recording no space is accepted on its dimension alone).
    """

    def __init__(self, encoder=None, pipeline=None, *, backend=None,
                 private_index: EmbeddingIndex | None = None,
                 ledger: SqliteLedger | None = None, settings: MechanismSettings | None = None,
                 public_index: EmbeddingIndex | None = None, strategy: str = "subsample",
                 ray_address: str | None = None, shards=None, pool: bool = True,
                 style_estimate=None, public_lam: float | None = None) -> None:
        if not isinstance(pool, bool):
            raise InvalidParameterError(f"pool must be True or False, got {pool!r}")
        self.pool = pool
        if style_estimate is not None and (private_index is None
                                           or style_estimate.dim != private_index.dim):
            raise InvalidParameterError("a style estimate goes with the private index whose "
                                        "releases it averages (same dimension)")
        self.style_estimate = style_estimate
        if backend is None:
            if encoder is None or pipeline is None:
                raise InvalidParameterError("give a generator backend, or an encoder and a "
                                            "pipeline")
            from dprdm.generation.backends.demo import DemoBackend

            backend = DemoBackend(encoder, pipeline)
        self.backend = backend
        # public-only mix: the caller's, else the generator's recorded one, else settings.lam
        self.public_lam = (check_lam(public_lam) if public_lam is not None
                           else getattr(backend, "public_lam", None))
        self.settings = settings
        self.public_index = public_index
        self.ledger = ledger
        for index, what in ((private_index, "private"), (public_index, "public")):
            if index is not None:
                backend.space.check_index(index.path, index.dim, what,
                                          require_record=backend.name != "demo")
        self.mechanism = None
        if private_index is not None:
            if ledger is None or settings is None:
                raise InvalidParameterError("a private index needs its ledger and settings")
            from dprdm.retrieval.shards import ShardedIndex

            if isinstance(private_index, ShardedIndex):  # same mechanism, shards (maybe on Ray)
                from dprdm.privacy.sharded import ShardedPrivateRetrieval, shard_backend

                if shards is None:  # else: a ShardBackend already started (eval reuses one)
                    shards = shard_backend(private_index, ray_address)
                self.mechanism = ShardedPrivateRetrieval(shards, settings.params, ledger,
                                                         strategy=strategy)
            elif ray_address is not None or shards is not None:
                raise InvalidParameterError("--ray-address needs a sharded index "
                                            "(dprdm index shard)")
            else:
                self.mechanism = PrivateRetrieval(private_index, settings.params, ledger,
                                                  strategy=strategy)

    def conditions(self, prompts: list[str], public_only: bool, caller: str = "",
                   receipts: list | None = None, pooling: dict | None = None) -> np.ndarray:
        """(P, d) conditioning vectors; in DP mode this charges one query per prompt (the
        ledger's receipt is appended to `receipts` when given) and, with ``pool``, shrinks the P
        releases towards the style estimate or their mean (what was kept of each release's
        deviation, and towards what, is written into `pooling`)."""
        text = self.backend.embed_prompts(prompts)
        lam = self.settings.lam if self.settings is not None else 1.0
        if public_only:
            if self.public_index is None:
                return text
            k = self.settings.k if self.settings is not None else 10
            return interpolate(neighbour_mean(self.public_index, text, k), text,
                               self.public_lam_used)
        if self.mechanism is None:
            raise InvalidParameterError("no private index configured: use public-only mode")
        released = self.mechanism.release(text, caller=caller, receipts=receipts)
        if self.pool:  # post-processing of the releases just charged: free
            if self.style_estimate is not None:  # earlier releases: independent of these
                released, kept = shrink_towards(released, self.style_estimate.vector,
                                                self.settings.sigma)
                towards = "style estimate"
            else:
                released, kept = pool_releases(released, self.settings.sigma)
                towards = "call mean" if len(released) > 1 else "nothing (one release)"
            if pooling is not None:
                pooling.update(releases=len(released), kept=round(kept, 4), towards=towards)
        return interpolate(released, text, lam)

    @property
    def public_lam_used(self) -> float:
        """The mix of public neighbours in public-only mode."""
        if self.public_lam is not None:
            return self.public_lam
        return self.settings.lam if self.settings is not None else 1.0

    def generate(self, prompts: list[str], n: int = 1, guidance: float = 3.0, steps: int = 50,
                 seed: int | None = None, public_only: bool = False,
                 caller: str = "") -> GenerationResult:
        prompts = check_prompts(prompts)
        check_sampling(n, guidance, steps)
        if not public_only and self.mechanism is None:
            raise InvalidParameterError("no private index configured: use public-only mode")
        receipts: list = []
        pooling: dict = {}
        started = time.perf_counter()
        conditions = self.conditions(prompts, public_only, caller, receipts, pooling)
        retrieved = time.perf_counter()
        images = self.backend.render(conditions, prompts, n=n, guidance=guidance, steps=steps,
                                     seed=seed)
        finished = time.perf_counter()
        report = {
            "prompts": prompts,
            "mode": "public-only" if public_only else "dp",
            "images_per_prompt": n, "guidance": guidance, "steps": steps, "seed": seed,
            "generator": self.backend.name,
            "timings_s": {"conditioning": round(retrieved - started, 3),
                          "generation": round(finished - retrieved, 3)},
        }
        split = getattr(self.backend, "content_guidance", None)
        if split is not None:  # split guidance (demo backend): the scale the images were made at
            report["content_guidance"] = split
        if self.settings is not None:
            report["mechanism"] = asdict(self.settings)
        if public_only and self.public_index is not None:  # the public neighbours' mix
            report["public_lam"] = self.public_lam_used
        if pooling:  # releases shrunk: towards what, and how much of each one's own was kept
            report["pooling"] = pooling
        if receipts:  # what THIS call charged (concurrent callers do not blur it)
            report["ledger"] = call_figures(receipts, self.ledger)
        return GenerationResult(images=images, report=report)
