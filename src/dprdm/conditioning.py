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
