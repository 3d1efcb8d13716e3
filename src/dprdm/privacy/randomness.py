"""Where the privacy-relevant randomness comes from.

Owns :class:`SystemRandomness`: uniforms and standard normals drawn from the operating system's
entropy pool (``os.urandom``, i.e. getrandom(2)) on every call. It has no seed and no state, so
nothing a user types can reach it. The private mechanism draws its Poisson subsample from it
unless a research caller passes a ``numpy.random.Generator`` (same two methods) for a reproducible
experiment; the CLI and the service never do.

The privacy NOISE does not come from here: floating-point Gaussian noise leaks the low bits of the
aggregate (Mironov 2012), so the release draws an exact discrete Gaussian on a grid
(``noise.py``, ``discrete_gaussian.py``: integer arithmetic on os.urandom bits).
``standard_normal`` stays for the audit's and tests' own use.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np

_TWO_POW_MINUS_53 = 2.0**-53


class Randomness(Protocol):
    """What the mechanism needs from a random source (numpy.random.Generator satisfies it)."""

    def random(self, size: int | tuple[int, ...]) -> np.ndarray: ...

    def standard_normal(self, size: int | tuple[int, ...]) -> np.ndarray: ...


class SystemRandomness:
    """Uniform and Gaussian draws straight from the OS entropy pool. Not seedable, by design."""

    def random(self, size: int | tuple[int, ...]) -> np.ndarray:
        """Uniforms in [0, 1) with 53 random bits each."""
        shape = (size,) if isinstance(size, int) else tuple(size)
        count = math.prod(shape)
        words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) * _TWO_POW_MINUS_53).reshape(shape)

    def standard_normal(self, size: int | tuple[int, ...]) -> np.ndarray:
        """N(0, 1) draws by the Box-Muller transform of OS-entropy uniforms."""
        shape = (size,) if isinstance(size, int) else tuple(size)
        count = math.prod(shape)
        pairs = (count + 1) // 2
        u = self.random(2 * pairs).reshape(2, pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u in (0, 1]: log is finite
        angle = 2.0 * np.pi * u[1]
        normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        return normals[:count].reshape(shape)
