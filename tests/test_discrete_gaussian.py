"""The exact discrete Gaussian sampler (privacy/discrete_gaussian.py), piece by piece against
exact probabilities, and whole against the exact pmf and against OpenDP's implementation.

Statistical checks use a fixed false-alarm rate of about 1e-7 each (chi-square quantiles, or 5.5
standard errors), with enough draws that a wrong probability of a few percent fails."""

import math
import os

import numpy as np
import pytest
from scipy.stats import chi2

from dprdm.errors import InvalidParameterError
from dprdm.privacy import discrete_gaussian as dg

FALSE_ALARM = 1e-7
Z = 5.5  # two-sided normal quantile of ~4e-8


@pytest.fixture(params=["one-step-passes", "block-passes"])
def passes(request, monkeypatch):
    """Both ways a loop can be drawn: one step per pass (large arrays) and BLOCK steps per pass
    (small ones), each forced for the whole test."""
    monkeypatch.setattr(dg, "SMALL_PASS", 0 if request.param == "one-step-passes" else 10**12)
    return request.param


def _chi_square_ok(observed, probabilities):
    """Goodness of fit of counts to probabilities (cells with < 5 expected merged into the
    last one); returns (passes, statistic, threshold)."""
    observed = np.asarray(observed, dtype=float)
    expected = observed.sum() * np.asarray(probabilities, dtype=float)
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    statistic = float(((obs - exp) ** 2 / exp).sum())
    threshold = float(chi2.isf(FALSE_ALARM, len(exp) - 1))
    return statistic < threshold, statistic, threshold


def _frequency_ok(successes, trials, probability):
    standard_error = math.sqrt(probability * (1 - probability) / trials) or 1 / trials
    return abs(successes / trials - probability) < Z * standard_error


def test_uniform_integers_are_uniform_for_one_bound_and_per_element_bounds():
    draws = dg._uniform_below(7, 70_000)
    assert draws.dtype == np.int64 and draws.min() >= 0 and draws.max() <= 6
    assert _chi_square_ok(np.bincount(draws, minlength=7), np.full(7, 1 / 7))[0]
    bounds = np.repeat(np.array([1, 2, 3, 10]), 30_000)
    draws = dg._uniform_below(bounds, bounds.size)
    assert np.all(draws[bounds == 1] == 0) and np.all(draws < bounds)
    for bound in (2, 3, 10):
        counts = np.bincount(draws[bounds == bound], minlength=bound)
        assert _chi_square_ok(counts, np.full(bound, 1 / bound))[0]


def test_uniform_integers_reject_the_words_below_two_to_the_64_mod_b(monkeypatch):
    # b = 3: 2^64 mod 3 = 1, so the word 0 is rejected (else 0 would be 1/2^64 too likely) and
    # the next word 7 gives 7 mod 3 = 1.
    words = iter([np.array([0], np.uint64).tobytes(), np.array([7], np.uint64).tobytes()])
    monkeypatch.setattr(dg.os, "urandom", lambda n: next(words))
    assert dg._uniform_below(3, 1).tolist() == [1]
    # Per-element bounds 3 and 5 (2^64 mod 3 = 2^64 mod 5 = 1): both words 0 are rejected.
    words = iter([np.array([0, 0], np.uint64).tobytes(), np.array([7, 9], np.uint64).tobytes()])
    monkeypatch.setattr(dg.os, "urandom", lambda n: next(words))
    assert dg._uniform_below(np.array([3, 5], np.int64), 2).tolist() == [1, 4]
    # A bound of 1 draws nothing.
    monkeypatch.setattr(dg.os, "urandom", lambda n: pytest.fail("drew bits for bound 1"))
    assert dg._uniform_below(np.ones(4, np.int64), 4).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("numerator,denominator", [(0, 1), (3, 10), (1, 1), (7, 9)])
def test_bernoulli_exp_minus_gamma_has_probability_exp_minus_gamma(numerator, denominator,
                                                                   passes):
    trials = 200_000
    draws = dg._bernoulli_exp_minus(
        lambda i: dg._bernoulli(numerator, denominator, i.size), trials)
    assert _frequency_ok(draws.sum(), trials, math.exp(-numerator / denominator))


# |Y| values for s = 4 (t = 5, s^2 = 16): w = |5 |Y| - 16|, m = 20, c = ceil(w / m) = 1, 2, 3
# (|Y| = 3, 4, 7, 0: c = 1; 8, 11: c = 2; 12, 15: c = 3). c = 0 cannot occur (s^2 = 1 mod t).
ACCEPTANCE_CASES = [(4, 3), (4, 8), (4, 4), (4, 7), (4, 12), (4, 0), (4, 11), (4, 15),
                    (1000, 1500)]


def _acceptance_probability(magnitude, s):
    return math.exp(-((magnitude - s * s / (s + 1)) ** 2) / (2 * s * s))


@pytest.mark.parametrize("s,magnitude", ACCEPTANCE_CASES)
def test_the_acceptance_test_has_the_papers_probability(s, magnitude, passes):
    trials = 100_000
    accepted = dg._accept(np.full(trials, magnitude, dtype=np.int64), s)
    assert _frequency_ok(accepted.sum(), trials, _acceptance_probability(magnitude, s))


@pytest.mark.parametrize("s,magnitude", ACCEPTANCE_CASES[:5])
def test_the_python_integer_acceptance_test_has_the_same_probability(s, magnitude):
    trials = 20_000
    accepted = sum(dg._accept_in_python_integers(magnitude, s) for _ in range(trials))
    assert _frequency_ok(accepted, trials, _acceptance_probability(magnitude, s))


def test_discrete_laplace_has_its_exact_pmf(passes):
    t, count = 3, 150_000
    draws = dg.discrete_laplace(t, count)
    support = np.arange(-150, 151)
    pmf = np.exp(-np.abs(support) / t)
    pmf /= pmf.sum()
    assert np.all(np.abs(draws) <= 150)  # P(|X| > 150) ~ 2e-22 per draw
    observed = np.bincount(draws - support[0], minlength=support.size)
    ok, statistic, threshold = _chi_square_ok(observed, pmf)
    assert ok, (statistic, threshold)


def _exact_pmf(s, reach):
    support = np.arange(-reach, reach + 1)
    pmf = np.exp(-0.5 * (support / s) ** 2)
    return support, pmf / pmf.sum()


@pytest.mark.parametrize("s", [1, 2, 5])
def test_small_scales_have_the_exact_discrete_gaussian_pmf(s, passes):
    count = 200_000
    draws = dg.discrete_gaussian(s, count)
    assert draws.dtype == np.int64 and draws.shape == (count,)
    support, pmf = _exact_pmf(s, 12 * s)
    assert np.all(np.abs(draws) <= 12 * s)
    observed = np.bincount(draws - support[0], minlength=support.size)
    ok, statistic, threshold = _chi_square_ok(observed, pmf)
    assert ok, (statistic, threshold)


def test_the_pmf_check_tells_a_three_percent_wrong_scale_apart():
    s, count = 5, 200_000
    support, pmf = _exact_pmf(s, 12 * s)
    observed = np.bincount(dg.discrete_gaussian(s, count) - support[0], minlength=support.size)
    assert not _chi_square_ok(observed, _exact_pmf(s * 1.03, 12 * s)[1])[0]


def test_candidates_past_the_int64_range_take_the_python_route_and_keep_the_pmf(monkeypatch):
    s, count = 2, 60_000
    routed = []
    real = dg._accept_in_python_integers

    def recording(magnitude, scale):
        routed.append(magnitude)
        return real(magnitude, scale)

    monkeypatch.setattr(dg, "_int64_limit", lambda scale: 3)  # |Y| >= 3 goes to Python ints
    monkeypatch.setattr(dg, "_accept_in_python_integers", recording)
    draws = dg.discrete_gaussian(s, count)
    assert routed and min(routed) >= 3
    support, pmf = _exact_pmf(s, 24)
    ok, statistic, threshold = _chi_square_ok(
        np.bincount(draws - support[0], minlength=support.size), pmf)
    assert ok, (statistic, threshold)


def _equiprobable_edges(s, bins):
    support, pmf = _exact_pmf(s, 12 * s)
    cdf = np.cumsum(pmf)
    edges = support[np.searchsorted(cdf, np.arange(1, bins) / bins)]
    return edges, np.diff(np.concatenate([[0.0], cdf[edges - support[0]], [1.0]]))


def test_a_large_scale_matches_the_exact_pmf_and_opendps_sampler():
    from dprdm.privacy.noise import _draw_opendp, _opendp_gaussian

    s, count, bins = 6554, 40_000, 20
    ours = dg.discrete_gaussian(s, count)
    theirs = _draw_opendp(_opendp_gaussian(float(s), count), count)
    edges, probabilities = _equiprobable_edges(s, bins)
    counts = [np.bincount(np.searchsorted(edges, x, side="left"), minlength=bins)
              for x in (ours, theirs)]
    assert _chi_square_ok(counts[0], probabilities)[0]
    assert _chi_square_ok(counts[1], probabilities)[0]
    # Two-sample chi-square (homogeneity), bins-1 degrees of freedom.
    pooled = (counts[0] + counts[1]) / 2
    statistic = float((((counts[0] - pooled) ** 2 + (counts[1] - pooled) ** 2) / pooled).sum())
    assert statistic < chi2.isf(FALSE_ALARM, bins - 1)
    assert abs(ours.var() / s**2 - 1) < Z * math.sqrt(2 / count)


def test_every_bit_comes_from_os_urandom_and_there_is_no_seed(monkeypatch):
    default_rng = np.random.default_rng
    for name in ("default_rng", "seed", "random", "randint", "bytes", "standard_normal",
                 "uniform"):  # numpy's own generators are never used
        monkeypatch.setattr(np.random, name, lambda *a, **k: pytest.fail("numpy RNG used"))

    def deterministic_source():
        state = default_rng(11)
        return lambda n: state.bytes(n)

    monkeypatch.setattr(dg.os, "urandom", deterministic_source())
    first = dg.discrete_gaussian(100, 500)
    monkeypatch.setattr(dg.os, "urandom", deterministic_source())
    assert np.array_equal(dg.discrete_gaussian(100, 500), first)  # all randomness went through it
    monkeypatch.setattr(dg.os, "urandom", os.urandom)
    monkeypatch.setattr(dg.secrets, "randbelow", lambda n: pytest.fail("Python route not used"))
    assert not np.array_equal(dg.discrete_gaussian(100, 500), dg.discrete_gaussian(100, 500))
    with pytest.raises(TypeError):
        dg.discrete_gaussian(100, 500, seed=1)


@pytest.mark.parametrize("scale", [0, -3, 1.5, 2**26, True, 10.0])
def test_scales_out_of_range_are_refused(scale):
    with pytest.raises(InvalidParameterError):
        dg.discrete_gaussian(scale, 10)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0, 1.5])
def test_the_production_sampler_refuses_bad_scales_with_a_clear_error(scale):
    from dprdm.privacy.noise import DiscreteGaussian

    with pytest.raises(InvalidParameterError):
        DiscreteGaussian().integers(scale, (3,))
