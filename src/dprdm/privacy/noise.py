"""The privacy noise: a fixed power-of-two grid and an exact discrete Gaussian on it.

Owns how a pre-noise aggregate a (float64, per coordinate |a| <= 1) becomes a released vector:

    r = gamma * (round(a / gamma) + Y),   Y ~ discrete Gaussian N_Z(0, (sigma / gamma)^2 I)

* :func:`noise_grid` -- the grid gamma: the largest power of two with gamma <= sigma / 1000 and
  gamma * sqrt(d) <= (1 - ARITHMETIC_SHARE) * SENSITIVITY_SLACK * 2 / k. Rounding moves the
  aggregate by at most gamma * sqrt(d) / 2, so the rounded aggregate's L2 sensitivity is at most
  2/k + gamma * sqrt(d) < (2/k) * (1 + SENSITIVITY_SLACK): the sensitivity the accountant uses
  (``MechanismParams.accounted_noise_multiplier``). The last ARITHMETIC_SHARE of the slack covers
  the float64 rounding of the clamp and the sum that produce a (relative error < 1e-13).
* :class:`DiscreteGaussian` -- the production sampler: OpenDP's exact discrete Gaussian
  (Canonne, Kamath, Steinke 2020) over int64 vectors. OpenDP draws its random bits with
  OpenSSL's ``RAND_bytes`` (the wheel is built with OpenDP's ``use-openssl`` feature): NIST
  SP 800-90A CTR-DRBG, seeded and reseeded by OpenSSL from the OS (getrandom). OpenDP exposes
  no seed, so nothing a user types can reach it.
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
from fractions import Fraction
from typing import Protocol

import numpy as np

from dprdm.errors import InvalidParameterError

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


class IntegerNoise(Protocol):
    """Draws an int64 array of the given shape, each value noise of scale (std parameter)
    `scale`; a (B, d) shape is one noise vector per released row."""

    name: str

    def integers(self, scale: float, shape: tuple[int, ...]) -> np.ndarray: ...


@functools.lru_cache(maxsize=1)
def _opendp():
    """OpenDP's prelude, imported once (1-3 s) by the first sampler built, not by the first
    release nor by modules that only account (accounting.py imports this module)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


@functools.lru_cache(maxsize=16)
def _opendp_gaussian(scale: float, count: int):
    dp = _opendp()
    return dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T="i64"), size=count),
                              dp.l2_distance(T="i64"), scale=scale)


class DiscreteGaussian:
    """OpenDP's exact discrete Gaussian N_Z(0, scale^2) per coordinate, from a CSPRNG seeded by
    the OS (see the module docstring). One OpenDP call per batch amortises its overhead."""

    name = OPENDP_SAMPLER

    def __init__(self) -> None:
        _opendp()  # pay the import when the mechanism is built, not inside a release

    def integers(self, scale: float, shape: tuple[int, ...]) -> np.ndarray:
        shape = tuple(int(n) for n in np.atleast_1d(shape))
        count = math.prod(shape)
        measurement = _opendp_gaussian(float(scale), count)
        drawn = np.fromiter(measurement(np.zeros(count, dtype=np.int64)), dtype=np.int64,
                            count=count)
        return drawn.reshape(shape)


class RoundedGaussianFromGenerator:
    """round(scale * N(0, 1)) from a caller's generator. NOT an exact discrete Gaussian (it is
    float arithmetic, the very thing the grid exists to avoid); for reproducible research runs
    only. Its variance is scale^2 + 1/12 up to float error."""

    name = RESEARCH_SAMPLER

    def __init__(self, generator) -> None:
        self._generator = generator

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
    """gamma * (round(a / gamma) + Y) as a fresh float64 array, Y from `sampler` at scale
    sigma / gamma (exact: gamma is a power of two). One sampler call for the whole batch."""
    units = grid_units(aggregates, gamma)
    noise = np.asarray(sampler.integers(sigma / gamma, units.shape), dtype=np.int64)
    if noise.shape != units.shape:
        raise RuntimeError("the noise sampler returned the wrong number of values")
    return (units + noise).astype(np.float64) * gamma
