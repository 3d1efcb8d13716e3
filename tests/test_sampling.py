"""Poisson subsampling by geometric gaps is distribution-identical to the naive Bernoulli mask."""

import numpy as np
import pytest

from dprdm.privacy.randomness import SystemRandomness
from dprdm.privacy.sampling import accepted_ranks, geometric_gaps, poisson_subsample

TRIALS = 40_000


def _naive_mask(n, q, rng):
    return np.flatnonzero(rng.random(n) < q)


def test_per_record_inclusion_frequencies_match_q():
    n, q = 25, 0.3
    rng = np.random.default_rng(1)
    counts = np.zeros(n)
    sizes = np.zeros(n + 1)
    for _ in range(TRIALS):
        rows = poisson_subsample(n, q, rng)
        assert np.all(np.diff(rows) > 0) and (rows.size == 0 or (rows[0] >= 0 and rows[-1] < n))
        counts[rows] += 1
        sizes[rows.size] += 1
    sd = np.sqrt(TRIALS * q * (1 - q))
    assert np.all(np.abs(counts - TRIALS * q) < 5 * sd)
    # Subsample size is Binomial(n, q): compare with the naive mask's empirical distribution.
    naive_sizes = np.bincount(
        [_naive_mask(n, q, rng).size for _ in range(TRIALS)], minlength=n + 1
    )
    tv = 0.5 * np.abs(sizes / TRIALS - naive_sizes / TRIALS).sum()
    assert tv < 0.02


def test_inclusions_are_independent():
    n, q = 6, 0.4
    rng = np.random.default_rng(2)
    joint = np.zeros((n, n))
    for _ in range(TRIALS):
        rows = poisson_subsample(n, q, rng)
        joint[np.ix_(rows, rows)] += 1
    off_diagonal = joint[~np.eye(n, dtype=bool)] / TRIALS
    assert np.all(np.abs(off_diagonal - q * q) < 0.01)


def test_large_sets_have_the_right_expected_size():
    rng = np.random.default_rng(3)
    sizes = [poisson_subsample(1_000_000, 0.001, rng).size for _ in range(200)]
    assert abs(np.mean(sizes) - 1000) < 5 * np.sqrt(1000 / 200)


def test_q_one_keeps_everything():
    assert np.array_equal(poisson_subsample(7, 1.0, np.random.default_rng(0)), np.arange(7))


def test_geometric_gaps_have_the_right_law():
    rng = np.random.default_rng(4)
    q = 0.2
    gaps = geometric_gaps(q, 200_000, rng)
    assert gaps.min() >= 1
    for g in range(1, 6):
        assert abs(np.mean(gaps == g) - (1 - q) ** (g - 1) * q) < 0.005


def test_first_k_accepted_ranks_match_coin_flips_down_a_sorted_list():
    depth, k, q = 8, 3, 0.35
    rng = np.random.default_rng(5)
    fast = accepted_ranks(TRIALS, k, q, rng)
    fast_sets = [tuple(int(r) for r in row if r < depth) for row in fast]
    naive_sets = []
    for _ in range(TRIALS):
        kept = _naive_mask(depth, q, rng)[:k]
        naive_sets.append(tuple(int(r) for r in kept))
    keys = sorted(set(fast_sets) | set(naive_sets))
    fast_p = np.array([fast_sets.count(key) for key in keys]) / TRIALS
    naive_p = np.array([naive_sets.count(key) for key in keys]) / TRIALS
    assert 0.5 * np.abs(fast_p - naive_p).sum() < 0.03


def test_system_randomness_is_uniform_and_normal():
    rng = SystemRandomness()
    u = rng.random(200_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005
    z = rng.standard_normal((400, 501))
    assert z.shape == (400, 501)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    # Two draws never coincide: nothing is cached or reused.
    assert not np.array_equal(rng.standard_normal(16), rng.standard_normal(16))


def test_system_randomness_takes_no_seed():
    with pytest.raises(TypeError):
        SystemRandomness(42)  # type: ignore[call-arg]
