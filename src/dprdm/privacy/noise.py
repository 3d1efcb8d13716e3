"""The privacy noise: a fixed power-of-two grid and an exact discrete Gaussian on it.

Owns how a pre-noise aggregate a (float64, per coordinate |a| <= 1) becomes a released vector:

    r = gamma * (round(a / gamma) + Y),   Y ~ discrete Gaussian N_Z(0, s^2 I),
    s = ceil(sigma / gamma)

* :func:`noise_grid` -- the grid gamma: the largest power of two with gamma <= sigma / 1000 and
  gamma * sqrt(d) <= (1 - ARITHMETIC_SHARE) * SENSITIVITY_SLACK * 2 / k. Rounding moves the
  aggregate by at most gamma * sqrt(d) / 2, so the rounded aggregate's L2 sensitivity is at most
  2/k + gamma * sqrt(d) < (2/k) * (1 + SENSITIVITY_SLACK): the sensitivity the accountant uses
  (``MechanismParams.accounted_noise_multiplier``). The last ARITHMETIC_SHARE of the slack covers
  the float64 rounding of the clamp and the sum that produce a (relative error < 1e-13).
* :func:`noise_scale` -- the integer scale s = ceil(sigma / gamma) the sampler is asked for:
  at least the nominal sigma / gamma (so at least the noise the accountant assumes, never
  less: s >= 1000 makes the excess < 0.1 %), and an integer: the exact samplers work on
  integers (OpenDP ~13 % faster than on the 2^-40-denominator rational a float like 6553.6
  becomes; dprdm's takes integers only).
* :class:`DiscreteGaussian` -- the production sampler: the exact discrete Gaussian of
  Canonne, Kamath & Steinke (2020) over int64 vectors. Scales below 2^26 (every grid of a
  usable mechanism) are drawn by ``discrete_gaussian.py`` (the algorithm in numpy integers, every
  bit from ``os.urandom``); larger ones by :class:`OpenDPDiscreteGaussian`, OpenDP's
  implementation (bits from OpenSSL's CTR-DRBG, seeded by the OS). Neither has a seed, so
  nothing a user types can reach them. A large batch is split into chunks drawn on a small
  thread pool (numpy and OpenDP's ``ctypes.CDLL`` calls release the GIL for their work); each
  chunk is i.i.d. N_Z(0, s^2) per coordinate, so the concatenation is too.
* :class:`RoundedGaussianFromGenerator` -- NOT exact, NOT for production: the rounded Gaussian
  round(N(0, s^2)) from a caller's generator (a seeded ``numpy.random.Generator``), for research
  code that needs reproducible runs. Same grid, same output type; its distribution is the
  rounded continuous Gaussian drawn in floating point, which is what the discrete Gaussian
  replaces. The CLI and the service never use it.
* :func:`release_on_grid` -- the release itself: int64 arithmetic, then ONE multiply by gamma
  into float64, which is exact (|units| < 2^53, gamma a power of two). Every output coordinate
  is an exact multiple of gamma and depends on a only through round(a / gamma).

Why the float mechanism it replaces leaked (Mironov 2012) and why the accountant's subsampled
Gaussian still bounds this one: ``docs/privacy.md`` ("Noise on a grid").
"""

from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Protocol

import numpy as np

from dprdm.errors import InvalidParameterError
from dprdm.privacy.discrete_gaussian import EXACT_SAMPLER, MAX_SCALE, discrete_gaussian

# The accountant's sensitivity is (2/k) * (1 + SENSITIVITY_SLACK): 0.1 % for the grid rounding.
SENSITIVITY_SLACK = 1e-3
# The grid is at most this fraction of sigma (>= 1000 grid points per noise std).
GRID_STEPS_PER_SIGMA = 1000
# Share of the slack kept for float64 rounding of the clamp and the sum (not for the grid).
ARITHMETIC_SHARE = 0.01
# Bounds that keep every integer of a release far below 2^53 (exact in int64 and float64): the
# clamped aggregate has |a_j| <= 1, so |round(a_j / gamma)| <= 2^48, and the noise std <= 2^44.
MIN_GRID_EXPONENT = -48
MAX_NOISE_SCALE = 2.0**44

# A batch is split across threads only into chunks of at least this many coordinates. An OpenDP
# call holds the GIL for ~0.3-0.5 ms and releases it for ~22 us per coordinate; the numpy sampler
# holds it for a few hundred small array operations per call, so two threads pay only from large
# batches on (measured on 2 cores: 51,200 coordinates 0.19 s on one thread, 0.23 s on two;
# 1,024,000 coordinates 2.4 s on one, 1.4-2.2 s on two).
MIN_CHUNK_COORDINATES = 128
MIN_CHUNK_COORDINATES_NUMPY = 2**16

OPENDP_SAMPLER = "opendp-discrete-gaussian"
RESEARCH_SAMPLER = "rounded-float-gaussian-from-generator (NOT exact; research only)"


def _grid_fits(gamma: Fraction, sigma: float, k: int, dim: int) -> bool:
    """Both bounds of noise_grid, checked in exact rational arithmetic."""
    budget = (1 - Fraction(ARITHMETIC_SHARE)) * Fraction(SENSITIVITY_SLACK) * 2 / k
    return gamma * GRID_STEPS_PER_SIGMA <= Fraction(sigma) and gamma**2 * dim <= budget**2


def noise_grid(sigma: float, k: int, dim: int) -> float:
    """The grid gamma (a power of two) for noise std `sigma`, k neighbours and dimension `dim`.

    The largest power of two with gamma <= sigma / 1000 and gamma * sqrt(dim) <=
    0.99 * SENSITIVITY_SLACK * 2 / k, both checked exactly (rationals, no square root)."""
    if not (isinstance(sigma, float) and math.isfinite(sigma) and sigma > 0):
        raise InvalidParameterError(f"sigma must be a positive finite float, got {sigma!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidParameterError(f"k must be a positive integer, got {k!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InvalidParameterError(f"dim must be a positive integer, got {dim!r}")
    approximate = min(sigma / GRID_STEPS_PER_SIGMA,
                      (1 - ARITHMETIC_SHARE) * SENSITIVITY_SLACK * 2 / k / math.sqrt(dim))
    exponent = math.frexp(approximate)[1] if approximate > 0 else MIN_GRID_EXPONENT - 1
    # frexp: approximate = m * 2^exponent with m in [0.5, 1); step down until both bounds hold.
    while exponent >= MIN_GRID_EXPONENT and not _grid_fits(Fraction(2) ** exponent, sigma, k, dim):
        exponent -= 1
    if exponent < MIN_GRID_EXPONENT:
        raise InvalidParameterError(
            f"sigma={sigma:g} with k={k}, d={dim} needs a noise grid finer than "
            f"2^{MIN_GRID_EXPONENT}; such a mechanism is not supported")
    gamma = math.ldexp(1.0, exponent)
    if sigma / gamma > MAX_NOISE_SCALE:
        raise InvalidParameterError(
            f"sigma={sigma:g} is {sigma / gamma:.3g} grid steps; at most {MAX_NOISE_SCALE:.3g} "
            "are supported")
    return gamma


def noise_scale(sigma: float, gamma: float) -> int:
    """The sampler's scale in grid steps: ceil(sigma / gamma), an integer >= the nominal
    sigma / gamma (exact: gamma is a power of two, so sigma / gamma is the float sigma with its
    exponent shifted). Rounding UP only adds noise: the accountant's noise multiplier, computed
    from the nominal sigma, stays a lower bound of the true one (docs/privacy.md)."""
    return math.ceil(sigma / gamma)


def available_threads() -> int:
    """Cores this process may run on (the sampler's default thread count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class IntegerNoise(Protocol):
    """Draws an int64 array of the given shape, each value noise of scale (std parameter)
    `scale`; a (B, d) shape is one noise vector per released row. ``name_for(scale)`` names
    the sampler that draws that scale (public: reported with every release)."""

    def name_for(self, scale: float) -> str: ...

    def integers(self, scale: float, shape: tuple[int, ...]) -> np.ndarray: ...


def production_sampler(scale: float) -> str:
    """The name of the sampler :class:`DiscreteGaussian` uses for `scale`."""
    return EXACT_SAMPLER if scale < MAX_SCALE else OPENDP_SAMPLER


@functools.lru_cache(maxsize=1)
def _opendp():
    """OpenDP's prelude, imported once (1-3 s) by the first release at a scale of 2^26 or
    more; never by the usual scales nor by modules that only account."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


@functools.lru_cache(maxsize=64)
def _opendp_gaussian(scale: float, count: int, slot: int = 0):
    """OpenDP's measurement for `count` coordinates at `scale`; one object per thread slot, so
    no measurement is ever invoked by two chunks of one batch at once."""
    dp = _opendp()
    return dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T="i64"), size=count),
                              dp.l2_distance(T="i64"), scale=scale)


_POOL_LOCK = threading.Lock()
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid that created it, pool)


def _thread_pool() -> ThreadPoolExecutor:
    """One process-wide pool, created on first use and again after a fork (a forked child
    inherits the pool object but none of its threads)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=available_threads(),
                                                     thread_name_prefix="dprdm-noise"))
        return _POOL[1]


def chunk_sizes(count: int, threads: int, minimum: int = MIN_CHUNK_COORDINATES) -> list[int]:
    """How a batch of `count` coordinates is split: at most `threads` chunks, none smaller than
    `minimum` (one chunk when count is small), sizes differing by at most 1."""
    parts = max(1, min(threads, count // minimum))
    base, extra = divmod(count, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def _check_threads(threads: int | None) -> int:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise InvalidParameterError(f"threads must be a positive integer, got {threads!r}")
    return threads or available_threads()


def _run_chunks(draws: list, shape: tuple[int, ...]) -> np.ndarray:
    """The chunks' draws, the first in the calling thread and the others on the pool,
    concatenated in chunk order."""
    futures = [_thread_pool().submit(draw) for draw in draws[1:]]
    chunks = [draws[0]()] + [future.result() for future in futures]
    return np.concatenate(chunks).reshape(shape)


class OpenDPDiscreteGaussian:
    """OpenDP's exact discrete Gaussian N_Z(0, scale^2) per coordinate (bits from OpenSSL's
    DRBG, seeded by the OS): one OpenDP call per chunk (:func:`chunk_sizes`), on up to `threads`
    threads. Used by :class:`DiscreteGaussian` from 2^26 on, and as the tests' reference."""

    def __init__(self, *, threads: int | None = None) -> None:
        self.threads = _check_threads(threads)

    def name_for(self, scale: float) -> str:
        return OPENDP_SAMPLER

    def integers(self, scale: float, shape: tuple[int, ...]) -> np.ndarray:
        shape = tuple(int(n) for n in np.atleast_1d(shape))
        sizes = chunk_sizes(math.prod(shape), self.threads)
        # Built here, in the calling thread, one measurement per chunk slot.
        return _run_chunks([functools.partial(_draw_opendp, _opendp_gaussian(float(scale), size,
                                                                             slot), size)
                            for slot, size in enumerate(sizes)], shape)


def _draw_opendp(measurement, count: int) -> np.ndarray:
    """`count` independent draws of one OpenDP measurement (noise added to zeros)."""
    return np.fromiter(measurement(np.zeros(count, dtype=np.int64)), dtype=np.int64, count=count)


class DiscreteGaussian:
    """The production sampler: the exact discrete Gaussian N_Z(0, scale^2) per coordinate from
    OS entropy (see the module docstring): ``discrete_gaussian.py`` below 2^26, in chunks of at
    least 2^16 coordinates on up to `threads` threads (default: the cores available); OpenDP
    (:class:`OpenDPDiscreteGaussian`) from there."""

    name_for = staticmethod(production_sampler)

    def __init__(self, *, threads: int | None = None) -> None:
        self.threads = _check_threads(threads)
        self._opendp = OpenDPDiscreteGaussian(threads=self.threads)

    def integers(self, scale: float, shape: tuple[int, ...]) -> np.ndarray:
        if not math.isfinite(scale):  # refused here: NaN and inf would fall to OpenDP's error
            raise InvalidParameterError(f"the scale must be finite, got {scale!r}")
        if production_sampler(scale) == OPENDP_SAMPLER:
            return self._opendp.integers(scale, shape)
        if not float(scale).is_integer():
            raise InvalidParameterError(f"the scale must be an integer, got {scale!r}")
        shape = tuple(int(n) for n in np.atleast_1d(shape))
        sizes = chunk_sizes(math.prod(shape), self.threads, MIN_CHUNK_COORDINATES_NUMPY)
        return _run_chunks([functools.partial(discrete_gaussian, int(scale), size)
                            for size in sizes], shape)


class RoundedGaussianFromGenerator:
    """round(scale * N(0, 1)) from a caller's generator. NOT an exact discrete Gaussian (it is
    float arithmetic, the very thing the grid exists to avoid); for reproducible research runs
    only. Its variance is scale^2 + 1/12 up to float error."""

    def __init__(self, generator) -> None:
        self._generator = generator

    def name_for(self, scale: float) -> str:
        return RESEARCH_SAMPLER

    def integers(self, scale: float, shape: tuple[int, ...]) -> np.ndarray:
        shape = tuple(int(n) for n in np.atleast_1d(shape))
        normals = np.asarray(self._generator.standard_normal(shape), dtype=np.float64)
        return np.rint(normals.reshape(shape) * scale).astype(np.int64)


def grid_units(aggregates: np.ndarray, gamma: float) -> np.ndarray:
    """round(a / gamma) as int64; exact (gamma is a power of two, |a / gamma| <= 2^48)."""
    aggregates = np.asarray(aggregates, dtype=np.float64)
    return np.rint(aggregates / gamma).astype(np.int64)


def release_on_grid(aggregates: np.ndarray, sigma: float, gamma: float,
                    sampler: IntegerNoise) -> np.ndarray:
    """gamma * (round(a / gamma) + Y) as a fresh float64 array, Y from `sampler` at the integer
    scale :func:`noise_scale` (exact: gamma is a power of two). One sampler call for the whole
    batch."""
    units = grid_units(aggregates, gamma)
    scale = float(noise_scale(sigma, gamma))  # an integer below 2^45: exact as a float
    noise = np.asarray(sampler.integers(scale, units.shape), dtype=np.int64)
    if noise.shape != units.shape:
        raise RuntimeError("the noise sampler returned the wrong number of values")
    return (units + noise).astype(np.float64) * gamma
