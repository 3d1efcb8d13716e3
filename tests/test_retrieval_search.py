"""Ranked candidate lists: exact order (score desc, row asc), -1 padding, public-only quantizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dprdm.errors import EmbeddingIndexError, InvalidParameterError
from dprdm.retrieval import (
    EmbeddingIndex,
    ExactSearcher,
    FaissFlatSearcher,
    FaissIVFSearcher,
    PublicQuantizer,
    RankedSearcher,
    build_index,
    exact_top_rows,
    make_searcher,
    train_public_quantizer,
)
from dprdm.retrieval.search import (
    canonical_scores,
    order_by_fast_scores,
    rank_keys,
    rows_from_keys,
    score_error_bound,
    scores_from_keys,
    top_keys,
)

DIM = 32


def brute_force(index: EmbeddingIndex, queries: np.ndarray, depth: int,
                rows: np.ndarray | None = None) -> np.ndarray:
    """Reference: canonical scores of every (or the given) row, ordered by lexsort, -1 padded."""
    rows = np.arange(index.n) if rows is None else np.sort(rows)
    records = index.rows_float32(rows)
    out = np.full((len(queries), depth), -1, np.int64)
    for b in range(len(queries)):
        query = np.broadcast_to(queries[b].astype(np.float32), records.shape)
        scores = canonical_scores(np.ascontiguousarray(query), records)
        order = rows[np.lexsort((rows, -scores))][:depth]
        out[b, : len(order)] = order
    return out


@pytest.fixture(scope="module")
def random_index(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingIndex:
    rng = np.random.default_rng(7)
    return build_index(rng.standard_normal((3000, DIM)), tmp_path_factory.mktemp("r") / "idx")


@pytest.fixture(scope="module")
def tied_index(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingIndex:
    """400 records drawn from 25 distinct vectors: every score is tied many times over."""
    rng = np.random.default_rng(8)
    base = rng.standard_normal((25, DIM))
    return build_index(base[rng.integers(0, 25, 400)], tmp_path_factory.mktemp("t") / "idx")


def queries_for(index: EmbeddingIndex, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((count, DIM)).astype(np.float32)
    queries[0] = index.vectors[5]  # a query equal to a (possibly duplicated) record
    return queries


# --- the ordering primitives ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([-1.5, -0.0, 0.0, 1e-30, 0.25, 0.5, 2.0, -3e38]), min_size=1,
                max_size=30), st.integers(1, 40))
def test_rank_keys_order_is_score_desc_row_asc(values: list[float], depth: int) -> None:
    scores = np.array([values], dtype=np.float32)
    rows = np.arange(len(values), dtype=np.int64)
    keys = top_keys(rank_keys(scores, rows), depth)
    got = rows_from_keys(keys)[0]
    expected = np.lexsort((rows, -scores[0]))[:depth]
    np.testing.assert_array_equal(got[: len(expected)], expected)
    assert (got[len(expected) :] == -1).all()
    decoded = scores_from_keys(keys)[0]
    np.testing.assert_array_equal(decoded[: len(expected)], scores[0, expected] + 0.0)
    assert np.isneginf(decoded[len(expected) :]).all()


def test_canonical_score_depends_only_on_the_pair() -> None:
    rng = np.random.default_rng(0)
    for dim in (1, 7, 512):
        records = rng.standard_normal((300, dim)).astype(np.float32)
        query = rng.standard_normal(dim).astype(np.float32)
        full = canonical_scores(np.tile(query, (300, 1)), records)
        for picked in ([5], [299, 5, 17], list(range(0, 300, 7))):
            part = canonical_scores(np.tile(query, (len(picked), 1)), records[picked])
            np.testing.assert_array_equal(part, full[picked])
        exact = np.array([math.fsum(np.float64(query) * np.float64(r)) for r in records])
        np.testing.assert_allclose(full, exact, rtol=1.2e-7, atol=1e-30)
        # BLAS (the fast filter) stays within the proven bound of the canonical score
        fast = records @ query
        bound = score_error_bound(query[None])[0] * np.sqrt(dim)  # records here are not unit
        assert np.abs(fast.astype(np.float64) - full).max() <= bound


# --- exact search -----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 10, 64])
def test_exact_matches_brute_force(random_index: EmbeddingIndex, depth: int) -> None:
    queries = queries_for(random_index, 9, seed=1)
    got = ExactSearcher(random_index, block_rows=257).ranked_candidates(queries, depth)
    assert got.shape == (9, depth) and got.dtype == np.int64
    np.testing.assert_array_equal(got, brute_force(random_index, queries, depth))
    assert got[0, 0] == 5


@pytest.mark.parametrize("depth", [1, 7, 50, 399, 400])
@pytest.mark.parametrize("block_rows", [7, 65536])
def test_exact_ties_broken_by_ascending_row(tied_index: EmbeddingIndex, depth: int,
                                            block_rows: int) -> None:
    queries = queries_for(tied_index, 6, seed=2)
    got = ExactSearcher(tied_index, block_rows=block_rows).ranked_candidates(queries, depth)
    np.testing.assert_array_equal(got, brute_force(tied_index, queries, depth))
    duplicates_of_5 = np.flatnonzero((tied_index.vectors == tied_index.vectors[5]).all(axis=1))
    assert len(duplicates_of_5) > 1
    head = got[0, : len(duplicates_of_5)]
    np.testing.assert_array_equal(head, duplicates_of_5[: len(head)])


def test_near_ties_within_rounding_error(tmp_path: Path) -> None:
    """Records differing by ~1 ulp: BLAS and faiss may misorder them; the result may not."""
    rng = np.random.default_rng(12)
    base = rng.standard_normal((10, 512)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    near = base[rng.integers(0, 10, 300)]
    nudged = rng.random(near.shape) < 0.05  # move 5% of the components by one ulp
    direction = np.where(rng.random(nudged.sum()) < 0.5, -1, 1).astype(np.float32)
    near[nudged] = np.nextafter(near[nudged], direction)
    index = build_index(near, tmp_path / "idx")
    assert len(np.unique(np.asarray(index.vectors), axis=0)) == 300
    queries = np.concatenate([base[:3], rng.standard_normal((3, 512))]).astype(np.float32)
    reference = brute_force(index, queries, 60)
    exact = ExactSearcher(index, block_rows=11).ranked_candidates(queries, 60)
    np.testing.assert_array_equal(exact, reference)
    for batch in (1, 6):
        np.testing.assert_array_equal(
            FaissFlatSearcher(index).ranked_candidates(queries[:batch], 60), reference[:batch]
        )


def test_exact_top_rows_over_a_subsample(tied_index: EmbeddingIndex) -> None:
    """Any rows, in any order and blocking, rank as in the full index restricted to them."""
    rng = np.random.default_rng(13)
    kept = rng.permutation(np.flatnonzero(rng.random(tied_index.n) < 0.3))
    blocks = [(kept[i : i + 17], tied_index.rows_float32(kept[i : i + 17]))
              for i in range(0, len(kept), 17)]
    queries = queries_for(tied_index, 3, seed=14)
    got = exact_top_rows(queries, blocks, 40)
    np.testing.assert_array_equal(got, brute_force(tied_index, queries, 40, rows=kept))


def test_depth_beyond_n_is_padded(tmp_path: Path) -> None:
    index = build_index(np.random.default_rng(0).standard_normal((5, 4)), tmp_path / "idx")
    queries = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    for searcher in (ExactSearcher(index, block_rows=2), FaissFlatSearcher(index)):
        got = searcher.ranked_candidates(queries, 8)
        assert (got[:, 5:] == -1).all()
        assert sorted(got[0, :5]) == [0, 1, 2, 3, 4]
        np.testing.assert_array_equal(got, brute_force(index, queries, 8))


def test_float16_index_search(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    index = build_index(rng.standard_normal((500, DIM)), tmp_path / "idx", dtype="float16")
    queries = rng.standard_normal((4, DIM)).astype(np.float32)
    exact = ExactSearcher(index, block_rows=100).ranked_candidates(queries, 20)
    np.testing.assert_array_equal(exact, brute_force(index, queries, 20))
    np.testing.assert_array_equal(FaissFlatSearcher(index).ranked_candidates(queries, 20), exact)


def test_removing_a_record_only_removes_it_from_the_ranking(tmp_path: Path,
                                                            tied_index: EmbeddingIndex) -> None:
    """The neighbouring-dataset property the 2/k sensitivity rests on."""
    vectors = np.asarray(tied_index.vectors)
    removed = 5
    smaller = build_index(np.delete(vectors, removed, axis=0), tmp_path / "smaller")
    queries = queries_for(tied_index, 4, seed=4)
    for make in (lambda i: ExactSearcher(i, block_rows=13), FaissFlatSearcher):
        full = make(tied_index).ranked_candidates(queries, 400)
        reduced = make(smaller).ranked_candidates(queries, 399)
        for b in range(len(queries)):
            expected = full[b][full[b] != removed]
            renumbered = np.where(expected > removed, expected - 1, expected)
            np.testing.assert_array_equal(reduced[b], renumbered)


def test_query_and_depth_validation(random_index: EmbeddingIndex) -> None:
    searcher = ExactSearcher(random_index)
    with pytest.raises(InvalidParameterError, match="shape"):
        searcher.ranked_candidates(np.zeros((2, DIM + 1), np.float32), 3)
    with pytest.raises(InvalidParameterError, match="finite"):
        searcher.ranked_candidates(np.full((1, DIM), np.nan, np.float32), 3)
    for depth in (0, -1, True, 2.5):
        with pytest.raises(InvalidParameterError, match="depth"):
            searcher.ranked_candidates(np.zeros((1, DIM), np.float32), depth)
    assert searcher.ranked_candidates(np.zeros((0, DIM), np.float32), 3).shape == (0, 3)
    with pytest.raises(InvalidParameterError):
        ExactSearcher(random_index, block_rows=0)


# --- faiss flat -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 40])  # below and above the BLAS threshold
def test_faiss_flat_identical_to_exact_random(random_index: EmbeddingIndex, batch: int) -> None:
    queries = queries_for(random_index, batch, seed=5)
    exact = ExactSearcher(random_index).ranked_candidates(queries, 25)
    got = FaissFlatSearcher(random_index).ranked_candidates(queries, 25)
    np.testing.assert_array_equal(got, exact)


@pytest.mark.parametrize("batch", [1, 3, 40])
@pytest.mark.parametrize("depth", [1, 9, 120, 400, 450])
def test_faiss_flat_identical_to_exact_with_ties(tied_index: EmbeddingIndex, batch: int,
                                                 depth: int) -> None:
    queries = queries_for(tied_index, batch, seed=6)
    exact = ExactSearcher(tied_index).ranked_candidates(queries, depth)
    got = FaissFlatSearcher(tied_index).ranked_candidates(queries, depth)
    np.testing.assert_array_equal(got, exact)


def test_faiss_flat_all_records_identical(tmp_path: Path) -> None:
    """Every score ties: faiss must be asked for everything before the cut can be trusted."""
    index = build_index(np.ones((300, 8)), tmp_path / "idx")
    queries = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    got = FaissFlatSearcher(index).ranked_candidates(queries, 5)
    np.testing.assert_array_equal(got, [[0, 1, 2, 3, 4]] * 2)


def test_faiss_lowers_blas_threshold(random_index: EmbeddingIndex) -> None:
    FaissFlatSearcher(random_index)
    assert faiss.cvar.distance_compute_blas_threshold == 4 * DIM


# --- public quantizer and IVF -----------------------------------------------------------------


@pytest.fixture(scope="module")
def quantizer(random_index: EmbeddingIndex) -> PublicQuantizer:
    public = np.random.default_rng(99).standard_normal((1200, DIM))
    return train_public_quantizer(public, 12, random_index)


class _CentroidIndex:
    """Just enough of an EmbeddingIndex for brute_force over the centroids."""

    def __init__(self, centroids: np.ndarray) -> None:
        self.centroids, self.n = centroids, len(centroids)

    def rows_float32(self, rows: np.ndarray) -> np.ndarray:
        return self.centroids[rows]


def _centroid_index(quantizer: PublicQuantizer) -> EmbeddingIndex:
    return _CentroidIndex(quantizer.centroids)  # type: ignore[return-value]


def test_ivf_candidates_are_union_of_probed_lists_in_exact_order(
    random_index: EmbeddingIndex, quantizer: PublicQuantizer
) -> None:
    searcher = FaissIVFSearcher(random_index, quantizer, nprobe=3)
    queries = queries_for(random_index, 7, seed=9)
    members = [searcher.list_members(i) for i in range(quantizer.nlist)]
    assert sorted(np.concatenate(members).tolist()) == list(range(random_index.n))
    # each record sits in the list of its canonically nearest centroid (ties: lower list)
    records = random_index.rows_float32(np.arange(random_index.n))
    nearest = brute_force(_centroid_index(quantizer), records, 1)[:, 0]
    for list_no, rows in enumerate(members):
        assert (nearest[rows] == list_no).all()
    got = searcher.ranked_candidates(queries, random_index.n)
    probed = searcher.probed_lists(queries)
    for b in range(len(queries)):
        union = np.concatenate([members[i] for i in probed[b]])
        returned = got[b][got[b] >= 0]
        assert sorted(returned.tolist()) == sorted(union.tolist())
        assert (got[b, len(returned) :] == -1).all()
        np.testing.assert_array_equal(returned, brute_force(random_index, queries[b : b + 1],
                                                            len(union), rows=union)[0])
        # a short depth is the exact prefix of the full candidate ranking
        np.testing.assert_array_equal(searcher.ranked_candidates(queries[b : b + 1], 10)[0],
                                      got[b, :10])


def test_ivf_with_ties_and_all_lists_probed(tied_index: EmbeddingIndex) -> None:
    public = np.random.default_rng(5).standard_normal((300, DIM))
    quantizer = train_public_quantizer(public, 4, tied_index)
    queries = queries_for(tied_index, 5, seed=10)
    for depth in (1, 30, 400, 420):
        searcher = FaissIVFSearcher(tied_index, quantizer, nprobe=4)
        everything = searcher.ranked_candidates(queries, depth)
        np.testing.assert_array_equal(everything, brute_force(tied_index, queries, depth))
    searcher = FaissIVFSearcher(tied_index, quantizer, nprobe=1)
    got = searcher.ranked_candidates(queries, 50)
    probed = searcher.probed_lists(queries)
    for b in range(len(queries)):
        union = searcher.list_members(int(probed[b, 0]))
        expected = brute_force(tied_index, queries[b : b + 1], 50, union)[0]
        np.testing.assert_array_equal(got[b], expected)


def test_quantizer_refuses_private_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    private = rng.standard_normal((200, DIM)) * 3.0
    public = rng.standard_normal((300, DIM))
    for dtype in ("float32", "float16"):
        index = build_index(private, tmp_path / dtype, dtype=dtype)
        # the private matrix itself
        with pytest.raises(InvalidParameterError, match="2/k sensitivity"):
            train_public_quantizer(private, 8, index)
        # a few private rows hidden among public ones (raw, unnormalised)
        mixed = np.concatenate([public[:100], private[[17, 42]], public[100:]])
        with pytest.raises(InvalidParameterError, match="rows 100, 101 equal records"):
            train_public_quantizer(mixed, 8, index)
        # a copy of the stored (normalised, possibly float16) file
        with pytest.raises(InvalidParameterError, match="private"):
            train_public_quantizer(np.load(index.path / "embeddings.npy"), 8, index)
        assert train_public_quantizer(public, 8, index).nlist == 8


def test_quantizer_save_load_and_validation(tmp_path: Path, random_index: EmbeddingIndex,
                                            quantizer: PublicQuantizer) -> None:
    index = build_index(np.asarray(random_index.vectors), tmp_path / "idx")
    quantizer.save(index.path)
    manifest = json.loads((index.path / "quantizer.json").read_text())
    assert manifest["trained_on"] == "public"
    assert (manifest["nlist"], manifest["dim"], manifest["n_train"]) == (12, DIM, 1200)
    loaded = PublicQuantizer.load(index.path)
    np.testing.assert_array_equal(loaded.centroids, quantizer.centroids)
    np.testing.assert_allclose(np.linalg.norm(loaded.centroids, axis=1), 1.0, atol=1e-5)
    assert index.info()["quantizer"]["nlist"] == 12
    assert not [p for p in index.path.iterdir() if p.name.startswith(".")]

    np.save(index.path / "quantizer.npy", quantizer.centroids[:, ::-1].copy())
    with pytest.raises(EmbeddingIndexError, match="does not match"):
        PublicQuantizer.load(index.path)
    (index.path / "quantizer.json").write_text(json.dumps({**manifest, "trained_on": "private"}))
    with pytest.raises(EmbeddingIndexError, match="public"):
        PublicQuantizer.load(index.path)
    with pytest.raises(EmbeddingIndexError, match="no public quantizer"):
        PublicQuantizer.load(tmp_path)

    with pytest.raises(InvalidParameterError, match="nlist"):
        train_public_quantizer(np.ones((3, DIM)), 4, None)
    with pytest.raises(InvalidParameterError, match="nlist"):
        train_public_quantizer(np.ones((3, DIM)), 0, None)
    with pytest.raises(InvalidParameterError, match="dimension"):
        train_public_quantizer(np.ones((30, DIM + 1)), 2, index)
    with pytest.raises(InvalidParameterError, match="zero norm in row 1"):
        train_public_quantizer(np.stack([np.ones(DIM), np.zeros(DIM)]), 1, None)
    with pytest.raises(InvalidParameterError, match="nprobe"):
        FaissIVFSearcher(random_index, quantizer, nprobe=13)


def test_make_searcher(tmp_path: Path, random_index: EmbeddingIndex,
                       quantizer: PublicQuantizer) -> None:
    assert isinstance(make_searcher(random_index, "exact"), ExactSearcher)
    assert isinstance(make_searcher(random_index, "faiss"), FaissFlatSearcher)
    ivf = make_searcher(random_index, "ivf", nprobe=2, quantizer=quantizer)
    assert isinstance(ivf, FaissIVFSearcher) and ivf.nprobe == 2
    for searcher in (make_searcher(random_index, "exact"), ivf):
        assert isinstance(searcher, RankedSearcher) and searcher.n == random_index.n
    with pytest.raises(EmbeddingIndexError, match="no public quantizer"):
        make_searcher(random_index, "ivf")
    with pytest.raises(InvalidParameterError, match="kind"):
        make_searcher(random_index, "hnsw")  # type: ignore[arg-type]


# --- fast paths must give the canonical order bit for bit -------------------------------------


def _tree_by_definition(queries: np.ndarray, records: np.ndarray) -> np.ndarray:
    """The canonical score as defined: exact float64 products, pairwise tree, float32."""
    terms = np.multiply(queries, records, dtype=np.float64)
    while terms.shape[1] > 1:
        half = terms.shape[1] // 2
        paired = terms[:, :half] + terms[:, half : 2 * half]
        if terms.shape[1] % 2:
            paired = np.concatenate([paired, terms[:, 2 * half :]], axis=1)
        terms = paired
    with np.errstate(over="ignore"):
        return terms[:, 0].astype(np.float32)


@pytest.mark.parametrize("dim", [1, 2, 3, 7, 64, 100, 512, 513])
def test_canonical_fast_path_is_bit_identical_to_the_tree(dim: int) -> None:
    rng = np.random.default_rng(dim)
    queries = rng.standard_normal((6000, dim)).astype(np.float32)
    records = rng.standard_normal((6000, dim)).astype(np.float32)
    records[:20] = 0.0  # exact zeros (the sign of zero comes from the tree)
    queries[20:40] *= -1e-20  # products near float32/float64 subnormals
    records[20:40] *= 1e-25
    queries[40:60] *= 1e19  # sums beyond float32 range
    records[40:60] *= 1e20
    records[60:80] = -queries[60:80]  # large cancellation
    records[60:80, 0] += np.float32(1e-3)
    got = canonical_scores(queries, records)
    expected = _tree_by_definition(queries, records)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("dim", [1, 3, 64, 512, 513])
def test_canonical_scores_of_one_query_equal_the_paired_form(dim: int) -> None:
    rng = np.random.default_rng(100 + dim)
    records = rng.standard_normal((3000, dim)).astype(np.float32)
    records[:20] = 0.0
    records[20:40] *= 1e-25
    records[40:60] *= 1e20
    for query in (rng.standard_normal(dim).astype(np.float32), -records[100] * np.float32(1e-20),
                  records[61].copy() * np.float32(1e19)):
        records[60:80] = -query  # large cancellation
        records[60:80, 0] += np.float32(1e-3)
        got = canonical_scores(query, records)
        paired = np.ascontiguousarray(np.broadcast_to(query, records.shape))
        np.testing.assert_array_equal(got.view(np.uint32),
                                      _tree_by_definition(paired, records).view(np.uint32))


def test_canonical_fast_path_at_rounding_midpoints() -> None:
    """Sums exactly on (or 1 ulp64 around) a float32 rounding midpoint go to the tree."""
    ones = np.ones((6, 3), np.float32)
    records = np.array([[1, 2**-24, 0], [1, 3 * 2**-24, 0], [1, -(2**-25), 0],
                        [1, 2**-24, 2**-50], [1, 2**-24, -(2**-50)], [-1, -(2**-24), 0]],
                       np.float32)
    got = canonical_scores(ones, records)
    expected = _tree_by_definition(ones, records)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert got[0] == 1.0 and got[3] > 1.0 and got[4] == 1.0  # ties to even, then nudged


def _near_tied_records(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """Nudged copies (a few components moved by one ulp) and exact duplicates of 6 vectors."""
    base = rng.standard_normal((6, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    records = base[rng.integers(0, 6, count)]
    nudged = rng.random(records.shape) < 0.03
    nudged[: count // 3] = False  # a third stay exact duplicates
    direction = np.where(rng.random(nudged.sum()) < 0.5, -1, 1).astype(np.float32)
    records[nudged] = np.nextafter(records[nudged], direction)
    return records


@pytest.mark.parametrize("seed", range(6))
def test_order_by_fast_scores_against_adversarial_fast_scores(seed: int) -> None:
    """Fast scores anywhere within the error bound (tied, swapped) give the canonical order."""
    rng = np.random.default_rng(seed)
    dim = 64
    records = _near_tied_records(rng, 500, dim)
    records[:40] = rng.standard_normal((40, dim)).astype(np.float32) / np.sqrt(dim)
    query = records[7] if seed % 2 else rng.standard_normal(dim).astype(np.float32)
    query = np.ascontiguousarray(query)
    canonical = canonical_scores(np.broadcast_to(query, records.shape), records)
    bound = float(score_error_bound(query[None])[0])
    true_bound = bound / 1.5  # what a fast evaluation may really be off by
    if seed < 3:  # fast scores collapse canonical differences: all equal within a bucket
        fast = np.floor(canonical / true_bound) * true_bound
    else:  # or scatter anywhere within the bound
        fast = canonical + rng.uniform(-true_bound, true_bound, len(canonical))
    rows = rng.permutation(len(records)) * 3 + 100  # rows unrelated to positions
    handles = np.arange(len(records), dtype=np.int64)

    def resolve(picked: np.ndarray, vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return rows[picked], records[picked] if vectors else None

    expected = rows[np.lexsort((rows, -canonical))]
    for depth in (1, 5, 57, 200, 499, 500, 600):
        got = order_by_fast_scores(query, fast.astype(np.float64), handles, bound, depth, resolve)
        np.testing.assert_array_equal(got, expected[:depth])


def test_ivf_near_ties_and_duplicates_across_probed_lists(tmp_path: Path) -> None:
    """Records tied or 1-ulp apart in score but spread over many lists rank exactly."""
    rng = np.random.default_rng(21)
    dim = 48
    axis = np.zeros(dim, np.float32)
    axis[0] = 1.0
    # every record = 0.6 * axis + a random orthogonal part: nearly the same score for a query
    # close to the axis, but the orthogonal parts send the records to different lists
    rest = rng.standard_normal((700, dim - 1)).astype(np.float32)
    rest *= 0.8 / np.linalg.norm(rest, axis=1, keepdims=True)
    records = np.concatenate([np.full((700, 1), 0.6, np.float32), rest], axis=1)
    records[350:] = records[:350]  # exact duplicates at distant rows
    nudged = rng.random(records.shape) < 0.05
    nudged[:200] = False
    direction = np.where(rng.random(nudged.sum()) < 0.5, -1, 1).astype(np.float32)
    records[nudged] = np.nextafter(records[nudged], direction)
    index = build_index(records, tmp_path / "idx")
    centroids = rng.standard_normal((10, dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    quantizer = PublicQuantizer(centroids=centroids, n_train=10, created="test")
    queries = np.stack([axis, axis + 1e-4 * rng.standard_normal(dim).astype(np.float32),
                        axis + 1e-7 * rng.standard_normal(dim).astype(np.float32),
                        np.asarray(index.vectors[3], np.float32)]).astype(np.float32)
    for nprobe in (1, 3, 10):
        searcher = FaissIVFSearcher(index, quantizer, nprobe=nprobe)
        probed = searcher.probed_lists(queries)
        lists_hit = set()
        for depth in (1, 13, 150, 700):
            got = searcher.ranked_candidates(queries, depth)
            for b in range(len(queries)):
                union = np.concatenate([searcher.list_members(int(i)) for i in probed[b]])
                lists_hit.update(int(i) for i in probed[b])
                expected = brute_force(index, queries[b : b + 1], depth, rows=union)[0]
                np.testing.assert_array_equal(got[b], expected)
                exact = exact_top_rows(queries[b : b + 1],
                                       [(union, index.rows_float32(union))], depth)[0]
                np.testing.assert_array_equal(got[b], exact)
                # a single query sees the same probed lists and order as inside the batch
                np.testing.assert_array_equal(
                    searcher.ranked_candidates(queries[b : b + 1], depth)[0], got[b])
        assert len(lists_hit) >= min(nprobe, 2)


# --- IVF partition: candidate sets for the "probed" strategy -----------------------------------


def test_partition_candidate_sets_are_the_ivf_searchers_probed_lists(
    random_index: EmbeddingIndex, quantizer: PublicQuantizer
) -> None:
    from dprdm.retrieval.partition import IVFPartition

    partition = IVFPartition(random_index, quantizer, nprobe=3)
    searcher = FaissIVFSearcher(random_index, quantizer, nprobe=3)
    queries = queries_for(random_index, 7, seed=12)
    np.testing.assert_array_equal(partition.probed_lists(queries), searcher.probed_lists(queries))
    # the faiss lists were filled from this assignment
    for list_no in range(quantizer.nlist):
        rows = partition.list_members(list_no)
        assert (np.diff(rows) > 0).all()
        faiss_ids = faiss.rev_swig_ptr(searcher._ivf.invlists.get_ids(list_no), len(rows))
        np.testing.assert_array_equal(np.array(faiss_ids, np.int64), rows)
    np.testing.assert_array_equal(np.bincount(partition.assignment, minlength=quantizer.nlist),
                                  partition.list_sizes)
    full_rank = searcher.ranked_candidates(queries, random_index.n)
    for candidates, ranked in zip(partition.candidate_rows(queries), full_rank):
        assert sorted(candidates.tolist()) == sorted(ranked[ranked >= 0].tolist())


def test_partition_refuses_bad_nprobe_and_dimension(
    random_index: EmbeddingIndex, quantizer: PublicQuantizer, tied_index: EmbeddingIndex
) -> None:
    from dprdm.retrieval.partition import IVFPartition

    for nprobe in (0, quantizer.nlist + 1, 2.5, True):
        with pytest.raises(InvalidParameterError, match="nprobe"):
            IVFPartition(random_index, quantizer, nprobe=nprobe)  # type: ignore[arg-type]
    other = PublicQuantizer(np.eye(DIM + 1, dtype=np.float32)[:3], n_train=3, created="")
    with pytest.raises(InvalidParameterError, match="dimension"):
        IVFPartition(tied_index, other)
    with pytest.raises(InvalidParameterError, match="list_no"):
        IVFPartition(random_index, quantizer).list_members(quantizer.nlist)


def test_partition_candidate_sets_change_by_at_most_the_added_record(
    tmp_path: Path, quantizer: PublicQuantizer
) -> None:
    from dprdm.retrieval.partition import IVFPartition

    rng = np.random.default_rng(21)
    records = rng.standard_normal((800, DIM))
    queries = queries_for(build_index(records, tmp_path / "q"), 20, seed=22)
    without = IVFPartition(build_index(records, tmp_path / "without"), quantizer, nprobe=4)
    extra = rng.standard_normal((1, DIM))
    with_record = IVFPartition(build_index(np.concatenate([records, extra]), tmp_path / "with"),
                               quantizer, nprobe=4)
    for a, b in zip(without.candidate_rows(queries), with_record.candidate_rows(queries)):
        assert set(b.tolist()) - set(a.tolist()) <= {800}
        assert set(a.tolist()) <= set(b.tolist())


def test_probed_over_partition_equals_ranked_over_ivf_without_subsampling(
    random_index: EmbeddingIndex, quantizer: PublicQuantizer
) -> None:
    from dprdm.privacy import InMemoryLedger, MechanismParams, PrivateRetrieval
    from dprdm.retrieval.partition import IVFPartition

    params = MechanismParams(1e-3, 1.0, 7)
    queries = queries_for(random_index, 6, seed=23)
    ledger = InMemoryLedger(epsilon=1e6, delta=1e-5)
    probed = PrivateRetrieval(random_index, params, ledger, strategy="probed",
                              searcher=IVFPartition(random_index, quantizer, nprobe=2))
    ranked = PrivateRetrieval(random_index, params, ledger, strategy="ranked",
                              searcher=FaissIVFSearcher(random_index, quantizer, nprobe=2))
    np.testing.assert_array_equal(probed._aggregate(queries), ranked._aggregate(queries))


def test_nearest_centroids_few_and_many_vectors_agree_with_ties() -> None:
    from dprdm.retrieval.partition import FEW_VECTORS, nearest_centroids

    rng = np.random.default_rng(31)
    centroids = rng.standard_normal((40, DIM)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids[7] = centroids[3]  # exact ties: the lower number first
    centroids[20] = centroids[3]
    vectors = rng.standard_normal((3 * FEW_VECTORS, DIM)).astype(np.float32)
    vectors[0] = centroids[3]
    vectors[1] = -centroids[3]
    for count in (1, 3, 5):
        batch = nearest_centroids(vectors, centroids, count)  # vectorised path
        one_by_one = np.concatenate([nearest_centroids(v[None], centroids, count)
                                     for v in vectors])
        np.testing.assert_array_equal(batch, one_by_one)
        np.testing.assert_array_equal(batch, brute_force(_CentroidIndex(centroids), vectors,  # type: ignore[arg-type]
                                                         count))
    assert nearest_centroids(vectors[:1], centroids, 3)[0].tolist() == [3, 7, 20]


def test_ivf_nprobe_can_change_between_calls(
    random_index: EmbeddingIndex, quantizer: PublicQuantizer
) -> None:
    searcher = FaissIVFSearcher(random_index, quantizer, nprobe=2)
    queries = queries_for(random_index, 3, seed=41)
    searcher.nprobe = 5
    assert searcher.partition.nprobe == 5 and searcher.probed_lists(queries).shape == (3, 5)
    fresh = FaissIVFSearcher(random_index, quantizer, nprobe=5)
    np.testing.assert_array_equal(searcher.ranked_candidates(queries, 200),
                                  fresh.ranked_candidates(queries, 200))
    with pytest.raises(InvalidParameterError, match="nprobe"):
        searcher.nprobe = 0
    assert searcher.nprobe == 5


def test_mechanism_refuses_a_partition_of_another_index(
    random_index: EmbeddingIndex, tied_index: EmbeddingIndex, quantizer: PublicQuantizer
) -> None:
    from dprdm.privacy import InMemoryLedger, MechanismParams, PrivateRetrieval
    from dprdm.retrieval.partition import IVFPartition

    public = np.random.default_rng(5).standard_normal((300, DIM))
    other = IVFPartition(tied_index, train_public_quantizer(public, 4, tied_index), nprobe=2)
    ledger = InMemoryLedger(epsilon=1e6, delta=1e-5)
    with pytest.raises(InvalidParameterError, match="another index"):
        PrivateRetrieval(random_index, MechanismParams(0.1, 0.5, 3), ledger, strategy="probed",
                         searcher=other)
    assert ledger.summary().queries == 0
