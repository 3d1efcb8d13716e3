"""The private step: exact k-NN in the subsample, 1/k with zero-fill, 2/k sensitivity, noise,
ledger before release, and nothing but the noised aggregate in the return value."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dprdm.errors import BudgetExceededError, InvalidParameterError
from dprdm.privacy import ArrayVectors, InMemoryLedger, MechanismParams, PrivateRetrieval
from dprdm.privacy.noise import EXACT_SAMPLER, RESEARCH_SAMPLER, noise_grid
from dprdm.privacy.randomness import SystemRandomness

BIG_BUDGET = dict(epsilon=1e6, delta=1e-5)


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class BruteForceSearcher:
    """Ranked candidates by sorting every score: the obviously-correct reference."""

    def __init__(self, vectors):
        self.vectors = vectors

    def ranked_candidates(self, queries, depth):
        out = np.full((len(queries), depth), -1, dtype=np.int64)
        for i, query in enumerate(queries):
            scores = self.vectors @ query
            order = np.lexsort((np.arange(len(scores)), -scores))[:depth]
            out[i, : order.size] = order
        return out


class EveryOtherRow:
    """Candidate sets for the "probed" strategy: the even rows, plus row 1 for queries whose first
    coordinate is negative (a query-dependent set that no k-NN over all rows would give)."""

    def __init__(self, n):
        self.n = n

    def candidate_rows(self, queries):
        even = np.arange(0, self.n, 2)
        return [np.concatenate([even, [1]]) if query[0] < 0 and self.n > 1 else even
                for query in queries]


def mechanism(vectors, sigma=1e-3, q=1.0, k=3, strategy="subsample", rng=None, ledger=None,
              searcher=None):
    vectors = unit(vectors)
    if searcher is None and strategy == "ranked":
        searcher = BruteForceSearcher(vectors)
    if searcher is None and strategy == "probed":
        searcher = EveryOtherRow(len(vectors))
    return PrivateRetrieval(
        ArrayVectors(vectors),
        MechanismParams(sigma, q, k),
        ledger or InMemoryLedger(**BIG_BUDGET),
        strategy=strategy,
        searcher=searcher,
        randomness=rng,
    )


def brute_force_mean(vectors, query, k):
    scores = vectors @ query
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return vectors[order].sum(axis=0) / k


@pytest.mark.parametrize("strategy", ["subsample", "ranked"])
def test_without_subsampling_the_aggregate_is_the_exact_knn_mean(strategy):
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(500, 16)))
    vectors[10] = vectors[11] = vectors[12]  # ties: broken by row number
    queries = np.concatenate([unit(rng.normal(size=(20, 16))), vectors[10:11]])
    mech = mechanism(vectors, q=1.0, k=4, strategy=strategy)
    got = mech._aggregate(queries)
    want = np.stack([brute_force_mean(vectors, query, 4) for query in queries])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_probed_strategy_without_subsampling_is_the_knn_mean_inside_the_candidate_set():
    rng = np.random.default_rng(3)
    vectors = unit(rng.normal(size=(300, 16)))
    vectors[10] = vectors[12] = vectors[14]  # ties among candidates: broken by row number
    queries = np.concatenate([unit(rng.normal(size=(20, 16))), vectors[10:11]])
    got = mechanism(vectors, q=1.0, k=4, strategy="probed")._aggregate(queries)
    for query, aggregate in zip(queries, got):
        rows = np.arange(0, 300, 2) if query[0] >= 0 else np.r_[np.arange(0, 300, 2), 1]
        scores = vectors[rows] @ query
        mean = vectors[rows[np.lexsort((rows, -scores))[:4]]].sum(axis=0) / 4
        np.testing.assert_allclose(aggregate, mean, atol=1e-6)


def test_subsample_strategy_searches_in_blocks(monkeypatch):
    from dprdm.privacy import mechanism as mechanism_module

    monkeypatch.setattr(mechanism_module, "SUBSAMPLE_BLOCK_ROWS", 7)
    rng = np.random.default_rng(1)
    vectors = unit(rng.normal(size=(100, 8)))
    vectors[50:60] = vectors[3]  # ties spanning several blocks
    queries = np.concatenate([unit(rng.normal(size=(5, 8))), vectors[3:4]])
    got = mechanism(vectors, q=1.0, k=5)._aggregate(queries)
    want = np.stack([brute_force_mean(vectors, query, 5) for query in queries])
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("strategy", ["subsample", "ranked", "probed"])
def test_neighbour_sets_have_the_naive_masks_distribution(strategy):
    # One-hot records: k * aggregate reveals exactly which records were averaged.
    n, k, q, trials = 6, 2, 0.45, 20_000
    vectors = np.eye(n, dtype=np.float32)
    query = unit(np.linspace(1.0, 0.5, n))  # record 0 nearest, then 1, ...
    # "probed" searches only its candidate set (the even rows here): mask over those only
    searchable = np.arange(0, n, 2) if strategy == "probed" else np.arange(n)
    rng = np.random.default_rng(7)
    mech = mechanism(vectors, q=q, k=k, strategy=strategy, rng=rng)
    sets = np.rint(mech._aggregate(np.repeat(query[None], trials, axis=0)) * k).astype(int)
    got = {}
    for row in sets:
        key = tuple(np.flatnonzero(row))
        got[key] = got.get(key, 0) + 1
    naive = {}
    for _ in range(trials):
        mask = np.zeros(n, bool)
        mask[searchable] = rng.random(searchable.size) < q  # the naive mask over the candidates
        kept = np.flatnonzero(mask)[:k]  # nearest-first = lowest row here
        naive[tuple(kept)] = naive.get(tuple(kept), 0) + 1
    keys = set(got) | set(naive)
    tv = 0.5 * sum(abs(got.get(key, 0) - naive.get(key, 0)) for key in keys) / trials
    assert tv < 0.03


def test_zero_fill_always_divides_by_k():
    vectors = np.eye(4, dtype=np.float32)[:2]  # 2 records, k = 5
    agg = mechanism(vectors, q=1.0, k=5)._aggregate(unit([[1.0, 1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(agg[0], [0.2, 0.2, 0.0, 0.0], atol=1e-7)


def _aggregate_of(records, mask, query, k):
    kept = records[mask]
    if kept.shape[0] == 0:
        return np.zeros(records.shape[1])
    return mechanism(kept, q=1.0, k=k)._aggregate(query[None])[0]


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 12),
    k=st.integers(1, 6),
    d=st.integers(2, 5),
    seed=st.integers(0, 2**32 - 1),
    removed=st.integers(0, 11),
)
def test_adding_or_removing_one_record_moves_the_aggregate_at_most_2_over_k(n, k, d, seed, removed):
    rng = np.random.default_rng(seed)
    records = unit(rng.normal(size=(n, d)))
    if n > 2:
        records[1] = records[0]  # include ties
    query = unit(rng.normal(size=d))
    mask = rng.random(n) < rng.uniform(0.2, 1.0)  # the same coins for the common records
    removed %= n
    keep = np.ones(n, dtype=bool)
    keep[removed] = False
    with_record = _aggregate_of(records, mask, query, k)
    without_record = _aggregate_of(records[keep], mask[keep], query, k)
    assert np.linalg.norm(with_record - without_record) <= 2.0 / k + 1e-6


def test_noise_has_std_sigma_and_comes_from_os_entropy():
    vectors = unit(np.eye(16)[:1])
    sigma = 0.5
    mech = mechanism(vectors, sigma=sigma, q=1.0, k=1)
    assert isinstance(mech._rng, SystemRandomness)  # the subsample's coins
    assert mech.noise_description() == {"sampler": EXACT_SAMPLER,
                                        "grid": noise_grid(sigma, 1, 16)}
    query = vectors[:1]
    released = mech.release(np.repeat(query, 2000, axis=0))
    noise = released - vectors[0]
    assert abs(noise.std() - sigma) < 0.03 * sigma
    assert np.all(np.abs(noise.mean(axis=0)) < 0.06)
    # Fresh noise every call: two identical queries never get identical releases.
    assert not np.array_equal(mech.release(query), mech.release(query))


@pytest.mark.parametrize("seeded", [False, True])
def test_release_returns_only_a_fresh_float64_array_on_the_grid(seeded):
    vectors = unit(np.random.default_rng(3).normal(size=(50, 8)))
    mech = mechanism(vectors, q=0.5, rng=np.random.default_rng(0) if seeded else None)
    released = mech.release(vectors[:4])
    assert type(released) is np.ndarray
    assert released.dtype == np.float64 and released.shape == (4, 8)
    assert released.base is None and released.flags.owndata
    assert not hasattr(released, "__dict__")
    noise = mech.noise_description()
    assert noise["sampler"] == (RESEARCH_SAMPLER if seeded else EXACT_SAMPLER)
    units = released / noise["grid"]
    assert np.array_equal(units, np.round(units))


class CountingVectors(ArrayVectors):
    def __init__(self, vectors):
        super().__init__(vectors)
        self.reads = 0

    def rows_float32(self, rows):
        self.reads += 1
        return super().rows_float32(rows)


def test_the_ledger_is_charged_before_any_private_read():
    vectors = CountingVectors(unit(np.random.default_rng(4).normal(size=(30, 8))))
    params = MechanismParams(0.05, 0.5, 3)
    ledger = InMemoryLedger(epsilon=1.0, delta=1e-5)
    mech = PrivateRetrieval(vectors, params, ledger)
    with pytest.raises(BudgetExceededError, match="Nothing was charged"):
        mech.release(unit(np.ones((2, 8))))
    assert vectors.reads == 0
    assert ledger.summary().queries == 0


def test_each_query_of_a_batch_is_charged():
    vectors = unit(np.random.default_rng(5).normal(size=(30, 8)))
    ledger = InMemoryLedger(**BIG_BUDGET)
    mech = mechanism(vectors, sigma=0.5, q=0.5, ledger=ledger)
    mech.release(vectors[:7])
    mech.release(vectors[0])
    assert ledger.summary().queries == 8


@pytest.mark.parametrize(
    "queries,match",
    [
        (np.ones((2, 5)), "shape"),
        (np.full((1, 8), np.nan), "not finite"),
        (np.zeros((3, 8)), "zero vectors"),
        (np.ones((0, 8)), "batch"),
        (np.array([["a"] * 8]), "numeric"),
    ],
)
def test_bad_queries_are_refused_before_anything_is_charged(queries, match):
    ledger = InMemoryLedger(**BIG_BUDGET)
    mech = mechanism(unit(np.eye(8)), ledger=ledger)
    with pytest.raises(InvalidParameterError, match=match):
        mech.release(queries)
    assert ledger.summary().queries == 0


@pytest.mark.parametrize("strategy, searcher, match", [
    ("ranked", None, "ranked searcher"),
    ("ranked", EveryOtherRow(3), "ranked searcher"),
    ("probed", None, "candidate sets"),
    ("probed", BruteForceSearcher(np.eye(3)), "candidate sets"),
    ("nearest", None, "unknown strategy"),
])
def test_strategies_refuse_a_missing_or_wrong_searcher(strategy, searcher, match):
    with pytest.raises(InvalidParameterError, match=match):
        PrivateRetrieval(
            ArrayVectors(unit(np.eye(3))), MechanismParams(0.1, 0.5, 1),
            InMemoryLedger(**BIG_BUDGET), strategy=strategy, searcher=searcher,
        )
