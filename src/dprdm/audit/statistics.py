"""Test statistics on whole released vectors, fitted on the selection half of an audit's trials.

Owns the per-trial scores that :func:`dprdm.audit.bounds.epsilon_lower_bound_among` chooses from.
Each trial contributes one vector in R^d (the sum of its releases); a statistic maps it to a
number that should be larger (or smaller) when the canary is in:

* ``projection`` -- the vector's component along the design's direction (the canary's): the
  optimal test when the noise really is N(0, sigma^2 I), and needs no fitting;
* ``linear``     -- Fisher's linear discriminant, (S + ridge I)^-1 (m_with - m_without) . x, with
  the pooled within-set covariance S and the means m fitted on the selection half: the Gaussian
  likelihood ratio for a shift under ANY noise covariance. Noise whose covariance is not sigma^2 I
  (correlated coordinates, one draw copied to all of them) leaves directions in which the two
  sets differ by more than the accountant assumes; this statistic finds them;
* ``quadratic``  -- the Gaussian log-likelihood ratio with each set's own mean and covariance
  (selection half): also sees a change of spread between the two sets.

The ridge (:data:`RIDGE`, relative to the mean variance) keeps a singular covariance -- the copied
draw makes it rank one -- invertible; a direction with no noise then gets a huge weight, which is
the point. Fitting on the selection half keeps the evaluation half untouched (see ``bounds``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RIDGE = 1e-9  # added to the covariance's diagonal, times its mean diagonal (floor TINY)
TINY = 1e-30

Statistic = Callable[[np.ndarray], np.ndarray]  # (n, d) trial vectors -> (n,) scores


def _covariance(centred: np.ndarray) -> np.ndarray:
    covariance = centred.T @ centred / max(1, centred.shape[0] - 1)
    scale = float(np.trace(covariance)) / covariance.shape[0]
    return covariance + (RIDGE * scale + TINY) * np.eye(covariance.shape[0])


def _gaussian_log_density(mean: np.ndarray, covariance: np.ndarray) -> Statistic:
    cholesky = np.linalg.cholesky(covariance)
    half_log_det = float(np.sum(np.log(np.diag(cholesky))))

    def log_density(vectors: np.ndarray) -> np.ndarray:
        whitened = np.linalg.solve(cholesky, (vectors - mean).T)
        return -0.5 * np.sum(whitened * whitened, axis=0) - half_log_det

    return log_density


def fit_statistics(without: np.ndarray, with_: np.ndarray,
                   direction: np.ndarray) -> dict[str, Statistic]:
    """The statistics, fitted on selection-half trial vectors `without` and `with_` (n, d)."""
    direction = np.asarray(direction, dtype=np.float64)
    mean_without, mean_with = without.mean(axis=0), with_.mean(axis=0)
    pooled = _covariance(np.concatenate([without - mean_without, with_ - mean_with]))
    weights = np.linalg.solve(pooled, mean_with - mean_without)
    statistics: dict[str, Statistic] = {
        "projection": lambda vectors: vectors @ direction,
        "linear": lambda vectors: vectors @ weights,
    }
    try:
        density_with = _gaussian_log_density(mean_with, _covariance(with_ - mean_with))
        density_without = _gaussian_log_density(mean_without, _covariance(without - mean_without))
    except np.linalg.LinAlgError:  # a covariance that the ridge could not rescue: skip it
        return statistics
    statistics["quadratic"] = lambda vectors: density_with(vectors) - density_without(vectors)
    return statistics


def scores(statistics: dict[str, Statistic], without: np.ndarray,
           with_: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each statistic's values on (without, with_) trial vectors; statistics that are not finite
    on them (a degenerate fit) are left out."""
    out = {}
    with np.errstate(all="ignore"):
        for name, statistic in statistics.items():
            values = (statistic(without), statistic(with_))
            if all(np.all(np.isfinite(v)) for v in values):
                out[name] = values
    return out
