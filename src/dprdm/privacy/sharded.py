"""Private retrieval over a sharded index: the single-node mechanism, neighbours found per shard.

:class:`ShardedPrivateRetrieval` IS :class:`~dprdm.privacy.mechanism.PrivateRetrieval` with one
step replaced, ``_neighbour_rows``: validation, the ledger charge, the aggregate ((1/k) * sum,
zero-filled) and the noise are the single-node code, run at the coordinator. The replaced step:

1. every shard (:class:`ShardNeighbours`, in this process or in a Ray actor) runs the single-node
   neighbour step on ITS OWN rows: its own Poisson(q) subsample (coins from OS entropy inside the
   shard) -- of all its rows ("subsample") or of its rows in the query's probed public-IVF lists
   ("probed") -- and returns the local top-k as (GLOBAL rows, vectors) to the coordinator;
2. the coordinator merges the S lists by the canonical score (recomputed from the vectors, so the
   same fixed function of the query and one record as on one node), ties by GLOBAL row, keeps k,
   and holds their vectors for the aggregate to read (:class:`_FetchedVectors`).

Why the release distribution is the single-node one on the union of the shards: the shards are
disjoint and draw independent coins, so the union of their subsamples is a Poisson(q) subsample of
the union; the k best of that union (canonical order, ties by global row) are among the S local
k-best lists, and the merge picks exactly them. A record's IVF list depends only on that record and
the ONE public quantizer every shard carries, and a query's probed lists only on the query, so the
union of the shards' candidate sets is the single index's candidate set.

Faults: if any shard fails, times out or answers malformed data, the release raises
:class:`ShardUnavailableError` -- an aggregate over fewer shards would be another mechanism, so
nothing is aggregated and nothing released. The ledger was charged before the shards were asked
and stays charged (a crash may waste budget, never under-count it).

Ray is imported only by :mod:`dprdm.privacy.sharded_ray`, which this module loads on demand.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dprdm.errors import DprdmError, InvalidParameterError
from dprdm.privacy.accounting import MechanismParams
from dprdm.privacy.mechanism import Ledger, PrivateRetrieval, Strategy
from dprdm.privacy.randomness import Randomness
from dprdm.retrieval.search import DEFAULT_NPROBE, canonical_top_rows, check_queries

SHARD_STRATEGIES = ("subsample", "probed")
RETRY_AFTER_S = 5  # what the service tells clients while a shard actor restarts

# (GLOBAL rows, their vectors in the storage dtype) of one query's local top-k in one shard
ShardAnswer = list[tuple[np.ndarray, np.ndarray]]


class ShardUnavailableError(DprdmError):
    """A shard failed or timed out during a release: nothing was released; the charge stands."""

    code = "shard_unavailable"
    retry_after_s = RETRY_AFTER_S


class _NoRelease:
    """The ledger of a shard's local mechanism: refuses every charge, so a shard can find
    neighbours but never release anything."""

    def charge(self, params: MechanismParams, count: int = 1, caller: str = "") -> object:
        raise DprdmError("a shard never releases; only the coordinator does")


class ShardNeighbours:
    """One shard's private step: per query, the local top-k inside the shard's own subsample.

    Holds the shard index memory-mapped. :meth:`neighbours` is the ONLY method that returns
    vectors; it is meant for the coordinator alone (see docs/scaling.md on the Ray boundary).
    """

    def __init__(self, shard_dir: str | os.PathLike[str], offset: int,
                 embeddings_sha256: str | None = None, fingerprint: dict[str, Any] | None = None,
                 *, full_hash: bool = False) -> None:
        """`fingerprint` (:func:`dprdm.privacy.binding.shard_fingerprints`): the shard's
        embeddings file is checked against it HERE, where the file is read -- on a Ray node, a
        copy the coordinator never hashed -- and a mismatch raises LedgerBindingError (the shard
        is not served). `full_hash` recomputes the full SHA-256 even when the mtime matches."""
        from dprdm.privacy.binding import check_shard_file
        from dprdm.retrieval.store import EMBEDDINGS_FILE, EmbeddingIndex

        self._index = EmbeddingIndex.open(shard_dir)
        if embeddings_sha256 is not None and self._index.embeddings_sha256 != embeddings_sha256:
            raise DprdmError(f"{shard_dir} is not the shard the coordinator expects")
        self._verified = None
        if fingerprint is not None:
            if fingerprint["sha256"] != embeddings_sha256:
                raise DprdmError("the fingerprint is not the expected shard's")
            self._verified = check_shard_file(Path(shard_dir) / EMBEDDINGS_FILE, fingerprint,
                                              full=full_hash)
        self._offset = int(offset)
        self._partition: Any = None

    def describe(self) -> dict[str, Any]:
        """Public facts only: where the shard sits in the global row numbering, and how its file
        was checked ("sampled", "full", or None when no fingerprint was given)."""
        return {"path": str(Path(self._index.path).resolve()), "offset": self._offset,
                "n": self._index.n, "dim": self._index.dim,
                "embeddings_sha256": self._index.embeddings_sha256, "verified": self._verified}

    def _candidate_sets(self, nprobe: int) -> Any:
        from dprdm.retrieval.partition import IVFPartition

        if self._partition is None:  # the partition saved by `dprdm index shard`
            self._partition = IVFPartition.open(self._index, nprobe=nprobe, persist=False)
        self._partition.nprobe = nprobe
        return self._partition

    def neighbours(self, queries: np.ndarray, params: MechanismParams, strategy: Strategy,
                   nprobe: int) -> ShardAnswer:
        """For each (already normalised) query: (global rows, stored vectors) of its k nearest
        among this shard's own Poisson(q) subsample -- the single-node step on this shard."""
        queries = check_queries(queries, self._index.dim)
        if strategy not in SHARD_STRATEGIES:
            raise InvalidParameterError(f"unknown shard strategy {strategy!r}")
        searcher = self._candidate_sets(nprobe) if strategy == "probed" else None
        local = PrivateRetrieval(self._index, params, _NoRelease(), strategy=strategy,
                                 searcher=searcher)  # draws its coins from OS entropy
        # vectors in the storage dtype (float16 halves the transfer); the coordinator casts to
        # float32 exactly as EmbeddingIndex.rows_float32 does
        vectors = self._index.vectors
        return [(rows + self._offset, np.asarray(vectors[self._index.check_rows(rows)]))
                for rows in local._neighbour_rows(queries)]


class ShardBackend(Protocol):
    """Where the shards run: :class:`LocalShards` (this process) or ``sharded_ray.RayShards``."""

    n: int  # records over all shards
    dim: int
    nlist: int | None  # the public quantizer's list count (None: no quantizer)
    offsets: list[int]  # first global row of every shard, and the total at the end

    def neighbours(self, queries: np.ndarray, params: MechanismParams, strategy: Strategy,
                   nprobe: int) -> list[ShardAnswer]: ...


class LocalShards:
    """Every shard of a sharded index in this process (single-node commands on a sharded index)."""

    def __init__(self, sharded: Any) -> None:  # a dprdm.retrieval.shards.ShardedIndex
        from dprdm.privacy.binding import shard_fingerprints

        self.n, self.dim, self.nlist = sharded.n, sharded.dim, sharded.nlist
        self.offsets = [s.offset for s in sharded.shards] + [sharded.n]
        self._shards = [ShardNeighbours(s.path, s.offset, s.embeddings_sha256, fingerprint)
                        for s, fingerprint in zip(sharded.shards, shard_fingerprints(sharded))]

    def neighbours(self, queries: np.ndarray, params: MechanismParams, strategy: Strategy,
                   nprobe: int) -> list[ShardAnswer]:
        return [shard.neighbours(queries, params, strategy, nprobe) for shard in self._shards]


class _FetchedVectors:
    """PrivateVectors over the neighbour vectors the shards just returned to this thread: the
    coordinator's aggregate reads them exactly as the single-node one reads the index."""

    def __init__(self, n: int, dim: int) -> None:
        self._n, self._dim = n, dim
        self._held = threading.local()

    @property
    def n(self) -> int:
        return self._n

    @property
    def dim(self) -> int:
        return self._dim

    def hold(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        self._held.rows = dict(zip(rows.tolist(), vectors))

    def rows_float32(self, rows: np.ndarray) -> np.ndarray:
        held = getattr(self._held, "rows", {})
        try:
            return np.stack([held[row] for row in np.asarray(rows).tolist()]).astype(np.float32)
        except KeyError:
            raise DprdmError("a neighbour row was not fetched from its shard") from None


class ShardedPrivateRetrieval(PrivateRetrieval):
    """PrivateRetrieval over S shards: same interface, same release distribution (module doc)."""

    def __init__(self, shards: ShardBackend, params: MechanismParams, ledger: Ledger, *,
                 strategy: Strategy = "subsample", nprobe: int = DEFAULT_NPROBE,
                 randomness: Randomness | None = None) -> None:
        super().__init__(_FetchedVectors(shards.n, shards.dim), params, ledger,
                         randomness=randomness)  # randomness: the coordinator's noise only
        if strategy not in SHARD_STRATEGIES:
            raise InvalidParameterError(f"a sharded index supports the strategies "
                                        f"{', '.join(SHARD_STRATEGIES)}, not {strategy!r}")
        if strategy == "probed":
            if shards.nlist is None:
                raise InvalidParameterError("the 'probed' strategy needs a sharded index cut "
                                            "from an index with a public quantizer")
            if isinstance(nprobe, bool) or not isinstance(nprobe, int) or not (
                    1 <= nprobe <= shards.nlist):
                raise InvalidParameterError(f"nprobe must be an integer in [1, {shards.nlist}], "
                                            f"got {nprobe!r}")
        self._strategy = strategy
        self._shards = shards
        self._nprobe = nprobe

    def _neighbour_rows(self, queries: np.ndarray) -> list[np.ndarray]:
        """Ask every shard, check every answer, merge canonically: k rows per query, or raise."""
        k = self._params.k
        answers = self._shards.neighbours(queries, self._params, self._strategy, self._nprobe)
        offsets = self._shards.offsets
        if len(answers) != len(offsets) - 1:
            raise ShardUnavailableError("a shard did not answer; nothing was released")
        for number, answer in enumerate(answers):
            if len(answer) != len(queries) or not all(
                    rows.ndim == 1 and rows.size <= k and vectors.shape == (rows.size, self.dim)
                    and (rows.size == 0 or (rows.min() >= offsets[number]
                                            and rows.max() < offsets[number + 1]))
                    for rows, vectors in answer):
                raise ShardUnavailableError(f"shard {number} answered malformed data; nothing "
                                            "was released")
        neighbour_rows, held_rows, held_vectors = [], [], []
        for i, query in enumerate(queries):
            rows = np.concatenate([answer[i][0] for answer in answers]).astype(np.int64)
            vectors = np.concatenate([answer[i][1] for answer in answers]).astype(np.float32)
            top = canonical_top_rows(query, rows, vectors, k)  # canonical score, ties by row
            neighbour_rows.append(top)
            keep = np.isin(rows, top)
            held_rows.append(rows[keep])
            held_vectors.append(vectors[keep])
        self._vectors.hold(np.concatenate(held_rows), np.concatenate(held_vectors))
        return neighbour_rows


def shard_backend(sharded: Any, ray_address: str | None, *, timeout_s: float = 60.0,
                  ray_num_cpus: int | None = None) -> ShardBackend:
    """The shards of `sharded` for a mechanism: in this process (`ray_address` None), in Ray
    actors started here (``"local"``: an in-process Ray), or the actors that ``dprdm index
    serve-shards`` started on an existing cluster (``"auto"`` or an address)."""
    if ray_address is None:
        return LocalShards(sharded)
    from dprdm.privacy import sharded_ray  # the one module that imports Ray

    sharded_ray.init_ray(ray_address, num_cpus=ray_num_cpus)
    if ray_address == "local":
        return sharded_ray.RayShards.start(sharded, timeout_s=timeout_s)
    return sharded_ray.RayShards.connect(sharded, timeout_s=timeout_s)
