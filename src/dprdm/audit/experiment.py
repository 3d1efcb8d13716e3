"""The audit experiment: two neighbouring private sets, many trials through the real mechanism.

Owns the canary design and the trials. :func:`run_audit` builds both neighbouring sets as real
on-disk indexes (``dprdm.retrieval.build_index`` in a temporary directory), wraps each in the
mechanism that serves real queries (:class:`~dprdm.privacy.PrivateRetrieval` by default: subsample
-> exact k-NN -> (1/k) sum -> + noise, randomness from the OS), releases the canary query
``trials * queries`` times on each, and hands the per-trial statistics to :mod:`.bounds`.

Canary design (:class:`CanaryDesign`), in d = 2 dimensions with e0 = (1, 0):

* the private set WITHOUT the canary holds ``records`` copies of the antipode -e0;
* the set WITH it adds one record, the canary +e0 (last row); the query is +e0.

The canary scores 1 and every other record -1, so whenever the canary is in the subsample it is
the nearest neighbour and pushes one antipode out of the top k -- if the subsample holds at least
k antipodes, which ``records`` is sized for (:func:`worst_case_records`; exactly k when q = 1).
The aggregate then moves from -e0 to (e0 - (k-1) e0)/k: by 2/k along e0, the full L2
sensitivity. So one release is exactly the worst case the accountant assumes: N(0, sigma^2) vs
(1 - q) N(0, sigma^2) + q N(2/k, sigma^2) along e0 (the second coordinate carries only noise).
The optimal test statistic is the projection of each release on e0, summed over a trial's
``queries`` releases (each with a fresh subsample and fresh noise in a correct mechanism).

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
from scipy.stats import binom

from dprdm.audit.bounds import (
    MIN_TRIALS,
    EpsilonLowerBound,
    check_confidence,
    epsilon_lower_bound,
)
from dprdm.errors import InvalidParameterError
from dprdm.privacy import InMemoryLedger, MechanismParams, PrivateRetrieval, accounting
from dprdm.privacy.mechanism import Ledger, PrivateVectors, RankedCandidates, Strategy
from dprdm.retrieval import EmbeddingIndex, build_index, make_searcher

AUDIT_DIM = 2
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


AuditStrategy = Literal["subsample", "exact"]
AUDIT_STRATEGIES: tuple[AuditStrategy, ...] = ("subsample", "exact")


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
    """`records` antipodes -e0 without the canary; the canary +e0 added; query +e0."""

    records: int
    dim: int = AUDIT_DIM

    @property
    def canary(self) -> np.ndarray:
        unit = np.zeros(self.dim, dtype=np.float32)
        unit[0] = 1.0
        return unit

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
    epsilon_claimed: float
    bound: EpsilonLowerBound
    ledger_budget: float
    seconds: float

    @property
    def epsilon_lower_bound(self) -> float:
        return self.bound.epsilon

    @property
    def exceeds_claim(self) -> bool:
        """True when the audit proves (at the bound's confidence) the claim is wrong."""
        return self.bound.epsilon > self.epsilon_claimed

    def as_dict(self) -> dict:
        evidence = self.bound.as_dict()
        for key in ("epsilon", "confidence", "delta"):
            evidence.pop(key)
        return {
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
            **evidence,
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


def _trial_statistics(mechanism: Releaser, design: CanaryDesign, trials: int, queries: int,
                      advance: Callable[[int], None]) -> np.ndarray:
    """Per trial: the sum over its `queries` releases of the projection on the direction.

    Each release call carries a batch of trials (row i = trial i); call t of a batch is every
    trial's t-th query, so a correct mechanism gives every row of every call a fresh subsample
    and fresh noise."""
    totals = np.zeros(trials)
    for start in range(0, trials, AUDIT_BATCH):
        size = min(AUDIT_BATCH, trials - start)
        batch = np.repeat(design.query[None, :], size, axis=0)
        for _ in range(queries):
            released = mechanism.release(batch, caller=AUDIT_CALLER)
            totals[start : start + size] += np.asarray(released, dtype=np.float64) @ design.direction
            advance(size)
    return totals


def _mechanism(make_mechanism: MechanismFactory, index: EmbeddingIndex, params: MechanismParams,
               ledger: InMemoryLedger, strategy: AuditStrategy) -> Releaser:
    if strategy == "subsample":
        return make_mechanism(index, params, ledger, strategy="subsample", searcher=None)
    return make_mechanism(index, params, ledger, strategy="ranked",
                          searcher=make_searcher(index, strategy))


def run_audit(
    params: MechanismParams,
    *,
    trials: int = DEFAULT_TRIALS,
    queries: int = 1,
    delta: float = DEFAULT_DELTA,
    confidence: float = DEFAULT_CONFIDENCE,
    records: int | None = None,
    strategy: AuditStrategy = "subsample",
    make_mechanism: MechanismFactory = PrivateRetrieval,
    ledger: InMemoryLedger | None = None,
    progress: Progress | None = None,
) -> AuditResult:
    """Audit `queries` releases with `params`: the accountant's epsilon beside a lower bound.

    `trials` independent trials run on each neighbouring set; half select the test, half evaluate
    it (see :mod:`.bounds`). `records` (default :func:`worst_case_records`) sets the size of the
    set without the canary. `strategy` is the mechanism's path, as ``dprdm retrieve`` names it:
    "subsample" (draw the subsample, search it) or "exact" (walk the exact searcher's ranked
    list). `ledger` is the in-memory experiment ledger to charge (default: a fresh one sized for
    this audit; passing one lets several audits share its cached capacity). Every parameter is
    checked before anything is built or released."""
    if not isinstance(params, MechanismParams):
        raise InvalidParameterError("params must be a MechanismParams")
    if strategy not in AUDIT_STRATEGIES:
        raise InvalidParameterError(f"strategy must be one of {', '.join(AUDIT_STRATEGIES)}")
    trials = _check_count("trials", trials, 2 * MIN_TRIALS, MAX_TRIALS)
    queries = _check_count("queries", queries, 1, MAX_QUERIES)
    if trials * queries > MAX_RELEASES:
        raise InvalidParameterError(f"trials * queries must be at most {MAX_RELEASES}")
    delta, confidence = accounting.check_delta(delta), check_confidence(confidence)
    if ledger is not None and not isinstance(ledger, InMemoryLedger):
        raise InvalidParameterError("an audit charges an in-memory experiment ledger only")
    if records is None:
        records = worst_case_records(params.k, params.q)
        if records > MAX_RECORDS:
            raise InvalidParameterError(
                f"q={params.q} is too small to audit: the worst-case design needs {records} "
                f"records (at most {MAX_RECORDS}); pass fewer --records for a weaker audit"
            )
    records = _check_count("records", records, 1, MAX_RECORDS)
    design = CanaryDesign(records)
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

    statistics = []
    with tempfile.TemporaryDirectory(prefix="dprdm-audit-") as scratch:
        for name, matrix in (("without", design.without_canary()),
                             ("with", design.with_canary())):
            index = build_index(matrix, Path(scratch) / name)
            mechanism = _mechanism(make_mechanism, index, params, ledger, strategy)
            statistics.append(_trial_statistics(mechanism, design, trials, queries, advance))
    bound = epsilon_lower_bound(statistics[0], statistics[1], delta, confidence)
    return AuditResult(
        params=params,
        queries=queries,
        trials=trials,
        records=records,
        strategy=strategy,
        epsilon_claimed=epsilon_claimed,
        bound=bound,
        ledger_budget=ledger_budget,
        seconds=time.perf_counter() - started,
    )
