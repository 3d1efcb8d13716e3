"""Poisson subsampling without an O(N) coin flip per record.

The private set D is Poisson-subsampled: every record is kept independently with probability q.
Flipping N coins per query is what the reference does; instead, the gaps between kept records of a
Bernoulli(q) sequence are i.i.d. Geometric(q), so:

* :func:`poisson_subsample` draws the kept rows of ``range(n)`` directly, in O(qN) expected time
  (strategy (a): search only those rows);
* :func:`accepted_ranks` draws the ranks, down a list sorted by distance, of the first k kept
  candidates (strategy (b): with a ranked index, look only ~k/q candidates deep).

Both are distribution-identical to the naive mask; ``tests/test_sampling.py`` checks it against
the mask statistically.
"""

from __future__ import annotations

import math

import numpy as np

from dprdm.privacy.randomness import Randomness


def geometric_gaps(q: float, size: int | tuple[int, ...], rng: Randomness) -> np.ndarray:
    """Geometric(q) draws on {1, 2, ...} (trials up to and including the first success).

    Returned as float64 so that huge gaps (tiny q) cannot overflow; P(G > g) = (1 - q)^g.
    """
    if q >= 1.0:
        return np.ones(size, dtype=np.float64)
    u = rng.random(size)
    # 1 - u lies in (0, 1]; floor(log(1-u) / log(1-q)) + 1 is Geometric(q).
    return np.floor(np.log1p(-u) / math.log1p(-q)) + 1.0


def poisson_subsample(n: int, q: float, rng: Randomness) -> np.ndarray:
    """Sorted row numbers of a Poisson(q) subsample of range(n), in O(qn) expected work."""
    if q >= 1.0:
        return np.arange(n, dtype=np.int64)
    expected = q * n
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    kept: list[np.ndarray] = []
    position = -1.0  # row of the last kept record
    while True:
        rows = position + np.cumsum(geometric_gaps(q, chunk, rng))
        inside = rows[rows < n]
        kept.append(inside)
        if inside.size < rows.size:  # the sequence ran past the end of the set
            break
        position = rows[-1]
    return np.concatenate(kept).astype(np.int64)


def accepted_ranks(batch: int, k: int, q: float, rng: Randomness) -> np.ndarray:
    """(batch, k) 0-based ranks of the first k kept candidates down a distance-sorted list.

    Ranks may exceed the list's length: those neighbours do not exist (zero-filled). Returned as
    int64, clipped to 2**62 so that tiny q cannot overflow.
    """
    ranks = np.cumsum(geometric_gaps(q, (batch, k), rng), axis=1) - 1.0
    return np.minimum(ranks, 2.0**62).astype(np.int64)
