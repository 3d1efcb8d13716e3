"""Public-IVF candidate sets: which private records a query may retrieve, decided by public centroids.

:class:`IVFPartition` owns the assignment of every private record to an inverted list of a PUBLIC
coarse quantizer (:class:`~dprdm.retrieval.search.PublicQuantizer`) and answers, per query, the
candidate set: the row numbers in the lists of its `nprobe` best centroids.

* A record's list depends only on that record and the public centroids (its canonical nearest
  centroid, ties to the lower list number), so the private vectors are assigned, never trained on.
* A query's probed lists depend only on the query, the public centroids and nprobe (the same
  canonical rule), never on private data.
* So adding or removing one record changes any candidate set by at most that record: the 2/k
  sensitivity argument holds for the k-NN inside the candidate set.

The mechanism's ``"probed"`` strategy Poisson-subsamples a query's candidate set directly, in
O(q x candidates), and scores only the kept rows: the same distribution as the ranked walk over
:class:`~dprdm.retrieval.search.FaissIVFSearcher` with the same nprobe (which flips the coins down
that candidate set in score order), at a fraction of the work and with no second copy of the
vectors. :class:`FaissIVFSearcher` builds its faiss lists from this partition.

Storage: the rows sorted by (list, row) and the list offsets (CSR), 8 bytes per record.
Computing the assignment reads every row once against every centroid (N x nlist canonical scores).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dprdm.errors import InvalidParameterError
from dprdm.retrieval.search import (
    DEFAULT_NPROBE,
    SCORE_BLOCK_ELEMENTS,
    PublicQuantizer,
    _check_scores,
    canonical_top_rows,
    check_queries,
    exact_top_keys,
    fast_scores,
    rows_from_keys,
    score_error_bound,
)
from dprdm.retrieval.store import EmbeddingIndex


# Up to this many vectors, nearest_centroids filters and ranks each vector on its own (a
# single-query release spends half its time probing otherwise); larger batches go through the
# vectorised exact_top_keys. Both give the same canonical answer.
FEW_VECTORS = 8


def nearest_centroids(vectors: npt.NDArray[np.float32], centroids: npt.NDArray[np.float32],
                      count: int) -> npt.NDArray[np.int64]:
    """(B, count) numbers of the `count` best centroids per vector: canonical score, ties to the
    lower number -- a fixed function of the vector and the centroids."""
    if len(vectors) > FEW_VECTORS or count >= len(centroids):
        rows = np.arange(len(centroids), dtype=np.int64)
        return rows_from_keys(exact_top_keys(vectors, [(rows, centroids)], count))
    fast = fast_scores(vectors, centroids)
    _check_scores(fast)
    bound = score_error_bound(vectors)
    kth = np.partition(fast, len(centroids) - count, axis=1)[:, len(centroids) - count]
    out = np.empty((len(vectors), count), np.int64)
    for i, vector in enumerate(vectors):
        # A centroid whose fast score is below kth - 2 bound scores (canonically) strictly below
        # the `count` centroids whose fast scores are >= kth: it cannot be among the best.
        near = np.flatnonzero(fast[i] >= kth[i] - 2.0 * bound[i])
        out[i] = canonical_top_rows(vector, near, centroids[near], count)
    return out


def check_nprobe(nprobe: object, nlist: int) -> int:
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or not (
        1 <= nprobe <= nlist
    ):
        raise InvalidParameterError(f"nprobe must be an integer in [1, {nlist}], got {nprobe!r}")
    return int(nprobe)


class IVFPartition:
    """The private rows grouped by their public centroid; candidate sets per query."""

    def __init__(self, index: EmbeddingIndex, quantizer: PublicQuantizer,
                 nprobe: int = DEFAULT_NPROBE) -> None:
        if quantizer.dim != index.dim:
            raise InvalidParameterError(
                f"quantizer has dimension {quantizer.dim} but the index has {index.dim}"
            )
        self.index = index
        self.quantizer = quantizer
        self.n = index.n
        self.dim = index.dim
        self.nlist = quantizer.nlist
        self.nprobe = nprobe
        self.centroids = np.ascontiguousarray(quantizer.centroids, dtype=np.float32)
        assignment = np.empty(self.n, np.int64)
        step = max(1, SCORE_BLOCK_ELEMENTS // self.nlist)
        for first_row, block in index.iter_blocks(step):
            assignment[first_row : first_row + len(block)] = nearest_centroids(
                block, self.centroids, 1)[:, 0]
        self.assignment = assignment  # (N,) list number of every row
        self._rows = np.argsort(assignment, kind="stable")  # by list, ascending rows within
        sizes = np.bincount(assignment, minlength=self.nlist)
        self.list_sizes = sizes.astype(np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def nprobe(self) -> int:
        """Lists probed per query; may be changed between calls (the assignment stays)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = check_nprobe(value, self.nlist)

    def probed_lists(self, queries: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """(B, nprobe) numbers of the lists probed for each query (public information)."""
        return nearest_centroids(check_queries(queries, self.dim), self.centroids, self.nprobe)

    def list_members(self, list_no: int) -> npt.NDArray[np.int64]:
        """Row numbers of the records assigned to inverted list `list_no`, ascending."""
        if not 0 <= list_no < self.nlist:
            raise InvalidParameterError(f"list_no must lie in [0, {self.nlist})")
        return self._rows[self._offsets[list_no] : self._offsets[list_no + 1]]

    def candidate_rows(self, queries: npt.ArrayLike) -> list[npt.NDArray[np.int64]]:
        """Per query, the rows of its probed lists (its candidate set), in list order."""
        return [np.concatenate([self.list_members(int(list_no)) for list_no in probed])
                for probed in self.probed_lists(queries)]
