"""The audit experiment: two neighbouring private sets, many trials through the real mechanism.

Owns the canary design and the trials. :func:`run_audit` builds both neighbouring sets as real
on-disk indexes (``dprdm.retrieval.build_index`` in a temporary directory), wraps each in the
mechanism that serves real queries (:class:`~dprdm.privacy.PrivateRetrieval` by default: subsample
-> exact k-NN -> (1/k) sum -> + noise, randomness from the OS), releases the canary query
``trials * queries`` times on each, and hands the per-trial statistics to :mod:`.bounds`.

Canary design (:class:`CanaryDesign`), in d = 8 dimensions (``dim``) along a fixed unit vector u
whose coordinates are all non-zero, distinct and not representable in float16 (so ``--dtype
float16`` rounds them, and a per-coordinate grid or a noise shared by the coordinates cannot
line up with it):

* the private set WITHOUT the canary holds ``records`` copies of the antipode -u;
* the set WITH it adds one record, the canary +u (last row); the query is +u.

The canary scores 1 and every other record -1, so whenever the canary is in the subsample it is
the nearest neighbour and pushes one antipode out of the top k -- if the subsample holds at least
k antipodes, which ``records`` is sized for (:func:`worst_case_records`; exactly k when q = 1).
The aggregate then moves from -u to (u - (k-1) u)/k: by 2/k along u, the full L2 sensitivity.
So one release is exactly the worst case the accountant assumes: N(0, sigma^2) vs
(1 - q) N(0, sigma^2) + q N(2/k, sigma^2) along u (the other d - 1 directions carry only noise).
For a correct mechanism the optimal test statistic is the projection of each release on u, summed
over a trial's ``queries`` releases (each with a fresh subsample and fresh noise). A broken one
may leak elsewhere, so the audit keeps each trial's whole summed vector and lets the selection
half choose among the projection and two statistics fitted to it (:mod:`.statistics`: a linear
discriminant with the noise covariance estimated on the selection half, a Gaussian likelihood
ratio), and separately checks that the noise is N(0, sigma^2 I) (:mod:`.noise`).

Strategies (``dprdm retrieve --strategy``): "subsample" (the default path; more than
SMALL_SUBSAMPLE_ROWS = 512 rows in a subsample switch it to blocked scoring, so pass enough
``records``), "exact" (the ranked walk over the exact searcher) and "ivf-subsample" (the
"probed" path over an :class:`~dprdm.retrieval.IVFPartition` of a public quantizer whose
centroids are the 2d coordinate axes +-e_i -- fixed, data-independent -- probing every list, so
the canary and the antipodes are always candidates). ``dtype`` is the index's storage
("float16" stores every row rounded to half precision, as ``dprdm index build --dtype`` does).

Every release is charged to an EXPERIMENT ledger (an :class:`~dprdm.privacy.InMemoryLedger` with a
budget far above what the audit spends), never to a production ledger. The mechanism is built by
``make_mechanism(index, params, ledger, strategy=..., searcher=...)``; dprdm only ever passes
``PrivateRetrieval``. Tests
pass deliberately broken variants to prove that the audit catches them.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from dprdm.audit.bounds import (
    MIN_TRIALS,
    EpsilonLowerBound,
    check_confidence,
    epsilon_lower_bound_among,
)
from dprdm.audit.noise import DEFAULT_NOISE_ALPHA, NoiseCheck, check_noise
from dprdm.audit.statistics import fit_statistics, scores
from dprdm.errors import InvalidParameterError
from dprdm.privacy import InMemoryLedger, MechanismParams, PrivateRetrieval, accounting
from dprdm.privacy.mechanism import Ledger, PrivateVectors, RankedCandidates, Strategy
from dprdm.retrieval import EmbeddingIndex, IVFPartition, build_index, make_searcher
from dprdm.retrieval.search import PublicQuantizer

AUDIT_DIM = 8
MIN_DIM, MAX_DIM = 3, 64  # >= 3: two noise-only directions, so correlations can be tested
DEFAULT_TRIALS = 20_000
DEFAULT_DELTA = 1e-5
DEFAULT_CONFIDENCE = 0.95
# P(a subsample holds fewer than k antipodes) for the default number of records.
SHORT_SUBSAMPLE_PROBABILITY = 1e-9
MAX_RECORDS = 1_000_000
MAX_TRIALS = 1_000_000
MAX_QUERIES = 1_000
MAX_RELEASES = 10**8  # trials * queries, per neighbouring set
AUDIT_BATCH = 10_000  # rows per release call: bounded memory, progress between calls
# The experiment ledger's budget: at least this, and at least twice the RDP epsilon of the whole
# audit (RDP >= the ledger's PLD figure), so the audit can never be refused.
EXPERIMENT_BUDGET_FLOOR = 1e6
AUDIT_CALLER = "audit:experiment"
STORAGE = "two temporary on-disk indexes (dprdm.retrieval.build_index), deleted afterwards"


AuditStrategy = Literal["subsample", "ivf-subsample", "exact"]
AUDIT_STRATEGIES: tuple[AuditStrategy, ...] = ("subsample", "ivf-subsample", "exact")
AuditDtype = Literal["float32", "float16"]
AUDIT_DTYPES: tuple[AuditDtype, ...] = ("float32", "float16")


class Releaser(Protocol):
    """What the audit needs from a mechanism: PrivateRetrieval's public method."""

    def release(self, queries: np.ndarray, caller: str = "") -> np.ndarray: ...


class MechanismFactory(Protocol):
    """Builds the mechanism under audit; PrivateRetrieval's constructor is one."""

    def __call__(self, vectors: PrivateVectors, params: MechanismParams, ledger: Ledger, *,
                 strategy: Strategy, searcher: RankedCandidates | None) -> Releaser: ...


Progress = Callable[[int, int], None]  # (releases done, releases total), both sets together


def worst_case_records(k: int, q: float) -> int:
    """Fewest antipodes such that a Poisson(q) subsample holds fewer than k of them with
    probability <= SHORT_SUBSAMPLE_PROBABILITY (k when q = 1)."""
    if q >= 1.0:
        return k

    def enough(records: int) -> bool:
        from scipy.stats import binom  # imported here: scipy.stats is slow to import

        return float(binom.cdf(k - 1, records, q)) <= SHORT_SUBSAMPLE_PROBABILITY

    too_few, enough_records = k - 1, max(k, math.ceil(k / q))
    while not enough(enough_records):  # gallop up, then bisect
        too_few, enough_records = enough_records, 2 * enough_records
    while enough_records - too_few > 1:
        middle = (too_few + enough_records) // 2
        too_few, enough_records = (too_few, middle) if enough(middle) else (middle, enough_records)
    return enough_records


@dataclass(frozen=True)
class CanaryDesign:
    """`records` antipodes -u without the canary; the canary +u added; query +u."""

    records: int
    dim: int = AUDIT_DIM

    @property
    def canary(self) -> np.ndarray:
        """u: sqrt(2), -sqrt(3), sqrt(4), -sqrt(5), ... normalised (float32)."""
        coordinates = np.sqrt(np.arange(2, self.dim + 2, dtype=np.float64))
        coordinates[1::2] *= -1.0
        return (coordinates / np.linalg.norm(coordinates)).astype(np.float32)

    @property
    def query(self) -> np.ndarray:
        return self.canary

    @property
    def direction(self) -> np.ndarray:
        """Unit vector along which the two sets' aggregates differ: the test projects on it."""
        return self.canary.astype(np.float64)

    def without_canary(self) -> np.ndarray:
        return np.tile(-self.canary, (self.records, 1))

    def with_canary(self) -> np.ndarray:
        return np.concatenate([self.without_canary(), self.canary[None, :]])


@dataclass(frozen=True)
class AuditResult:
    """Claimed epsilon (accountant) beside the empirical lower bound, with the evidence."""

    params: MechanismParams
    queries: int
    trials: int
    records: int
    strategy: AuditStrategy
    dtype: AuditDtype
    dim: int
    epsilon_claimed: float
    bound: EpsilonLowerBound
    noise: NoiseCheck
    ledger_budget: float
    seconds: float

    @property
    def epsilon_lower_bound(self) -> float:
        return self.bound.epsilon

    @property
    def exceeds_claim(self) -> bool:
        """True when the audit proves (at the bound's confidence) the claim is wrong."""
        return self.bound.epsilon > self.epsilon_claimed

    @property
    def failed_checks(self) -> list[str]:
        """"lower_bound" (the bound exceeds the claim) and/or "noise" (not N(0, sigma^2 I))."""
        return ((["lower_bound"] if self.exceeds_claim else [])
                + ([] if self.noise.passed else ["noise"]))

    @property
    def passed(self) -> bool:
        return not self.failed_checks

    def as_dict(self) -> dict:
        evidence = self.bound.as_dict()
        for key in ("epsilon", "confidence", "delta"):
            evidence.pop(key)
        return {
            "passed": self.passed,
            "failed_checks": self.failed_checks,
            "epsilon_claimed": self.epsilon_claimed,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "exceeds_claim": self.exceeds_claim,
            "trials": self.trials,
            "queries": self.queries,
            "k": self.params.k,
            "sigma": self.params.sigma,
            "q": self.params.q,
            "noise_multiplier": self.params.noise_multiplier,
            "delta": self.bound.delta,
            "confidence": self.bound.confidence,
            "records": self.records,
            "strategy": self.strategy,
            "dtype": self.dtype,
            "dim": self.dim,
            **evidence,
            "noise_check": self.noise.as_dict(),
            "accountant": "PLD (dp_accounting), the ledger's enforced figure",
            "storage": STORAGE,
            "ledger": (
                f"experiment ledger (in-memory, epsilon budget {self.ledger_budget:.3g}); "
                "no production ledger was read or charged"
            ),
            "releases_charged": 2 * self.trials * self.queries,
            "seconds": self.seconds,
        }


def _check_count(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidParameterError(f"{name} must be a whole number in [{low}, {high}], "
                                    f"got {value!r}")
    return value


def experiment_ledger(params: MechanismParams, releases: int, delta: float) -> InMemoryLedger:
    """A fresh in-memory ledger that can afford `releases` releases with `params`."""
    needed = accounting.epsilon_rdp([(params, releases)], delta)[0]
    return InMemoryLedger(epsilon=max(EXPERIMENT_BUDGET_FLOOR, 2.0 * needed), delta=delta)


def _trial_vectors(mechanism: Releaser, design: CanaryDesign, trials: int, queries: int,
                   advance: Callable[[int], None]) -> np.ndarray:
    """(trials, d): per trial, the sum of its `queries` released vectors.

    Each release call carries a batch of trials (row i = trial i); call t of a batch is every
    trial's t-th query, so a correct mechanism gives every row of every call a fresh subsample
    and fresh noise."""
    totals = np.zeros((trials, design.dim))
    for start in range(0, trials, AUDIT_BATCH):
        size = min(AUDIT_BATCH, trials - start)
        batch = np.repeat(design.query[None, :], size, axis=0)
        for _ in range(queries):
            released = mechanism.release(batch, caller=AUDIT_CALLER)
            totals[start : start + size] += np.asarray(released, dtype=np.float64)
            advance(size)
    return totals


def axis_quantizer(dim: int) -> PublicQuantizer:
    """A public quantizer fixed without looking at any data: the 2 * dim centroids +-e_i."""
    axes = np.eye(dim, dtype=np.float32)
    return PublicQuantizer(centroids=np.concatenate([axes, -axes]), n_train=0,
                           created="dprdm audit: the coordinate axes (data-independent)")


def _mechanism(make_mechanism: MechanismFactory, index: EmbeddingIndex, params: MechanismParams,
               ledger: InMemoryLedger, strategy: AuditStrategy) -> Releaser:
    if strategy == "subsample":
        return make_mechanism(index, params, ledger, strategy="subsample", searcher=None)
    if strategy == "ivf-subsample":
        quantizer = axis_quantizer(index.dim)
        partition = IVFPartition(index, quantizer, nprobe=quantizer.nlist)
        return make_mechanism(index, params, ledger, strategy="probed", searcher=partition)
    return make_mechanism(index, params, ledger, strategy="ranked",
                          searcher=make_searcher(index, strategy))


def lower_bound_from_vectors(without: np.ndarray, with_: np.ndarray, direction: np.ndarray,
                             delta: float, confidence: float) -> EpsilonLowerBound:
    """Fit the statistics on the first half of each set's trial vectors, choose and bound on
    the second half (:func:`.bounds.epsilon_lower_bound_among`)."""
    half = without.shape[0] // 2
    statistics = fit_statistics(without[:half], with_[:half], direction)
    selection = scores(statistics, without[:half], with_[:half])
    evaluation = scores(statistics, without[half:], with_[half:])
    common = [name for name in selection if name in evaluation]
    return epsilon_lower_bound_among({name: selection[name] for name in common},
                                     {name: evaluation[name] for name in common},
                                     delta, confidence)


def run_audit(
    params: MechanismParams,
    *,
    trials: int = DEFAULT_TRIALS,
    queries: int = 1,
    delta: float = DEFAULT_DELTA,
    confidence: float = DEFAULT_CONFIDENCE,
    records: int | None = None,
    strategy: AuditStrategy = "subsample",
    dtype: AuditDtype = "float32",
    dim: int = AUDIT_DIM,
    noise_alpha: float = DEFAULT_NOISE_ALPHA,
    make_mechanism: MechanismFactory = PrivateRetrieval,
    ledger: InMemoryLedger | None = None,
    progress: Progress | None = None,
) -> AuditResult:
    """Audit `queries` releases with `params`: the accountant's epsilon beside a lower bound,
    and the noise check (:mod:`.noise`); ``result.passed`` is False when either fails.

    `trials` independent trials run on each neighbouring set; half fit the statistics and select
    the test, half evaluate it (see :mod:`.statistics`, :mod:`.bounds`). `records` (default :func:`worst_case_records`) sets the size of the
    set without the canary. `strategy` is the mechanism's path, as ``dprdm retrieve`` names it:
    "subsample" (draw the subsample, search it), "ivf-subsample" (the same inside a public
    partition's candidate set) or "exact" (walk the exact searcher's ranked list). `dtype` is the
    temporary indexes' storage, `dim` the design's dimension, `noise_alpha` the false-alarm
    probability of the noise check. `ledger` is the in-memory experiment ledger to charge
    (default: a fresh one sized for this audit; passing one lets several audits share its cached
    capacity). Every parameter is checked before anything is built or released."""
    if not isinstance(params, MechanismParams):
        raise InvalidParameterError("params must be a MechanismParams")
    if strategy not in AUDIT_STRATEGIES:
        raise InvalidParameterError(f"strategy must be one of {', '.join(AUDIT_STRATEGIES)}")
    if dtype not in AUDIT_DTYPES:
        raise InvalidParameterError(f"dtype must be one of {', '.join(AUDIT_DTYPES)}")
    dim = _check_count("dim", dim, MIN_DIM, MAX_DIM)
    if isinstance(noise_alpha, bool) or not isinstance(noise_alpha, (int, float)) or not (
            0.0 < noise_alpha < 1.0):
        raise InvalidParameterError(f"noise alpha must be in (0, 1), got {noise_alpha!r}")
    trials = _check_count("trials", trials, 2 * MIN_TRIALS, MAX_TRIALS)
    queries = _check_count("queries", queries, 1, MAX_QUERIES)
    if trials * queries > MAX_RELEASES:
        raise InvalidParameterError(f"trials * queries must be at most {MAX_RELEASES}")
    delta, confidence = accounting.check_delta(delta), check_confidence(confidence)
    if ledger is not None and not isinstance(ledger, InMemoryLedger):
        raise InvalidParameterError("an audit charges an in-memory experiment ledger only")
    worst_case = worst_case_records(params.k, params.q)
    if records is None:
        records = worst_case
        if records > MAX_RECORDS:
            raise InvalidParameterError(
                f"q={params.q} is too small to audit: the worst-case design needs {records} "
                f"records (at most {MAX_RECORDS}); pass fewer --records for a weaker audit"
            )
    records = _check_count("records", records, 1, MAX_RECORDS)
    design = CanaryDesign(records, dim)
    started = time.perf_counter()
    epsilon_claimed = accounting.epsilon_for(params, queries, delta)
    releases = 2 * trials * queries
    if ledger is None:
        ledger = experiment_ledger(params, releases, delta)
    ledger_budget = ledger.epsilon_budget

    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, releases)

    vectors = []
    with tempfile.TemporaryDirectory(prefix="dprdm-audit-") as scratch:
        for name, matrix in (("without", design.without_canary()),
                             ("with", design.with_canary())):
            index = build_index(matrix, Path(scratch) / name, dtype=dtype)
            mechanism = _mechanism(make_mechanism, index, params, ledger, strategy)
            vectors.append(_trial_vectors(mechanism, design, trials, queries, advance))
    if not all(np.all(np.isfinite(v)) for v in vectors):
        raise InvalidParameterError("the mechanism released non-finite values")
    bound = lower_bound_from_vectors(vectors[0], vectors[1], design.direction, delta, confidence)
    noise = check_noise(vectors[0], vectors[1], design.direction, queries * params.sigma**2,
                        noise_alpha, without_aggregate_is_constant=records >= worst_case)
    return AuditResult(
        params=params,
        queries=queries,
        trials=trials,
        records=records,
        strategy=strategy,
        dtype=dtype,
        dim=dim,
        epsilon_claimed=epsilon_claimed,
        bound=bound,
        noise=noise,
        ledger_budget=ledger_budget,
        seconds=time.perf_counter() - started,
    )
