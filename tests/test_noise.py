"""The noise on a grid: the grid's two bounds, exact grid outputs, the discrete Gaussian's
variance, and that the low bits of the aggregate can no longer reach the output."""

import math
from fractions import Fraction

import numpy as np
import pytest

from dprdm.errors import InvalidParameterError
from dprdm.privacy import ArrayVectors, InMemoryLedger, MechanismParams, PrivateRetrieval
from dprdm.privacy.noise import (ARITHMETIC_SHARE, GRID_STEPS_PER_SIGMA, OPENDP_SAMPLER,
                                 SENSITIVITY_SLACK, DiscreteGaussian,
                                 RoundedGaussianFromGenerator, grid_units, noise_grid,
                                 release_on_grid)


def _settings(count, seed=0):
    rng = np.random.default_rng(seed)
    sigmas = np.exp(rng.uniform(math.log(1e-4), math.log(1e3), count))
    ks = rng.integers(1, 200, count)
    dims = rng.integers(1, 4096, count)
    return [(float(s), int(k), int(d)) for s, k, d in zip(sigmas, ks, dims)] + [
        (0.05, 10, 512), (1.0, 20, 512), (0.2, 18, 64), (0.001, 1, 1), (1000.0, 1, 1280)]


@pytest.mark.parametrize("sigma,k,dim", _settings(300))
def test_noise_grid_is_the_largest_power_of_two_within_both_bounds(sigma, k, dim):
    gamma = noise_grid(sigma, k, dim)
    mantissa, _ = math.frexp(gamma)
    assert mantissa == 0.5  # a power of two

    def within(g):
        g = Fraction(g)
        budget = (1 - Fraction(ARITHMETIC_SHARE)) * Fraction(SENSITIVITY_SLACK) * 2 / k
        return g * GRID_STEPS_PER_SIGMA <= Fraction(sigma) and g * g * dim <= budget * budget

    assert within(gamma) and not within(2 * gamma)
    # What the accountant assumes: rounded sensitivity 2/k + gamma sqrt(d) <= (2/k)(1 + slack).
    assert 2 / k + gamma * math.sqrt(dim) <= (2 / k) * (1 + SENSITIVITY_SLACK)
    assert sigma / gamma >= GRID_STEPS_PER_SIGMA


@pytest.mark.parametrize("sigma", [1e-300, 1e300])
def test_unsupported_grids_are_refused_before_anything_is_charged(sigma):
    ledger = InMemoryLedger(epsilon=1e6, delta=1e-5)
    # the accountant's supported range refuses these first; the grid's own limits back it up
    with pytest.raises(InvalidParameterError, match="grid|supported range"):
        PrivateRetrieval(ArrayVectors(np.eye(4)), MechanismParams(sigma, 1.0, 1), ledger)
    assert ledger.summary().queries == 0


def test_discrete_gaussian_has_variance_scale_squared_and_mean_zero():
    scale, count = 1000.0, 60_000  # ~1.5 s of OpenDP draws
    draws = DiscreteGaussian().integers(scale, (count,))
    assert draws.dtype == np.int64 and draws.shape == (count,)
    # Relative std error of the variance is sqrt(2 / count) = 0.58 %: 3 % is over 5 of them.
    assert abs(draws.var() / scale**2 - 1) < 0.03
    assert abs(draws.mean()) < 5 * scale / math.sqrt(count)
    assert not np.array_equal(draws[: count // 2], draws[count // 2 :])


def test_released_noise_has_variance_sigma_squared_through_the_mechanism():
    sigma, d, queries = 0.5, 16, 3000
    vectors = np.eye(d)[:1]
    mech = PrivateRetrieval(ArrayVectors(vectors), MechanismParams(sigma, 1.0, 1),
                            InMemoryLedger(epsilon=1e6, delta=1e-5))
    assert mech.noise_description()["sampler"] == OPENDP_SAMPLER
    released = mech.release(np.repeat(vectors, queries, axis=0))
    gamma = mech.noise_description()["grid"]
    noise = released - gamma * np.rint(vectors[0] / gamma)
    # 48,000 draws: relative std error of the variance 0.65 %.
    assert abs(noise.var() / sigma**2 - 1) < 0.04
    assert np.all(np.abs(noise.mean(axis=0)) < 5 * sigma / math.sqrt(queries))


class ChosenNoise:
    """A sampler that returns chosen integers: the review's 'chosen uniforms', on the grid."""

    name = "chosen"

    def __init__(self, integers):
        self.values = np.asarray(integers, dtype=np.int64)

    def integers(self, scale, shape):
        return self.values[: math.prod(shape)].reshape(shape).copy()


def test_only_the_rounded_aggregate_reaches_the_output():
    sigma, gamma = 0.05, noise_grid(0.05, 10, 8)
    rng = np.random.default_rng(5)
    a1 = rng.uniform(-1, 1, size=(3, 8))
    # Same grid point, different low bits: what the old float release leaked near zero.
    a2 = gamma * np.rint(a1 / gamma) + rng.uniform(-0.49, 0.49, size=a1.shape) * gamma
    assert np.array_equal(grid_units(a1, gamma), grid_units(a2, gamma))
    assert not np.array_equal(a1, a2)
    # Noise chosen to land every coordinate at (or next to) zero, where the old mechanism
    # returned the exact float sum: the outputs are identical grid points.
    for shift in (0, 1, -1, 1000):
        chosen = ChosenNoise(shift - grid_units(a1, gamma).ravel())
        r1 = release_on_grid(a1, sigma, gamma, chosen)
        r2 = release_on_grid(a2, sigma, gamma, chosen)
        assert r1.tobytes() == r2.tobytes()
        assert np.all(r1 == shift * gamma)
    # For contrast, the old float release distinguishes them with the same chosen noise.
    z = -a1 / sigma  # the normal draw that lands a1's coordinates at zero
    old1 = (a1 + sigma * z).astype(np.float32)
    old2 = (a2 + sigma * z).astype(np.float32)
    assert not np.array_equal(old1, old2)


def test_release_with_real_noise_is_a_grid_point_whatever_the_low_bits():
    sigma, gamma = 0.05, noise_grid(0.05, 10, 64)
    rng = np.random.default_rng(6)
    aggregate = rng.uniform(-1, 1, size=(8, 64)) + 2.0**-60  # bits far below the grid
    for sampler in (DiscreteGaussian(), RoundedGaussianFromGenerator(np.random.default_rng(1))):
        released = release_on_grid(aggregate, sigma, gamma, sampler)
        assert released.dtype == np.float64
        units = released / gamma
        assert np.array_equal(units, np.round(units))
        # Exact: int64 -> float64 -> * gamma loses nothing.
        assert np.array_equal(np.rint(units).astype(np.int64).astype(np.float64) * gamma,
                              released)


def test_the_research_sampler_is_reproducible_and_the_production_one_is_not_seedable():
    a = RoundedGaussianFromGenerator(np.random.default_rng(3)).integers(100.0, (50,))
    b = RoundedGaussianFromGenerator(np.random.default_rng(3)).integers(100.0, (50,))
    assert np.array_equal(a, b)
    assert not np.array_equal(DiscreteGaussian().integers(100.0, (50,)),
                              DiscreteGaussian().integers(100.0, (50,)))
    with pytest.raises(TypeError):
        DiscreteGaussian(seed=3)
