"""Ranked candidate lists over an embedding index: the search the private mechanism calls.

A searcher answers ``ranked_candidates(queries, depth)``: for every query, the row numbers of the
`depth` records with the largest inner product, in descending order of score, ties broken by
ascending row number, padded with -1 where fewer than `depth` candidates exist. The private
mechanism walks this list and keeps the records of its Poisson subsample, so the order is part of
its privacy argument.

The score is CANONICAL: float32(tree sum in float64 of the exact float64 products q_i * x_i), a
fixed function of the query and the one record. BLAS and faiss scores are not: the same pair can
round differently depending on where the record sits in a block (we saw duplicate records get
different scores), so removing one record could reorder others. Fast scores are therefore only a
filter: any float32 evaluation of a d-term dot product is within gamma_d * |q| * |x| of the true
value (gamma_d = d u / (1 - d u), u = 2^-24, any summation order, FMA or not), so every record that
can reach the top `depth` under the canonical score is kept by a margin of a few such bounds, and
only the survivors that could be misordered are re-scored canonically: sorted by fast score, two
records more than twice the bound apart are already in canonical order, so only runs of near ties
(neighbours within twice the bound) are re-scored and ordered by (-score, +row). The result is the
exact canonical order, the same for every searcher, and a record's rank against another never
depends on third records -- which is what the 2/k sensitivity (one neighbour swaps) rests on.

* :class:`ExactSearcher`     -- numpy block matmul over the memmap; any N, bounded memory.
* :class:`FaissFlatSearcher` -- faiss ``IndexFlatIP``; same result, faster for query batches.
* :class:`FaissIVFSearcher`  -- faiss ``IndexIVFFlat`` whose coarse quantizer was trained on
  PUBLIC vectors only (:func:`train_public_quantizer`). A query's candidate set is the union of its
  `nprobe` probed lists. Each record's list must depend only on that record and the centroids, so
  records are assigned (once, at build) by the canonical score against the public centroids, ties
  to the lower list number. The probed lists must depend only on the query, the public centroids
  and nprobe -- nothing private -- so any deterministic rule would do privacy-wise; we keep the
  canonical one (fast float32 scores, with only the centroids within twice the error bound of the
  nprobe-th re-scored canonically, which costs one SIMD pass over the centroids) because it also
  makes the probed set independent of the batch a query arrives in (faiss's BLAS and SIMD paths
  round differently). Adding or removing one record changes the candidate set by at most that
  record, and the 2/k argument still holds. A quantizer trained on private vectors would make the
  candidate set depend on many private records at once, which is why that is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import faiss
import numpy as np
import numpy.typing as npt

from dprdm.errors import EmbeddingIndexError, InvalidParameterError
from dprdm.retrieval.store import (
    QUANTIZER_CENTROIDS_FILE,
    QUANTIZER_MANIFEST_FILE,
    EmbeddingIndex,
    check_matrix,
    describe_bad_rows,
    describe_rows,
    fsync_directory,
    normalize_rows,
    rows_per_block,
    to_storage_rows,
    utc_now,
    write_bytes_durably,
)

if TYPE_CHECKING:
    from dprdm.retrieval.partition import IVFPartition

SearcherKind = Literal["exact", "faiss", "ivf"]
DEFAULT_NPROBE = 8

# ExactSearcher keeps (queries x block rows) score matrices below this many elements (~16 MB of
# float32 scores plus 32 MB of sort keys).
SCORE_BLOCK_ELEMENTS = 2**22

# faiss switches from its per-query SIMD scan to BLAS sgemm when (queries x dim) reaches
# faiss.cvar.distance_compute_blas_threshold (default 128000, i.e. 250 queries at d=512).
# Measured here (faiss-cpu 1.15.1, 1 thread, N=100k, top-64, ms per query, SIMD -> BLAS):
#   d=512: 1 query 15.6 -> 43.3, 2: 15.2 -> 18.8, 3: 15.4 -> 14.0, 4: 15.5 -> 9.9,
#          8: 14.9 -> 5.3, 32: 15.2 -> 1.9 (8x), 64: 15.2 -> 1.3 (12x)
#   d=128: 1 query 2.06 -> 7.77, 3: 1.96 -> 2.14, 4: 1.95 -> 1.67, 8: 2.01 -> 1.05, 32: 2.0 -> 0.49
# BLAS wins from about 4 queries at either dimension, so the threshold is 4 x dim.
BLAS_MIN_QUERIES = 4

# FaissIVFSearcher copies a list into faiss at most this many rows at a time.
IVF_ADD_ROWS = 65536

# Extra results asked of faiss beyond `depth`, so that ties at the cut can be detected.
FAISS_SLACK = 8

# Canonical re-scoring works on at most this many float64 products at a time (32 MB).
RESCORE_ELEMENTS = 2**22

# Stored rows are unit vectors; float16 rounding can lengthen them by ~5e-4. The error bounds below
# assume every stored row has norm at most this.
RECORD_NORM_BOUND = 1.01

_UNIT_ROUNDOFF = 2.0**-24
# Products below the smallest normal float32 lose relative precision (or are flushed to zero).
_UNDERFLOW_PER_TERM = 2.0**-125
# The fast scores are trusted only up to this multiple of the proven error bound.
_SAFETY = 1.5


# --------------------------------------------------------------------------------------------
# The protocol, the canonical score and the exact ordering
# --------------------------------------------------------------------------------------------


@runtime_checkable
class RankedSearcher(Protocol):
    """What the private mechanism needs from a search backend."""

    n: int  # records searchable

    def ranked_candidates(
        self, queries: npt.NDArray[np.float32], depth: int
    ) -> npt.NDArray[np.int64]:
        """(B, depth) row numbers by descending inner product, ties by ascending row, -1 padded."""
        ...


_LOW32 = np.uint64(0xFFFFFFFF)
_PAD_KEY = np.uint64(0)


def _tree_scores(queries: npt.NDArray[np.float32],
                 records: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The canonical score by its definition: exact float64 products, fixed pairwise tree."""
    terms = np.multiply(queries, records, dtype=np.float64)
    width = terms.shape[1]
    while width > 1:  # in place: [a0+a_h, a1+a_{h+1}, ...] (+ the odd last term), as defined
        half = width // 2
        np.add(terms[:, :half], terms[:, half : 2 * half], out=terms[:, :half])
        if width % 2:
            terms[:, half] = terms[:, width - 1]
        width = half + width % 2
    return terms[:, 0].astype(np.float32)


def canonical_scores(
    queries: npt.NDArray[np.float32], records: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Row-wise inner products <queries[i], records[i]>, computed the one canonical way.

    The float64 products of float32 values are exact; they are summed by a fixed pairwise tree of
    element-wise float64 additions and the sum S is rounded to float32. Every operation is
    element-wise, so the value depends only on the two vectors -- not on the batch, the block, the
    position of the record or the BLAS library.

    Fast path, bit-identical: any float64 evaluation v of the sum (here einsum, any order) and the
    tree sum S both lie within gamma_d(float64) * sum|q_i x_i| <= gamma_d * |q| * |x| of the exact
    sum, so |v - S| <= e = 2 gamma_d |q| |x| (doubled again for the float32 norms and the rounding
    of v +- e). Rounding to nearest is monotone, so when float32(v - e) == float32(v + e) (and is
    not zero, whose sign the tree decides) that value IS float32(S). The rare rest (S within ~1e-13
    relative of a float32 rounding boundary, zeros, overflow) is summed by the tree itself.

    A 1-D `queries` is one query scored against every record (the same values, without
    materialising the pairs).
    """
    queries = np.asarray(queries, dtype=np.float32)
    records = np.asarray(records, dtype=np.float32)
    one_query = queries.ndim == 1
    out = np.empty(len(records), np.float32)
    dim = max(1, records.shape[1])
    gamma64 = dim * 2.0**-53 / (1 - dim * 2.0**-53)
    norm_floor = np.sqrt(dim) * 2.0**-74  # float32 squares below ~2^-149 vanish
    step = max(1, RESCORE_ELEMENTS // dim)
    with np.errstate(over="ignore", invalid="ignore"):
        if one_query:
            query_norm = np.sqrt(np.float64(np.dot(queries, queries))) + norm_floor
        for start in range(0, len(records), step):
            x = records[start : start + step]
            if one_query:
                q = queries
                value = np.einsum("ij,j->i", x, q, dtype=np.float64)
                q_norms = query_norm
            else:
                q = queries[start : start + step]
                value = np.einsum("ij,ij->i", q, x, dtype=np.float64)
                q_norms = np.sqrt(np.einsum("ij,ij->i", q, q).astype(np.float64)) + norm_floor
            norms = q_norms * (np.sqrt(np.einsum("ij,ij->i", x, x).astype(np.float64)) + norm_floor)
            slack = 4.0 * gamma64 * 1.01 * norms + 2.0**-1000
            low = (value - slack).astype(np.float32)
            high = (value + slack).astype(np.float32)
            settled = (low == high) & (low != 0) & np.isfinite(low)
            part = out[start : start + step]
            part[:] = low
            unsettled = np.flatnonzero(~settled)
            if unsettled.size:
                pairs = (np.broadcast_to(q, (unsettled.size, dim)) if one_query
                         else q[unsettled])
                part[unsettled] = _tree_scores(pairs, x[unsettled])
    return out


def score_error_bound(queries: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Per query, a bound on |fast float32 score - canonical score| for any stored record.

    |fast - exact| <= gamma_d(float32) * |q| * |x| plus underflow, |canonical - exact| <=
    (gamma_d(float64) + u) * |q| * |x|; |x| <= RECORD_NORM_BOUND; times a safety factor.
    """
    dim = queries.shape[1]
    gamma32 = dim * _UNIT_ROUNDOFF / (1 - dim * _UNIT_ROUNDOFF)
    gamma64 = dim * 2.0**-53 / (1 - dim * 2.0**-53)
    norms = np.sqrt(np.einsum("ij,ij->i", queries, queries, dtype=np.float64))
    relative = gamma32 + gamma64 + 1.01 * _UNIT_ROUNDOFF
    return _SAFETY * (relative * norms * RECORD_NORM_BOUND + dim * _UNDERFLOW_PER_TERM)


def rank_keys(
    scores: npt.NDArray[np.float32], rows: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint64]:
    """Pack (score, row) into one uint64 whose descending order is (-score, +row) order.

    The high 32 bits are the float32 score mapped to an order-preserving unsigned integer, the low
    32 bits are (2^32 - 1 - row). Every key of a real record is > 0; 0 is the padding key. Equal
    scores (including +0.0 and -0.0) get equal high bits, so ties fall to the row number.
    """
    scores = np.asarray(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    bits = scores.view(np.uint32).astype(np.uint64)
    negative = (bits >> np.uint64(31)) == 1
    ordered = np.where(negative, bits ^ _LOW32, bits | np.uint64(0x80000000))
    row_part = _LOW32 - np.asarray(rows).astype(np.uint64)
    return (ordered << np.uint64(32)) | row_part


def rows_from_keys(keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """Inverse of :func:`rank_keys` for the row part; padding keys become -1."""
    rows = (_LOW32 - (keys & _LOW32)).astype(np.int64)
    rows[keys == _PAD_KEY] = -1
    return rows


def scores_from_keys(keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    """Inverse of :func:`rank_keys` for the score part; padding keys become -inf."""
    ordered = (keys >> np.uint64(32)).astype(np.uint32)
    positive = (ordered >> np.uint32(31)) == 1
    bits = np.where(positive, ordered & np.uint32(0x7FFFFFFF), ordered ^ np.uint32(0xFFFFFFFF))
    scores = bits.astype(np.uint32).view(np.float32).astype(np.float64)
    scores[keys == _PAD_KEY] = -np.inf
    return scores


def top_keys(keys: npt.NDArray[np.uint64], depth: int) -> npt.NDArray[np.uint64]:
    """The `depth` largest keys of every row, in descending order, padded with 0 to `depth`.

    Keys of real records are distinct (they embed the row number), so the selection is exact.
    """
    batch, width = keys.shape
    if width > depth:
        cut = np.argpartition(keys, width - depth, axis=1)[:, width - depth :]
        keys = np.take_along_axis(keys, cut, axis=1)
    keys = np.sort(keys, axis=1)[:, ::-1]
    if keys.shape[1] < depth:
        keys = np.concatenate([keys, np.zeros((batch, depth - keys.shape[1]), np.uint64)], axis=1)
    return np.ascontiguousarray(keys)


def _padded_by_query(query_of: npt.NDArray[np.intp], keys: npt.NDArray[np.uint64],
                     batch: int) -> npt.NDArray[np.uint64]:
    """Scatter keys grouped by ascending query number into a (batch, widest group) matrix."""
    counts = np.bincount(query_of, minlength=batch)
    padded = np.zeros((batch, int(counts.max(initial=0))), np.uint64)
    starts = np.cumsum(counts) - counts
    padded[query_of, np.arange(len(query_of)) - starts[query_of]] = keys
    return padded


def check_queries(queries: npt.ArrayLike, dim: int) -> npt.NDArray[np.float32]:
    """`queries` as a C-contiguous (B, dim) float32 array of finite values."""
    array = np.asarray(queries)
    if array.ndim != 2 or array.shape[1] != dim:
        raise InvalidParameterError(f"queries must have shape (B, {dim}), got {tuple(array.shape)}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InvalidParameterError(f"queries must hold real numbers, got dtype {array.dtype}")
    with np.errstate(over="ignore"):
        array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InvalidParameterError("queries must be finite (after conversion to float32)")
    return array


def check_depth(depth: object) -> int:
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise InvalidParameterError(f"depth must be a positive integer, got {depth!r}")
    return int(depth)


def _check_scores(scores: npt.NDArray[np.float32]) -> None:
    if not np.isfinite(scores).all():
        raise InvalidParameterError("a query produced non-finite scores (is its norm huge?)")


def fast_scores(queries: npt.NDArray[np.float32],
                block: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """(B, rows) float32 inner products, any summation order (within the error bound).

    Below BLAS_MIN_QUERIES queries, faiss's single-threaded SIMD kernel per query: a BLAS gemv
    here would wake a thread pool, which on a busy machine costs far more than the product.
    """
    if len(queries) >= BLAS_MIN_QUERIES or len(block) == 0:
        return queries @ block.T
    block = np.ascontiguousarray(block, dtype=np.float32)
    out = np.empty((len(queries), len(block)), np.float32)
    for i, query in enumerate(np.ascontiguousarray(queries, dtype=np.float32)):
        faiss.fvec_inner_products_ny(faiss.swig_ptr(out[i]), faiss.swig_ptr(query),
                                     faiss.swig_ptr(block), block.shape[1], len(block))
    return out


def merge_block(best: npt.NDArray[np.uint64], queries: npt.NDArray[np.float32],
                bound: npt.NDArray[np.float64], rows: npt.NDArray[np.int64],
                block: npt.NDArray[np.float32]) -> npt.NDArray[np.uint64]:
    """Fold one block of records (row numbers `rows`) into the running top-`depth` keys.

    A record is re-scored canonically only if its fast score is within the error margin of both
    the block's own depth-th fast score and the running depth-th canonical score; any other record
    is provably beaten by `depth` records and cannot enter the result.
    """
    depth = best.shape[1]
    scores = fast_scores(queries, block)  # float32, the filter
    _check_scores(scores)
    width = scores.shape[1]
    limit = scores_from_keys(best[:, depth - 1]) - bound
    if width > depth:
        kth = np.partition(scores, width - depth, axis=1)[:, width - depth].astype(np.float64)
        limit = np.maximum(limit, kth - 2 * bound)
    query_of, column = np.nonzero(scores >= limit[:, None])
    if query_of.size == 0:
        return best
    canonical = canonical_scores(queries[query_of], block[column])
    keys = rank_keys(canonical, rows[column])
    merged = np.concatenate([best, _padded_by_query(query_of, keys, len(queries))], axis=1)
    return top_keys(merged, depth)


Blocks = Iterable[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]


def exact_top_keys(queries: npt.NDArray[np.float32], blocks: Blocks,
                   depth: int) -> npt.NDArray[np.uint64]:
    """Canonical top-`depth` keys of each query over the records yielded as (rows, block)."""
    bound = score_error_bound(queries)
    best = np.zeros((len(queries), depth), np.uint64)
    for rows, block in blocks:
        rows = np.asarray(rows, dtype=np.int64)
        chunk = max(1, SCORE_BLOCK_ELEMENTS // max(1, len(block)))
        for q0 in range(0, len(queries), chunk):
            part = slice(q0, q0 + chunk)
            best[part] = merge_block(best[part], queries[part], bound[part], rows, block)
    return best


def exact_top_rows(queries: npt.ArrayLike, blocks: Blocks, depth: int) -> npt.NDArray[np.int64]:
    """Row numbers of the canonical top `depth` records per query, -1 padded.

    `blocks` yields (row numbers, float32 unit rows) pairs -- any rows, in any order, e.g. the
    rows of a Poisson subsample -- so that every searcher and every caller ranks records by the
    same canonical score and tie rule.
    """
    queries = np.asarray(queries)
    queries = check_queries(queries, queries.shape[-1] if queries.ndim == 2 else -1)
    return rows_from_keys(exact_top_keys(queries, blocks, check_depth(depth)))


def canonical_top_rows(query: npt.NDArray[np.float32], rows: npt.NDArray[np.int64],
                       records: npt.NDArray[np.float32], depth: int) -> npt.NDArray[np.int64]:
    """The canonical top `depth` of a few records (row numbers `rows`), best first, unpadded.

    Every record is scored canonically -- no fast filter -- which is cheaper than
    :func:`exact_top_rows` for a few hundred records; the result is the same."""
    if len(rows) == 0:
        return np.zeros(0, np.int64)
    scores = canonical_scores(query, records)
    _check_scores(scores)
    rows = np.asarray(rows, dtype=np.int64)
    return rows[np.lexsort((rows, -scores))[:depth]]  # -0.0 sorts equal to 0.0: ties by row


def _index_blocks(index: EmbeddingIndex, block_rows: int | None = None) -> Blocks:
    for first_row, block in index.iter_blocks(block_rows):
        yield np.arange(first_row, first_row + len(block), dtype=np.int64), block


# --------------------------------------------------------------------------------------------
# Exact numpy search
# --------------------------------------------------------------------------------------------


class ExactSearcher:
    """Exact top-`depth` by block matmul over the memory-mapped rows, then canonical re-scoring.

    Reads the matrix once per call, `block_rows` rows at a time, and keeps a running top-`depth`
    per query, so memory is O(B x depth + block_rows x d) whatever N is.
    """

    def __init__(self, index: EmbeddingIndex, block_rows: int = 65536) -> None:
        if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
            raise InvalidParameterError(
                f"block_rows must be a positive integer, got {block_rows!r}"
            )
        self.index = index
        self.n = index.n
        self.dim = index.dim
        self.block_rows = block_rows

    def ranked_candidates(self, queries: npt.ArrayLike, depth: int) -> npt.NDArray[np.int64]:
        queries = check_queries(queries, self.dim)
        depth = check_depth(depth)
        keys = exact_top_keys(queries, _index_blocks(self.index, self.block_rows), depth)
        return rows_from_keys(keys)


# --------------------------------------------------------------------------------------------
# faiss helpers
# --------------------------------------------------------------------------------------------


def available_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_faiss(dim: int) -> None:
    """Use BLAS from BLAS_MIN_QUERIES queries on (see the measurement above)."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES * dim


def _set_threads(threads: int, batch: int) -> None:
    # With fewer queries than threads faiss splits the database across threads and scores it with
    # sgemm, which for a single query was slower (19 ms) than one thread's SIMD scan (15.6 ms).
    faiss.omp_set_num_threads(1 if batch < threads else threads)


def _add_flat(target: faiss.IndexFlatIP, index: EmbeddingIndex) -> None:
    for _, block in index.iter_blocks():
        target.add(np.ascontiguousarray(block))


# search(which queries, k) -> faiss (scores, handles) for those queries; a handle >= 0 names one
# record (its row for flat search, its (list, offset) pair for IVF search), -1 is padding.
FaissSearch = Callable[
    [npt.NDArray[np.int64], int], tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
]
# (handles, want vectors) -> (row numbers, float32 vectors or None) of those records
Resolve = Callable[[npt.NDArray[np.int64], bool],
                   tuple[npt.NDArray[np.int64], npt.NDArray[np.float32] | None]]


def order_by_fast_scores(query: npt.NDArray[np.float32], fast: npt.NDArray[np.float64],
                         handles: npt.NDArray[np.int64], bound: float, depth: int,
                         resolve: Resolve) -> npt.NDArray[np.int64]:
    """Rows of the canonical top `depth` of the given records, in canonical (-score, +row) order.

    `fast` are float32 scores within `bound` of the canonical ones (:func:`score_error_bound`).
    Sorted by fast score, two neighbours whose fast scores differ by more than 2 * bound are in
    canonical order (c_i >= f_i - b > f_j + b >= c_j), and so, by transitivity, is every pair of
    records on either side of such a gap. Cutting the sorted list at those gaps leaves runs that
    are in canonical order with respect to each other; only runs of two or more records -- near
    ties -- are re-scored canonically and ordered inside by (-score, +row). Runs that start at or
    after position `depth` are never looked at.
    """
    order = np.argsort(-fast, kind="stable")
    fast = fast[order]
    handles = handles[order]
    near = (fast[:-1] - fast[1:]) <= 2 * bound  # near[i]: records i and i+1 share a run
    if len(fast) > depth:
        breaks = np.flatnonzero(~near[depth - 1 :])
        end = depth + int(breaks[0]) if breaks.size else len(fast)  # the run holding depth-1 ends
        fast, handles, near = fast[:end], handles[:end], near[: end - 1]
    in_run = np.zeros(len(fast), bool)
    in_run[:-1] |= near
    in_run[1:] |= near
    if not in_run.any():
        return resolve(handles[:depth], False)[0]
    run_of = np.concatenate([[0], np.cumsum(~near)])
    picked = np.flatnonzero(in_run)
    rows = np.empty(len(handles), np.int64)
    singles = np.flatnonzero(~in_run)
    if singles.size:
        rows[singles] = resolve(handles[singles], False)[0]
    rows[picked], vectors = resolve(handles[picked], True)
    assert vectors is not None
    canonical = np.zeros(len(fast), np.float32)
    canonical[picked] = canonical_scores(query, vectors)
    ranked = np.lexsort((rows, -canonical, run_of))[:depth]
    return rows[ranked]


def exact_from_faiss(
    search: FaissSearch,
    queries: npt.NDArray[np.float32],
    depth: int,
    available: npt.NDArray[np.int64],
    resolve: Resolve,
) -> npt.NDArray[np.int64]:
    """Turn faiss top-k results into the exact canonical (-score, +row) order.

    `search(which, k)` returns faiss (D, I) for the queries numbered `which`; `available[i]` is the
    number of candidates query i can reach. faiss orders ties arbitrarily, keeps an arbitrary
    subset of the records tied at the k-th score, and its scores differ from the canonical ones by
    up to the error bound. Every record faiss did not return has a fast score at most the k-th
    one, so it scores (canonically) below every returned record whose faiss score beats the k-th
    by more than twice the bound -- and so does every returned record that does not. Once `depth`
    returned records are that far ahead -- or k covers all available candidates -- the canonical
    top `depth` is among those records, and :func:`order_by_fast_scores` ranks them exactly,
    re-scoring only near ties; otherwise k is doubled.
    """
    batch = len(queries)
    bound = score_error_bound(queries)
    out = np.full((batch, depth), -1, np.int64)
    pending = np.flatnonzero(available > 0)
    k = depth + FAISS_SLACK
    while pending.size:
        k_now = int(min(k, available[pending].max()))
        scores, labels = search(pending, k_now)
        labels = np.asarray(labels, dtype=np.int64)
        found = labels >= 0
        _check_scores(scores[found])
        complete = available[pending] <= k_now
        smallest = scores[:, k_now - 1].astype(np.float64)
        ahead = found & (scores > (smallest + 2 * bound[pending])[:, None])
        done = complete | (ahead.sum(axis=1) >= depth)
        for position in np.flatnonzero(done):
            query = pending[position]
            keep = found[position] if complete[position] else ahead[position]
            rows = order_by_fast_scores(queries[query], scores[position, keep].astype(np.float64),
                                        labels[position, keep], float(bound[query]), depth,
                                        resolve)
            out[query, : len(rows)] = rows
        pending = pending[~done]
        k *= 2
    return out


# --------------------------------------------------------------------------------------------
# faiss flat search
# --------------------------------------------------------------------------------------------


class FaissFlatSearcher:
    """Exact search with faiss ``IndexFlatIP`` (float32 copy of the rows in RAM)."""

    def __init__(self, index: EmbeddingIndex, threads: int | None = None) -> None:
        configure_faiss(index.dim)
        self.index = index
        self.n = index.n
        self.dim = index.dim
        self.threads = threads or available_threads()
        self._faiss = faiss.IndexFlatIP(index.dim)
        _add_flat(self._faiss, index)
        # A view of faiss's copy; nothing is added later, so the buffer stays put.
        self._vectors = (faiss.rev_swig_ptr(self._faiss.get_xb(), self.n * self.dim)
                         .reshape(self.n, self.dim) if self.n else
                         np.zeros((0, self.dim), np.float32))

    def ranked_candidates(self, queries: npt.ArrayLike, depth: int) -> npt.NDArray[np.int64]:
        queries = check_queries(queries, self.dim)
        depth = check_depth(depth)
        _set_threads(self.threads, len(queries))

        def search(which: npt.NDArray[np.int64], k: int) -> tuple[Any, Any]:
            return self._faiss.search(queries[which], k)

        available = np.full(len(queries), self.n, np.int64)
        return exact_from_faiss(search, queries, depth, available, self._resolve)

    def _resolve(self, rows: npt.NDArray[np.int64],
                 vectors: bool) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32] | None]:
        # faiss's own float32 copy (equal to index.rows_float32), no memmap gather
        return rows, self._vectors[rows] if vectors else None


# --------------------------------------------------------------------------------------------
# Public coarse quantizer and IVF search
# --------------------------------------------------------------------------------------------


def _centroids_digest(centroids: npt.NDArray[np.float32]) -> str:
    return hashlib.sha256(np.ascontiguousarray(centroids, dtype="<f4").tobytes()).hexdigest()


@dataclass(frozen=True)
class PublicQuantizer:
    """k-means centroids of PUBLIC, L2-normalised vectors: the coarse quantizer of an IVF search."""

    centroids: npt.NDArray[np.float32]  # (nlist, dim), unit rows
    n_train: int
    created: str
    # what it was trained on: {"file", "sha256", "rows", "public", "declared_by", ...} (CLI)
    source: dict[str, Any] | None = None

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def manifest(self) -> dict[str, Any]:
        return {
            "trained_on": "public",
            "nlist": self.nlist,
            "dim": self.dim,
            "n_train": self.n_train,
            "created": self.created,
            "centroids_sha256": _centroids_digest(self.centroids),
            "source": self.source,
        }

    def save(self, index_dir: str | os.PathLike[str]) -> None:
        """Write quantizer.npy and quantizer.json into an index directory (each file atomically).

        The manifest is written last and records the centroids' SHA-256, so a crash between the
        two renames is detected by :meth:`load` instead of pairing mismatched files.
        """
        index_dir = Path(index_dir)
        index = EmbeddingIndex.open(index_dir)
        if index.dim != self.dim:
            raise InvalidParameterError(
                f"quantizer has dimension {self.dim} but the index at {index_dir} has {index.dim}"
            )
        for name, payload in (
            (QUANTIZER_CENTROIDS_FILE, _npy_bytes(self.centroids)),
            (QUANTIZER_MANIFEST_FILE, (json.dumps(self.manifest(), indent=1) + "\n").encode()),
        ):
            temporary = index_dir / f".{name}.tmp-{os.getpid()}"
            try:
                write_bytes_durably(temporary, payload)
                os.replace(temporary, index_dir / name)
            finally:
                temporary.unlink(missing_ok=True)
        fsync_directory(index_dir)

    @classmethod
    def load(cls, index_dir: str | os.PathLike[str]) -> PublicQuantizer:
        index_dir = Path(index_dir)
        manifest_path = index_dir / QUANTIZER_MANIFEST_FILE
        centroids_path = index_dir / QUANTIZER_CENTROIDS_FILE
        if not manifest_path.is_file() or not centroids_path.is_file():
            raise EmbeddingIndexError(
                f"no public quantizer in {index_dir}; train one with `dprdm index quantize`"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
            centroids = np.load(centroids_path, allow_pickle=False)
        except (OSError, ValueError) as error:
            message = f"the quantizer files in {index_dir} are unreadable"
            raise EmbeddingIndexError(message) from error
        if not isinstance(manifest, dict) or manifest.get("trained_on") != "public":
            raise EmbeddingIndexError(f"{manifest_path} does not declare a public quantizer")
        if (
            centroids.ndim != 2
            or centroids.dtype != np.float32
            or list(centroids.shape) != [manifest.get("nlist"), manifest.get("dim")]
            or manifest.get("centroids_sha256") != _centroids_digest(centroids)
        ):
            raise EmbeddingIndexError(
                f"{centroids_path} does not match {manifest_path} (interrupted write?); "
                "re-run `dprdm index quantize`"
            )
        source = manifest.get("source")
        return cls(centroids=centroids, n_train=int(manifest["n_train"]),
                   created=str(manifest["created"]),
                   source=source if isinstance(source, dict) else None)


def _npy_bytes(array: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _normalize_public(raw: npt.NDArray[Any]) -> npt.NDArray[np.floating]:
    """The public rows L2-normalised exactly as :func:`build_index` normalises private rows."""
    unit, bad = normalize_rows(raw)
    if bad.any():
        rows = np.flatnonzero(bad)
        nonfinite = [int(r) for r in rows if not np.isfinite(raw[r]).all()]
        zero = [int(r) for r in rows if np.isfinite(raw[r]).all()]
        raise InvalidParameterError(describe_bad_rows(nonfinite, zero, "public vectors"))
    return unit


def public_rows_in_private(public_raw: npt.NDArray[Any], public_unit: npt.NDArray[np.floating],
                           private_index: EmbeddingIndex) -> list[int]:
    """Public row numbers whose vector equals a stored private row.

    A public row matches if, normalised and stored as :func:`build_index` stores rows
    (`public_unit` through :func:`to_storage_rows`), or cast unchanged (a copy of the stored file), it is bitwise equal to a
    private row. Near-copies are not detected.
    """
    dtype = private_index.dtype
    with np.errstate(over="ignore", invalid="ignore"):
        as_stored = np.asarray(public_raw).astype(dtype) + dtype.type(0)
    lookup: dict[bytes, int] = {}
    for candidates in (to_storage_rows(public_unit, dtype), as_stored):
        for row, vector in enumerate(candidates):
            lookup.setdefault(vector.tobytes(), row)
    matches: set[int] = set()
    for start in range(0, private_index.n, rows_per_block(private_index.dim)):
        block = np.ascontiguousarray(
            private_index.vectors[start : start + rows_per_block(private_index.dim)]
        )
        for vector in block:
            row = lookup.get(vector.tobytes())
            if row is not None:
                matches.add(row)
    return sorted(matches)


def _refuse_near_duplicates(public_unit: npt.NDArray[np.floating],
                            private_index: EmbeddingIndex) -> None:
    """Refuse public rows of which too many nearly duplicate private records (counts only)."""
    from dprdm.retrieval.overlap import (MAX_NEAR_DUPLICATE_FRACTION,
                                         count_public_near_duplicates)

    n_public = len(public_unit)
    allowed = int(MAX_NEAR_DUPLICATE_FRACTION * n_public)
    near = count_public_near_duplicates(public_unit, private_index, stop_above=allowed)
    if near.n_near > allowed:
        count = f"{near.n_near:,}" if near.complete else f"at least {near.n_near:,}"
        raise InvalidParameterError(
            f"refusing to train the quantizer: {count} of the {n_public:,} public vectors "
            f"({100 * near.fraction:.1f} %) nearly duplicate records of the private index "
            f"(cosine > {near.threshold}; at most {100 * MAX_NEAR_DUPLICATE_FRACTION:g} % may). "
            "The public file looks like private data, perhaps re-embedded or with noise added. "
            "A coarse quantizer trained on private vectors makes the set of searched candidates "
            "depend on many private records at once, which voids the 2/k sensitivity argument of "
            "the private retrieval. Train it on public data."
        )


def train_public_quantizer(
    public_vectors: npt.ArrayLike,
    nlist: int,
    private_index: EmbeddingIndex | None,
    *,
    niter: int = 20,
    seed: int = 1234,
) -> PublicQuantizer:
    """Spherical k-means (faiss.Kmeans) of the L2-normalised public vectors into `nlist` lists.

    Refuses when `private_index` is given and any public vector equals one of its rows, or more
    than 1 % of them have a near-duplicate among its rows (cosine > 0.999, see
    :mod:`dprdm.retrieval.overlap`): a quantizer trained on private data makes the searched
    candidate set depend on many private records, voiding the 2/k sensitivity argument.
    """
    if isinstance(nlist, bool) or not isinstance(nlist, (int, np.integer)) or nlist < 1:
        raise InvalidParameterError(f"nlist must be a positive integer, got {nlist!r}")
    raw = np.asarray(check_matrix(public_vectors, what="public vectors"))
    unit = _normalize_public(raw)
    n_train, dim = unit.shape
    if nlist > n_train:
        raise InvalidParameterError(f"nlist={nlist} exceeds the {n_train} public vectors")
    if private_index is not None:
        if private_index.dim != dim:
            raise InvalidParameterError(
                f"public vectors have dimension {dim} but the private index has {private_index.dim}"
            )
        overlap = public_rows_in_private(raw, unit, private_index)
        if overlap:
            raise InvalidParameterError(
                f"refusing to train the quantizer: public {describe_rows(overlap)} equal records "
                "of the private index. A coarse quantizer trained on private vectors makes the "
                "set of searched candidates depend on many private records at once, which voids "
                "the 2/k sensitivity argument of the private retrieval. Train it on public data."
            )
        _refuse_near_duplicates(unit, private_index)
    kmeans = faiss.Kmeans(dim, int(nlist), niter=niter, seed=seed, spherical=True, verbose=False)
    kmeans.train(np.ascontiguousarray(unit, dtype=np.float32))
    centroids, bad = normalize_rows(kmeans.centroids)
    if bad.any():
        raise EmbeddingIndexError("k-means produced a degenerate (zero or non-finite) centroid")
    return PublicQuantizer(centroids=np.ascontiguousarray(centroids, dtype=np.float32),
                           n_train=n_train, created=utc_now())


class FaissIVFSearcher:
    """faiss ``IndexIVFFlat`` over the private rows with a PUBLIC coarse quantizer.

    The private vectors are never used for training, only assigned to lists: each record goes to
    the centroid with the largest canonical score (ties to the lower list number), computed by
    :class:`~dprdm.retrieval.partition.IVFPartition` rather than by faiss so that the assignment
    is a fixed function of the record. A query probes
    its `nprobe` best centroids by the same rule (public data only; see the module docstring); its
    candidate set is the union of those lists, returned in exact (-score, +row) order and -1
    padded once exhausted. faiss searches the lists with store_pairs, and the records' rows and
    float32 vectors are read from faiss's own lists, never gathered from the memmap.

    The lists come from `partition` when given (its nprobe is set to `nprobe`), else from
    :meth:`IVFPartition.open <dprdm.retrieval.partition.IVFPartition.open>`: the partition saved in
    the index directory when it was computed from these rows and `quantizer`'s centroids
    (`quantizer` defaults to the index's saved one), else a freshly computed one.
    """

    def __init__(self, index: EmbeddingIndex, quantizer: PublicQuantizer | None = None,
                 nprobe: int = DEFAULT_NPROBE, threads: int | None = None, *,
                 partition: IVFPartition | None = None) -> None:
        from dprdm.retrieval.partition import IVFPartition  # it builds on this module

        if partition is None:
            # the partition saved in the index when it was computed from these rows and
            # centroids, else computed (and saved, for the index's own quantizer)
            partition = IVFPartition.open(index, quantizer, nprobe)
        elif partition.index.path != index.path or partition.n != index.n or (
                quantizer is not None and partition.quantizer is not quantizer
                and not np.array_equal(partition.centroids, quantizer.centroids)):
            raise InvalidParameterError("the partition belongs to another index or quantizer")
        else:
            partition.nprobe = nprobe
        self.partition = partition  # checks dim and nprobe
        configure_faiss(index.dim)
        self.index = index
        self.n = index.n
        self.dim = index.dim
        self.quantizer = partition.quantizer
        nlist = partition.nlist
        self.threads = threads or available_threads()
        coarse = faiss.IndexFlatIP(index.dim)
        coarse.add(self.partition.centroids)
        self._ivf = faiss.IndexIVFFlat(coarse, index.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        self._ivf.own_fields = False
        self._coarse = coarse  # keep the quantizer alive as long as the IVF index
        self._ivf.is_trained = True  # the public centroids ARE the training
        self._ivf.nprobe = self.partition.nprobe
        # faiss's lists are filled straight from the partition's CSR arrays, list by list (the
        # rows of a list gathered from the memmap in pieces): no assignment array, no copy of the
        # matrix besides faiss's own float32 lists.
        invlists = self._ivf.invlists
        self._list_sizes = np.asarray(partition.list_sizes, dtype=np.int64)
        self._list_start = np.asarray(partition.offsets[:-1], dtype=np.int64)
        for list_no in np.flatnonzero(self._list_sizes).tolist():
            members = partition.list_members(list_no)
            for start in range(0, len(members), IVF_ADD_ROWS):
                chunk = np.ascontiguousarray(members[start : start + IVF_ADD_ROWS], dtype=np.int64)
                codes = np.ascontiguousarray(index.vectors[chunk], dtype=np.float32)
                invlists.add_entries(list_no, len(chunk), faiss.swig_ptr(chunk),
                                     faiss.swig_ptr(codes.view(np.uint8)))
        # Views of faiss's per-list float32 vectors (nothing is added later, so the buffers stay
        # put): search with store_pairs returns (list, offset) handles, resolved here without
        # gathering rows from the memmap. faiss's ids are the CSR rows array, list after list.
        self._ids = partition.rows
        self._list_vectors: list[npt.NDArray[np.float32]] = []
        for list_no, size in enumerate(self._list_sizes.tolist()):
            if size == 0:
                self._list_vectors.append(np.zeros((0, self.dim), np.float32))
                continue
            codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * self.dim * 4)
            self._list_vectors.append(codes.view(np.float32).reshape(size, self.dim))
        self._ivf.ntotal = self.n

    @property
    def nprobe(self) -> int:
        """Lists probed per query; may be changed between calls (nothing is rebuilt)."""
        return self.partition.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.partition.nprobe = value  # validates
        self._ivf.nprobe = self.partition.nprobe

    def probed_lists(self, queries: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """(B, nprobe) numbers of the lists probed for each query (public information)."""
        return self.partition.probed_lists(queries)

    def list_members(self, list_no: int) -> npt.NDArray[np.int64]:
        """Row numbers of the records assigned to inverted list `list_no`."""
        return self.partition.list_members(list_no)

    def ranked_candidates(self, queries: npt.ArrayLike, depth: int) -> npt.NDArray[np.int64]:
        queries = check_queries(queries, self.dim)
        depth = check_depth(depth)
        _set_threads(self.threads, len(queries))
        # Probe once, then search exactly these lists: the candidate count below and the search
        # see the same candidate set.
        probed = self.partition.probed_lists(queries)  # the one probe rule, shared
        # coarse scores for faiss's API (its flat scan scores every record itself)
        centroid_scores = np.einsum("bd,bpd->bp", queries, self.partition.centroids[probed])
        available = self._list_sizes[probed].sum(axis=1)

        def search(which: npt.NDArray[np.int64], k: int) -> tuple[Any, Any]:
            x = np.ascontiguousarray(queries[which])
            assign = np.ascontiguousarray(probed[which])
            coarse = np.ascontiguousarray(centroid_scores[which])
            scores = np.empty((len(which), k), np.float32)
            handles = np.empty((len(which), k), np.int64)
            self._ivf.search_preassigned_c(  # store_pairs: handles are (list << 32 | offset)
                len(which), faiss.swig_ptr(x), k, faiss.swig_ptr(assign),
                faiss.swig_ptr(coarse), faiss.swig_ptr(scores), faiss.swig_ptr(handles), True)
            return scores, handles

        return exact_from_faiss(search, queries, depth, available, self._resolve)

    def _resolve(self, handles: npt.NDArray[np.int64],
                 vectors: bool) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32] | None]:
        lists = handles >> 32
        offsets = handles & 0xFFFFFFFF
        rows = self._ids[self._list_start[lists] + offsets]
        if not vectors:
            return rows, None
        out = np.empty((len(handles), self.dim), np.float32)
        order = np.argsort(lists, kind="stable")
        bounds = np.flatnonzero(np.diff(lists[order])) + 1
        for group in np.split(order, bounds):
            if group.size:
                out[group] = self._list_vectors[int(lists[group[0]])][offsets[group]]
        return rows, out


def make_searcher(
    index: EmbeddingIndex,
    kind: SearcherKind = "exact",
    *,
    nprobe: int = DEFAULT_NPROBE,
    quantizer: PublicQuantizer | None = None,
) -> RankedSearcher:
    """The searcher of the given kind; "ivf" loads the index's saved public quantizer by default."""
    if kind == "exact":
        return ExactSearcher(index)
    if kind == "faiss":
        return FaissFlatSearcher(index)
    if kind == "ivf":  # the index's saved quantizer and (when current) saved partition
        return FaissIVFSearcher(index, quantizer, nprobe)
    raise InvalidParameterError(f"searcher kind must be 'exact', 'faiss' or 'ivf', got {kind!r}")

