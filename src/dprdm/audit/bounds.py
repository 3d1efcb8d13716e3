"""Empirical lower bounds on epsilon from a distinguishing experiment.

Owns the statistics of a privacy audit: given the test statistic of many trials run on each of two
neighbouring datasets (``without`` the canary record, ``with_`` it), return an epsilon that the
mechanism provably exceeds unless a 1 - confidence event happened.

The argument (Jagielski et al. 2020; Nasr et al. 2021). For any test "statistic above t => the
canary is in", an (epsilon, delta)-DP mechanism has, under add/remove-one adjacency in BOTH
directions,

    1 - FNR <= e^eps * FPR + delta      and      1 - FPR <= e^eps * FNR + delta,

so eps >= log((1 - delta - FNR) / FPR) and eps >= log((1 - delta - FPR) / FNR). Replacing FPR and
FNR by one-sided Clopper-Pearson upper bounds, each at level (1 - confidence) / 2, makes the result
a lower bound with probability >= confidence (union bound).

The test (which statistic, its orientation, which of the two ratios, threshold) is chosen on a
SELECTION half of the trials and evaluated once on the disjoint EVALUATION half, so the choice
cannot inflate the bound: the evaluation half is touched by exactly one test, whatever was tried
on the selection half, so choosing among several statistics (:func:`epsilon_lower_bound_among`)
needs no further multiple-comparison correction. A statistic fitted to data (a covariance, a mean
difference) must be fitted on the selection half only. Candidate thresholds are every observed
value of the selection half, scored at a stricter level (``SELECT_ALPHA``); Clopper-Pearson bounds
are tabulated once per count, so the search is a few vectorised passes.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from dprdm.errors import InvalidParameterError
from dprdm.privacy.accounting import check_delta

Orientation = Literal["above", "below"]
Ratio = Literal["tpr/fpr", "tnr/fnr"]
MIN_TRIALS = 4  # per dataset: two for each half
# Selection scores each candidate test by its bound at this much stricter level: that favours
# thresholds with enough events to be estimated well over far-tail thresholds that only looked
# good by chance on the selection half (in simulation: same mean, a much thinner lower tail).
SELECT_ALPHA = 1e-5


@dataclass(frozen=True)
class DistinguishingTest:
    """Guess "canary in" when the statistic is above (or below) `threshold`; bound with `ratio`."""

    orientation: Orientation
    ratio: Ratio
    threshold: float


@dataclass(frozen=True)
class EpsilonLowerBound:
    """An empirical lower bound on epsilon and the evidence behind it (evaluation half)."""

    epsilon: float
    test: DistinguishingTest
    statistic: str  # which statistic the selection half chose
    false_positives: int
    false_negatives: int
    evaluation_trials: int  # per dataset
    fpr_upper: float
    fnr_upper: float
    confidence: float
    delta: float

    def as_dict(self) -> dict:
        result = asdict(self)
        result.update({f"test_{key}": value for key, value in result.pop("test").items()})
        return result


def check_confidence(confidence: object) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise InvalidParameterError(f"confidence must be a number, got {confidence!r}")
    if not 0.5 <= float(confidence) < 1.0:
        raise InvalidParameterError(f"confidence must be in [0.5, 1), got {confidence}")
    return float(confidence)


@functools.lru_cache(maxsize=16)
def clopper_pearson_upper(trials: int, alpha: float) -> np.ndarray:
    """Table u[m], m = 0..trials: one-sided (1 - alpha) Clopper-Pearson upper bound on a rate
    of which m events in `trials` were observed (P(rate <= u[m]) >= 1 - alpha)."""
    counts = np.arange(trials + 1, dtype=np.float64)
    table = np.ones(trials + 1)
    from scipy.stats import beta  # imported here: scipy.stats takes seconds to import

    table[:-1] = beta.ppf(1.0 - alpha, counts[:-1] + 1.0, trials - counts[:-1])
    table.setflags(write=False)
    return table


def _log_ratio(numerator_rate_upper: np.ndarray, denominator_rate_upper: np.ndarray,
               delta: float) -> np.ndarray:
    """log((1 - delta - a) / b), -inf where the numerator is not positive."""
    numerator = 1.0 - delta - numerator_rate_upper
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(numerator > 0.0, np.log(numerator) - np.log(denominator_rate_upper),
                        -np.inf)


def _error_counts(without: np.ndarray, with_: np.ndarray, test_orientation: Orientation,
                  thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positives, false negatives) of "canary in iff statistic beyond threshold"."""
    sign = 1.0 if test_orientation == "above" else -1.0
    negatives = np.sort(sign * without)
    positives = np.sort(sign * with_)
    signed = sign * thresholds
    false_positives = negatives.size - np.searchsorted(negatives, signed, side="right")
    false_negatives = np.searchsorted(positives, signed, side="right")
    return false_positives, false_negatives


def _bound(false_positives: np.ndarray, false_negatives: np.ndarray, trials: int,
           ratio: Ratio, alpha_each: float, delta: float) -> np.ndarray:
    upper = clopper_pearson_upper(trials, alpha_each)
    fpr_upper, fnr_upper = upper[false_positives], upper[false_negatives]
    if ratio == "tpr/fpr":
        return _log_ratio(fnr_upper, fpr_upper, delta)
    return _log_ratio(fpr_upper, fnr_upper, delta)


def select_test(without: np.ndarray, with_: np.ndarray, delta: float,
                alpha_each: float = SELECT_ALPHA) -> DistinguishingTest:
    """The test with the best bound on this (selection) data, among both orientations, both
    ratios and every observed value as threshold (plus one beyond each end)."""
    return _select(without, with_, delta, alpha_each)[0]


def _select(without: np.ndarray, with_: np.ndarray, delta: float,
            alpha_each: float = SELECT_ALPHA) -> tuple[DistinguishingTest, float]:
    """select_test and the selection-half bound of the test it picks."""
    values = np.unique(np.concatenate([without, with_]))
    thresholds = np.concatenate([[values[0] - 1.0], values, [values[-1] + 1.0]])
    best = DistinguishingTest("above", "tpr/fpr", float(thresholds[0]))
    best_epsilon = -np.inf
    orientation: Orientation
    ratio: Ratio
    for orientation in ("above", "below"):
        false_positives, false_negatives = _error_counts(without, with_, orientation, thresholds)
        for ratio in ("tpr/fpr", "tnr/fnr"):
            bounds = _bound(false_positives, false_negatives, without.size, ratio, alpha_each,
                            delta)
            i = int(np.argmax(bounds))
            if bounds[i] > best_epsilon:
                best_epsilon = float(bounds[i])
                best = DistinguishingTest(orientation, ratio, float(thresholds[i]))
    return best, best_epsilon


def _checked_pair(without: object, with_: object, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    without = np.asarray(without, dtype=np.float64).ravel()
    with_ = np.asarray(with_, dtype=np.float64).ravel()
    if without.size != with_.size or without.size < minimum:
        raise InvalidParameterError(
            f"need equal numbers (>= {minimum}) of trials on both datasets, "
            f"got {without.size} and {with_.size}"
        )
    if not (np.all(np.isfinite(without)) and np.all(np.isfinite(with_))):
        raise InvalidParameterError("audit statistics must be finite")
    return without, with_


def epsilon_lower_bound(without: np.ndarray, with_: np.ndarray, delta: float,
                        confidence: float = 0.95) -> EpsilonLowerBound:
    """Lower bound on epsilon from per-trial statistics on the two neighbouring datasets.

    `without` and `with_` hold one statistic per independent trial (equal counts). The first half
    of each selects the test, the second half evaluates it. Returns max(0, bound)."""
    without, with_ = _checked_pair(without, with_, MIN_TRIALS)
    half = without.size // 2
    return epsilon_lower_bound_among(
        {"given": (without[:half], with_[:half])}, {"given": (without[half:], with_[half:])},
        delta, confidence,
    )


Scores = tuple[np.ndarray, np.ndarray]  # (without, with) per-trial values of one statistic


def epsilon_lower_bound_among(selection: dict[str, Scores], evaluation: dict[str, Scores],
                              delta: float, confidence: float = 0.95) -> EpsilonLowerBound:
    """Lower bound from the best of several statistics, chosen on selection data only.

    `selection[name]` and `evaluation[name]` are one statistic's values on disjoint trials (the
    statistic itself fitted, if at all, on the selection trials). Every statistic's best test is
    found on its selection values; the statistic whose test bounds best there is evaluated, alone,
    on its evaluation values. Returns max(0, bound) at `confidence`."""
    if not selection or selection.keys() != evaluation.keys():
        raise InvalidParameterError("need the same, non-empty set of statistics on both halves")
    delta, confidence = check_delta(delta), check_confidence(confidence)
    alpha_each = (1.0 - confidence) / 2.0
    chosen, test, chosen_bound = "", DistinguishingTest("above", "tpr/fpr", 0.0), -np.inf
    for name, pair in selection.items():
        candidate, bound = _select(*_checked_pair(*pair, MIN_TRIALS // 2), delta)
        if not chosen or bound > chosen_bound:
            chosen, test, chosen_bound = name, candidate, bound
    evaluation_without, evaluation_with = _checked_pair(*evaluation[chosen], MIN_TRIALS // 2)
    trials = evaluation_without.size
    false_positives, false_negatives = _error_counts(
        evaluation_without, evaluation_with, test.orientation, np.array([test.threshold])
    )
    bound = float(_bound(false_positives, false_negatives, trials, test.ratio, alpha_each,
                         delta)[0])
    upper = clopper_pearson_upper(trials, alpha_each)
    return EpsilonLowerBound(
        epsilon=max(0.0, bound),  # never +inf: a Clopper-Pearson upper bound is > 0
        test=test,
        statistic=chosen,
        false_positives=int(false_positives[0]),
        false_negatives=int(false_negatives[0]),
        evaluation_trials=trials,
        fpr_upper=float(upper[false_positives[0]]),
        fnr_upper=float(upper[false_negatives[0]]),
        confidence=confidence,
        delta=delta,
    )
