"""The noise on a grid: the grid's two bounds, exact grid outputs, the discrete Gaussian's
variance, and that the low bits of the aggregate can no longer reach the output."""

import ctypes
import math
import threading
from fractions import Fraction

import numpy as np
import pytest

from dprdm.errors import InvalidParameterError
from dprdm.privacy import ArrayVectors, InMemoryLedger, MechanismParams, PrivateRetrieval
from dprdm.privacy import noise as noise_module
from dprdm.privacy.noise import (ARITHMETIC_SHARE, EXACT_SAMPLER, GRID_STEPS_PER_SIGMA,
                                 MIN_CHUNK_COORDINATES, MIN_CHUNK_COORDINATES_NUMPY,
                                 OPENDP_SAMPLER, SENSITIVITY_SLACK, DiscreteGaussian,
                                 RoundedGaussianFromGenerator, chunk_sizes, grid_units,
                                 noise_grid, noise_scale, release_on_grid)


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
    scale, count = 1000.0, 60_000
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
    assert mech.noise_description()["sampler"] == EXACT_SAMPLER
    released = mech.release(np.repeat(vectors, queries, axis=0))
    gamma = mech.noise_description()["grid"]
    noise = released - gamma * np.rint(vectors[0] / gamma)
    # 48,000 draws: relative std error of the variance 0.65 %.
    assert abs(noise.var() / sigma**2 - 1) < 0.04
    assert np.all(np.abs(noise.mean(axis=0)) < 5 * sigma / math.sqrt(queries))


@pytest.mark.parametrize("sigma,k,dim", _settings(300, seed=1))
def test_the_sampled_scale_is_the_smallest_integer_at_least_the_nominal_one(sigma, k, dim):
    gamma = noise_grid(sigma, k, dim)
    scale = noise_scale(sigma, gamma)
    nominal = Fraction(sigma) / Fraction(gamma)  # exact
    assert isinstance(scale, int) and scale - 1 < nominal <= scale
    assert scale >= GRID_STEPS_PER_SIGMA
    # The noise multiplier really applied, over the grid-inflated sensitivity, is at least the
    # one the accountant composes (for mechanisms it supports): rounding the scale up never
    # lowers the noise.
    try:
        accounted = MechanismParams(sigma, 1.0, k).accounted_noise_multiplier
    except InvalidParameterError:
        return  # outside the accountant's supported range: no such mechanism can be built
    slack = 1 + Fraction(SENSITIVITY_SLACK)
    applied = Fraction(scale) * Fraction(gamma) / (Fraction(2, k) * slack)
    assert applied >= Fraction(accounted) * (1 - Fraction(1, 10**12))  # float division's error


class RecordingNoise:
    """Zero noise, remembering the scale it was asked for."""

    name = "recording"

    def __init__(self):
        self.scales = []

    def integers(self, scale, shape):
        self.scales.append(scale)
        return np.zeros(shape, dtype=np.int64)


def test_the_release_asks_the_sampler_for_the_integer_scale():
    sigma, gamma = 0.05, noise_grid(0.05, 10, 512)  # sigma / gamma = 6553.6
    recording = RecordingNoise()
    release_on_grid(np.zeros((2, 512)), sigma, gamma, recording)
    assert recording.scales == [6554.0]


def test_chunk_sizes_split_large_batches_only():
    assert chunk_sizes(64, 2) == [64]
    assert chunk_sizes(2 * MIN_CHUNK_COORDINATES - 1, 8) == [2 * MIN_CHUNK_COORDINATES - 1]
    assert chunk_sizes(512, 2) == [256, 256]
    assert chunk_sizes(1001, 3) == [334, 334, 333]
    assert chunk_sizes(51_200, 1) == [51_200]
    for count, threads in [(1, 4), (5000, 7), (129, 2), (100_000, 16)]:
        sizes = chunk_sizes(count, threads)
        assert sum(sizes) == count and len(sizes) <= threads
        assert max(sizes) - min(sizes) <= 1
        assert len(sizes) == 1 or min(sizes) >= MIN_CHUNK_COORDINATES


def _record_calls(monkeypatch, name):
    calls = []
    real = getattr(noise_module, name)

    def recording(*args):
        calls.append((threading.get_ident(), args[-1]))
        return real(*args)

    monkeypatch.setattr(noise_module, name, recording)
    return calls


def test_a_batch_is_drawn_in_chunks_on_several_threads(monkeypatch):
    # Below 2^26 the numpy sampler, in chunks of at least 2^16 coordinates.
    numpy_calls = _record_calls(monkeypatch, "discrete_gaussian")
    opendp_calls = _record_calls(monkeypatch, "_draw_opendp")
    draws = DiscreteGaussian(threads=2).integers(1000.0, (4, MIN_CHUNK_COORDINATES_NUMPY // 2))
    assert draws.shape == (4, MIN_CHUNK_COORDINATES_NUMPY // 2) and draws.dtype == np.int64
    assert sorted(count for _, count in numpy_calls) == [MIN_CHUNK_COORDINATES_NUMPY] * 2
    assert len({thread for thread, _ in numpy_calls}) == 2 and not opendp_calls
    DiscreteGaussian(threads=2).integers(1000.0, (100, 512))  # 51,200: one chunk, one thread
    assert [count for _, count in numpy_calls[2:]] == [51_200]
    # From 2^26 on, OpenDP, in chunks of at least 128. OpenDP is loaded with ctypes.CDLL (not
    # PyDLL): its calls release the GIL, so the chunks' threads really sample in parallel.
    from opendp import _lib as opendp_library

    assert type(opendp_library.lib) is ctypes.CDLL
    draws = DiscreteGaussian(threads=2).integers(2.0**27, (4, 256))
    assert draws.shape == (4, 256) and len(numpy_calls) == 3
    assert sorted(count for _, count in opendp_calls) == [512, 512]
    assert len({thread for thread, _ in opendp_calls}) == 2
    assert DiscreteGaussian.name_for(2.0**27) == OPENDP_SAMPLER
    assert DiscreteGaussian.name_for(2.0**26 - 1) == EXACT_SAMPLER
    with pytest.raises(InvalidParameterError):
        DiscreteGaussian().integers(1000.5, (4,))


def _discrete_gaussian_bins(scale, bins):
    """Integer bin edges with nearly equal mass under N_Z(0, scale^2) and their exact-enough
    probabilities (the pmf summed over +-12 scale; the tails beyond weigh < 1e-30)."""
    reach = int(12 * scale)
    support = np.arange(-reach, reach + 1)
    pmf = np.exp(-0.5 * (support / scale) ** 2)
    pmf /= pmf.sum()
    cdf = np.cumsum(pmf)
    edges = support[np.searchsorted(cdf, np.arange(1, bins) / bins)]  # right-closed bins
    probabilities = np.diff(np.concatenate([[0.0], cdf[edges + reach], [1.0]]))
    return edges, probabilities


def test_a_batch_split_over_threads_is_the_discrete_gaussian():
    scale, threads = 1000.0, 4
    count = threads * MIN_CHUNK_COORDINATES_NUMPY
    draws = DiscreteGaussian(threads=threads).integers(scale, (count,))
    sizes = chunk_sizes(count, threads, MIN_CHUNK_COORDINATES_NUMPY)
    assert sizes == [MIN_CHUNK_COORDINATES_NUMPY] * 4
    edges, probabilities = _discrete_gaussian_bins(scale, 20)
    observed = np.bincount(np.searchsorted(edges, draws, side="left"), minlength=20)
    expected = count * probabilities
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    # 19 degrees of freedom: P(chi2 > 60) ~ 3e-6.
    assert chi_square < 60, (chi_square, observed.tolist())
    chunks = np.split(draws, np.cumsum(sizes)[:-1])
    for i, chunk in enumerate(chunks):
        # Each chunk alone (65,536 draws): variance within 3 % (5.4 standard errors).
        assert abs(chunk.var() / scale**2 - 1) < 0.03
        for other in chunks[i + 1:]:
            # Independent chunks: no chunk repeats another, correlation within 5.4 std errors.
            assert not np.array_equal(chunk, other)
            assert abs(np.corrcoef(chunk, other)[0, 1]) < 0.021


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
