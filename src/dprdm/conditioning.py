"""Post-processing of released aggregates into the generator's conditioning vector. Free.

c = lam * r + (1 - lam) * x, with r the released (noised) private aggregate and x public
information: the query's own text embedding, or the mean of its k neighbours in a PUBLIC index.
Nothing here reads private data, so nothing here costs privacy.
"""

from __future__ import annotations

import math

import numpy as np

from dprdm.errors import InvalidParameterError


def check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise InvalidParameterError(f"lam must be a finite number, got {lam!r}")
    if not 0.0 <= lam <= 1.0:
        raise InvalidParameterError(f"lam must be in [0, 1], got {lam}")
    return float(lam)


def interpolate(released: np.ndarray, public: np.ndarray, lam: float,
                dtype: type[np.floating] = np.float32) -> np.ndarray:
    """lam * released + (1 - lam) * public, row by row, in `dtype` (float32 for the generator;
    float64 keeps a lam = 1 release exactly on its noise grid)."""
    lam = check_lam(lam)
    released = np.asarray(released, dtype=dtype)
    public = np.asarray(public, dtype=dtype)
    if released.shape != public.shape:
        raise InvalidParameterError(
            f"released {released.shape} and public {public.shape} shapes differ"
        )
    return (lam * released + (1.0 - lam) * public).astype(dtype)


def pool_releases(released: np.ndarray, sigma: float) -> tuple[np.ndarray, float]:
    """Shrink each of a batch's releases towards the batch's mean release; returns the pooled
    releases and the share b in [0, 1] of each release's own deviation that is kept.

    Each release is r_i = a_i + n_i, with a_i the private aggregate and n_i ~ N(0, sigma^2 I_d).
    The positive-part James-Stein estimator towards the grand mean (Lindley 1962) estimates
    every a_i as ``mean + b * (r_i - mean)``, ``b = max(0, 1 - ((P - 1) d - 2) sigma^2 / S)``
    with S the sum of squared deviations from the mean: the releases' spread beyond what the
    noise alone explains is kept, the rest is averaged away. When the aggregates of a batch are
    alike (for a private collection in one style they all lie near its centroid) b is near 0 and
    the batch's noise falls about sqrt(P)-fold; when they differ, b grows towards 1. A batch of
    one release, or sigma = 0, is returned as it is (b = 1). Post-processing of releases with the
    mechanism's public sigma only: free, and nothing private is read.
    """
    released = _check_releases(released, sigma)
    count, dim = released.shape
    if count < 2:
        return released.copy(), 1.0
    mean = released.astype(np.float64).mean(axis=0)
    return _james_stein(released, mean, (count - 1) * dim - 2, sigma)


def shrink_towards(released: np.ndarray, target: np.ndarray,
                   sigma: float) -> tuple[np.ndarray, float]:
    """Shrink a call's releases towards a FIXED target vector (a stored style estimate); returns
    the shrunk releases and the share b in [0, 1] of each release's deviation from the target
    that is kept.

    The positive-part James-Stein estimator towards a fixed point (James & Stein 1961):
    ``target + b * (r_i - target)``, ``b = max(0, 1 - (P d - 2) sigma^2 / S)`` with S the sum of
    squared deviations of the P releases from the target. Unlike :func:`pool_releases` it works
    for one release alone (P d > 2 suffices), which is what a one-prompt call needs. It never
    does worse on average than the raw release as long as the target does not depend on this
    call's noise: a target built from earlier, already charged releases qualifies. sigma = 0
    returns the releases as they are (b = 1). Post-processing with the public sigma: free.
    """
    released = _check_releases(released, sigma)
    target = np.asarray(target)
    if target.shape != (released.shape[1],) or not np.all(np.isfinite(target)):
        raise InvalidParameterError(f"target must be a finite vector of length "
                                    f"{released.shape[1]}, got shape {target.shape}")
    count, dim = released.shape
    return _james_stein(released, target.astype(np.float64), count * dim - 2, sigma)


def _check_releases(released: np.ndarray, sigma: float) -> np.ndarray:
    released = np.asarray(released)
    if released.ndim != 2:
        raise InvalidParameterError(f"released must be (P, d), got shape {released.shape}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(
            sigma) or sigma < 0:
        raise InvalidParameterError(f"sigma must be a finite number >= 0, got {sigma!r}")
    return released


def _james_stein(released: np.ndarray, centre: np.ndarray, degrees: int,
                 sigma: float) -> tuple[np.ndarray, float]:
    """``centre + b * (r_i - centre)`` with ``b = max(0, 1 - degrees sigma^2 / S)``, S the summed
    squared deviations; the releases as they are (b = 1) when sigma = 0 or degrees <= 0."""
    if sigma == 0 or degrees <= 0:
        return released.copy(), 1.0
    deviations = released.astype(np.float64) - centre
    spread = float(np.sum(deviations * deviations))
    kept = 0.0 if spread == 0 else max(0.0, 1.0 - degrees * sigma**2 / spread)
    return (centre + kept * deviations).astype(released.dtype), kept


def noise_ratio(sigma: float, k: int, dim: int) -> dict:
    """How much the privacy noise weighs against the signal in a d-dimensional release.

    The aggregate (1/k) * sum of k unit vectors has norm <= 1 (1 only when the k neighbours
    coincide); the noise N(0, sigma^2 I_d) has expected norm sigma * sqrt(2) * Gamma((d+1)/2) /
    Gamma(d/2), about sigma * sqrt(d). So the same sigma drowns far more at d = 1280 than at 64.
    ``ratio`` = noise norm / 1 is therefore a LOWER bound on the noise-to-signal ratio, and
    ``cosine_at_best`` = 1 / sqrt(1 + ratio^2) the expected cosine between release and a
    unit-norm aggregate (smaller when the aggregate is shorter). k enters through the privacy
    cost only: the sensitivity is 2/k, so at fixed noise multiplier sigma = multiplier * 2/k.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidParameterError(f"k must be a positive integer, got {k!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InvalidParameterError(f"dim must be a positive integer, got {dim!r}")
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise InvalidParameterError(f"sigma must be a finite number >= 0, got {sigma!r}")
    mean_norm = sigma * math.sqrt(2.0) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))
    return {"sigma": float(sigma), "k": k, "dim": dim, "sensitivity": 2.0 / k,
            "noise_multiplier": sigma * k / 2.0, "noise_norm": sigma * math.sqrt(dim),
            "noise_norm_mean": mean_norm, "signal_norm_max": 1.0,
            "ratio": sigma * math.sqrt(dim),
            "cosine_at_best": 1.0 / math.sqrt(1.0 + sigma * sigma * dim)}
