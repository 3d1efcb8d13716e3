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
