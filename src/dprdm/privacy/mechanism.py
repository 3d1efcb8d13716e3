"""The private retrieval step: the only code that reads private embeddings for a release.

(``dprdm eval``'s non-private reference run also reads them, by design and labelled NOT private.)

:class:`PrivateRetrieval` owns the whole private step for a batch of query embeddings. For each
query, with parameters (sigma, q, k):

1. Poisson-subsample the private set (each record kept independently with probability q);
2. take the k nearest neighbours of the query inside the subsample (inner product on unit vectors;
   ties broken by row number, i.e. record position in the index);
3. aggregate a = (1/k) * sum of those k neighbours, each first scaled by 1/max(1, ||row||) in
   float64 (so a row that is not unit-norm on disk -- float16 rounding, a tampered file -- still
   counts for at most 1) -- ALWAYS divided by k, zero-filled when the subsample holds fewer than
   k records, so one added/removed record moves a by at most 2/k;
4. release r = gamma * (round(a / gamma) + Y), Y an exact discrete Gaussian with std sigma / gamma
   on the power-of-two grid gamma (``noise.py``: an exact sampler drawing from OS entropy).

Before step 1, the ledger is charged for every query of the batch (``ledger.charge``), which
raises -- with nothing spent -- if the budget cannot afford them. Only the noised aggregates are
returned: a fresh float64 array whose every coordinate is an exact multiple of gamma, no ids,
distances, counts or pre-noise values. Errors raised here never mention private data.

Three exact strategies draw the subsample without an O(N) coin flip per record (``sampling.py``):

* ``"subsample"`` (a): draw the kept rows directly (O(qN)) and search only those, in blocks;
* ``"ranked"`` (b): ask a :class:`~dprdm.retrieval.search.RankedSearcher` for candidates in
  distance order and keep the first k whose coins come up (about k/q candidates deep);
* ``"probed"`` (a) inside a candidate set: ask a :class:`CandidateSets` (the public-IVF
  :class:`~dprdm.retrieval.partition.IVFPartition`) for the query's candidate rows, draw their
  subsample directly (O(q x candidates)) and search only the kept rows. Same distribution as
  "ranked" over :class:`~dprdm.retrieval.search.FaissIVFSearcher` with the same nprobe.

Post-processing (interpolation with public information) lives outside, in
``dprdm.conditioning``: it costs no privacy.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

from dprdm.errors import InvalidParameterError
from dprdm.privacy.accounting import MechanismParams
from dprdm.privacy.noise import (DiscreteGaussian, IntegerNoise, RoundedGaussianFromGenerator,
                                 noise_grid, noise_scale, release_on_grid)
from dprdm.privacy.randomness import Randomness, SystemRandomness
from dprdm.privacy.sampling import accepted_ranks, poisson_subsample
from dprdm.retrieval.search import canonical_top_rows, exact_top_rows

Strategy = Literal["subsample", "ranked", "probed"]
SUBSAMPLE_BLOCK_ROWS = 32768  # subsample rows gathered and scored at a time (bounded memory)
# Up to this many kept rows, all are scored canonically at once (no fast filter): cheaper.
SMALL_SUBSAMPLE_ROWS = 512
MAX_QUERY_BATCH = 100_000


class PrivateVectors(Protocol):
    """Read access to the private unit vectors (an EmbeddingIndex or :class:`ArrayVectors`)."""

    @property
    def n(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def rows_float32(self, rows: np.ndarray) -> np.ndarray: ...


class RankedCandidates(Protocol):
    """Row numbers of the `depth` best candidates per query, best first, ties by row, -1 padded."""

    def ranked_candidates(self, queries: np.ndarray, depth: int) -> np.ndarray: ...


class CandidateSets(Protocol):
    """Per query, the rows it may retrieve: a function of the query, public data and each record's
    own assignment only, so one added/removed record changes a set by at most that record."""

    def candidate_rows(self, queries: np.ndarray) -> list[np.ndarray]: ...


class Ledger(Protocol):
    def charge(self, params: MechanismParams, count: int = 1, caller: str = "") -> object: ...


class ArrayVectors:
    """Private vectors held in memory (tests, audits, small experiments). Rows must be unit-norm."""

    def __init__(self, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise InvalidParameterError("private vectors must be a non-empty (N, d) array")
        norms = np.linalg.norm(vectors, axis=1)
        if not np.all(np.abs(norms - 1.0) < 1e-3):
            raise InvalidParameterError("private vectors must be L2-normalised")
        self._vectors = vectors

    @property
    def n(self) -> int:
        return self._vectors.shape[0]

    @property
    def dim(self) -> int:
        return self._vectors.shape[1]

    def rows_float32(self, rows: np.ndarray) -> np.ndarray:
        return self._vectors[rows]


def normalise_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Validate a (B, dim) batch of query embeddings and L2-normalise it (float32)."""
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise InvalidParameterError(
            f"query embeddings must have shape (B, {dim}), got {tuple(queries.shape)}"
        )
    if not 1 <= queries.shape[0] <= MAX_QUERY_BATCH:
        raise InvalidParameterError(
            f"a batch must hold 1 to {MAX_QUERY_BATCH} queries, got {queries.shape[0]}"
        )
    if not np.issubdtype(queries.dtype, np.number):
        raise InvalidParameterError("query embeddings must be numeric")
    queries = queries.astype(np.float64)
    if not np.all(np.isfinite(queries)):
        bad = np.flatnonzero(~np.all(np.isfinite(queries), axis=1))
        raise InvalidParameterError(f"query rows {bad[:20].tolist()} are not finite")
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    if np.any(norms == 0.0):
        bad = np.flatnonzero(norms[:, 0] == 0.0)
        raise InvalidParameterError(f"query rows {bad[:20].tolist()} are zero vectors")
    return (queries / norms).astype(np.float32)


def _neighbours_in_subsample(
    vectors: PrivateVectors, query: np.ndarray, rows: np.ndarray, k: int
) -> np.ndarray:
    """Rows of the k nearest neighbours of `query` among `rows`, read in blocks.

    Ranked by the CANONICAL score of ``dprdm.retrieval.search`` (a fixed function of the query and
    one record, unlike BLAS scores, which depend on a record's position in a block), ties by row:
    so removing one record can only remove that record from the ranking -- the 2/k argument --
    and this strategy agrees exactly with the "ranked" one."""
    if rows.size <= SMALL_SUBSAMPLE_ROWS:
        return canonical_top_rows(query, rows, vectors.rows_float32(rows), k)
    blocks = (
        (block, vectors.rows_float32(block))
        for block in (rows[i : i + SUBSAMPLE_BLOCK_ROWS]
                      for i in range(0, rows.size, SUBSAMPLE_BLOCK_ROWS))
    )
    top = exact_top_rows(query[None, :], blocks, k)[0]
    return top[top >= 0]


def clamped_sum(rows: np.ndarray) -> np.ndarray:
    """Sum of the rows after scaling each by 1/max(1, ||row||), in float64: THE place where the
    unit-norm bound behind the 2/k sensitivity is enforced, whatever the stored rows hold."""
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    # A non-finite row (a corrupt file) gets norm nan/inf: zero it rather than release it.
    scale = np.where(np.isfinite(norms), 1.0 / np.maximum(1.0, norms), 0.0)
    rows = np.where(np.isfinite(norms)[:, None], rows, 0.0) * scale[:, None]
    return rows.sum(axis=0)


class PrivateRetrieval:
    """The DP retrieval mechanism over one private index, charging one ledger.

    ``release(queries)`` is the only public way to use it and returns only noised aggregates.
    ``randomness`` is for research code that needs reproducible runs; the CLI and the service
    never pass it, so the subsample and the exact discrete Gaussian noise both come from OS
    entropy. With ``randomness`` the noise is the NON-exact research sampler
    (:class:`~dprdm.privacy.noise.RoundedGaussianFromGenerator`) on the same grid.
    """

    def __init__(
        self,
        vectors: PrivateVectors,
        params: MechanismParams,
        ledger: Ledger,
        *,
        strategy: Strategy = "subsample",
        searcher: RankedCandidates | CandidateSets | None = None,
        randomness: Randomness | None = None,
    ) -> None:
        if not isinstance(params, MechanismParams):
            raise InvalidParameterError("params must be a MechanismParams")
        if strategy not in ("subsample", "ranked", "probed"):
            raise InvalidParameterError(f"unknown strategy {strategy!r}")
        if strategy == "ranked" and not hasattr(searcher, "ranked_candidates"):
            raise InvalidParameterError("the 'ranked' strategy needs a ranked searcher")
        if strategy == "probed" and not hasattr(searcher, "candidate_rows"):
            raise InvalidParameterError("the 'probed' strategy needs candidate sets (IVFPartition)")
        if searcher is not None and (getattr(searcher, "n", vectors.n) != vectors.n
                                     or getattr(searcher, "dim", vectors.dim) != vectors.dim):
            raise InvalidParameterError("the searcher was built on another index than these "
                                        "private vectors (record count or dimension differ)")
        self._vectors = vectors
        self._params = params
        self._ledger = ledger
        self._strategy = strategy
        self._searcher = searcher
        self._rng: Randomness = randomness if randomness is not None else SystemRandomness()
        self._noise: IntegerNoise = (DiscreteGaussian() if randomness is None
                                     else RoundedGaussianFromGenerator(randomness))
        # Refuses (before anything is charged) a sigma whose grid is out of range.
        self._grid = noise_grid(params.sigma, params.k, vectors.dim)

    @property
    def params(self) -> MechanismParams:
        return self._params

    @property
    def dim(self) -> int:
        return self._vectors.dim

    def noise_description(self) -> dict:
        """{"sampler": name, "grid": gamma}: how the noise is drawn (public: no data in it)."""
        scale = noise_scale(self._params.sigma, self._grid)
        return {"sampler": self._noise.name_for(scale), "grid": self._grid}

    def release(self, queries: np.ndarray, caller: str = "",
                receipts: list | None = None) -> np.ndarray:
        """Charge the ledger for every query, then return the (B, d) noised aggregates: float64,
        every coordinate an exact multiple of the grid (see ``noise_description``). The ledger's
        receipt of the charge is appended to `receipts` when given (per-call figures)."""
        queries = normalise_queries(queries, self._vectors.dim)
        receipt = self._ledger.charge(self._params, count=queries.shape[0], caller=caller)
        if receipts is not None:
            receipts.append(receipt)
        aggregates = self._aggregate(queries)
        return release_on_grid(aggregates, self._params.sigma, self._grid, self._noise)

    # -- private: pre-noise aggregates never leave this class ------------------------------------
    def _aggregate(self, queries: np.ndarray) -> np.ndarray:
        """(B, d) float64: (1/k) * sum of the k neighbours inside each query's own subsample,
        each neighbour clamped to norm <= 1 first (:func:`clamped_sum`)."""
        k = self._params.k
        neighbour_rows = self._neighbour_rows(queries)
        aggregates = np.zeros((queries.shape[0], self._vectors.dim), dtype=np.float64)
        for i, rows in enumerate(neighbour_rows):
            if rows.size:
                aggregates[i] = clamped_sum(self._vectors.rows_float32(np.sort(rows)))
        return aggregates / k  # always k: zero-fill keeps the sensitivity at 2/k

    def _neighbour_rows(self, queries: np.ndarray) -> list[np.ndarray]:
        """Per query, the rows of its k nearest neighbours inside its own Poisson subsample (fewer
        when the subsample holds fewer), read through ``self._vectors`` by :meth:`_aggregate`.

        The one step a sharded mechanism (``dprdm.privacy.sharded``) replaces; the charge, the
        aggregate and the noise stay this class's."""
        if self._strategy == "subsample":
            return [
                _neighbours_in_subsample(
                    self._vectors, query, poisson_subsample(self._vectors.n, self._params.q,
                                                            self._rng), self._params.k
                )
                for query in queries
            ]
        if self._strategy == "probed":
            return self._probed_neighbours(queries)
        return self._ranked_neighbours(queries)

    def _probed_neighbours(self, queries: np.ndarray) -> list[np.ndarray]:
        """Strategy (a) inside each query's candidate set: only its kept rows are read."""
        neighbour_rows = []
        for query, candidates in zip(queries, self._searcher.candidate_rows(queries)):
            kept = candidates[poisson_subsample(candidates.size, self._params.q, self._rng)]
            neighbour_rows.append(
                _neighbours_in_subsample(self._vectors, query, np.sort(kept), self._params.k))
        return neighbour_rows

    def _ranked_neighbours(self, queries: np.ndarray) -> list[np.ndarray]:
        ranks = accepted_ranks(queries.shape[0], self._params.k, self._params.q, self._rng)
        depth = int(min(self._vectors.n, ranks.max() + 1))
        candidates = self._searcher.ranked_candidates(queries, depth)
        neighbour_rows = []
        for query_ranks, ranked in zip(ranks, candidates):
            rows = ranked[query_ranks[query_ranks < depth]]
            neighbour_rows.append(rows[rows >= 0])
        return neighbour_rows
