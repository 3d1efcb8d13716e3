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
Computing the assignment reads every row once against every centroid (N x nlist canonical scores,
about 30 s at N = 10^6, nlist = 1000), so it is done once -- by ``dprdm index quantize`` -- and
saved in the index directory:

* ``partition-<id>.rows.npy``    -- (N,) int64, the row numbers sorted by (list, row);
* ``partition-<id>.offsets.npy`` -- (nlist + 1,) int64, list j holds rows[offsets[j]:offsets[j+1]];
* ``partition.json``             -- the manifest: n, dim, nlist, the SHA-256 of the index's
  embeddings and of the quantizer's centroids it was computed from, the two file names and their
  SHA-256s.

:meth:`IVFPartition.open` memory-maps the two arrays after checking the manifest against the
index and the quantizer (a partition of other rows or other centroids is stale: it is recomputed,
never used). Saving is atomic with one commit point: the arrays go to new, uniquely named files
(written, fsync'ed), then ``partition.json`` is replaced atomically to name them, then the old
generation's files are deleted. A failure or a crash before the commit leaves the previous
partition (or none) in force; unreferenced ``partition-*`` files are removed by the next save.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.errors import EmbeddingIndexError, InvalidParameterError
from dprdm.files import fsync_directory, write_bytes_atomically
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
from dprdm.retrieval.store import (
    PARTITION_MANIFEST_FILE,
    QUANTIZER_MANIFEST_FILE,
    EmbeddingIndex,
    file_sha256,
    read_json_object,
    utc_now,
)

PARTITION_FORMAT_VERSION = 1
PARTITION_FILE_PREFIX = "partition-"


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


def assign_rows(index: EmbeddingIndex, centroids: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """(N,) list number of every row: its canonically nearest centroid, ties to the lower one."""
    assignment = np.empty(index.n, np.int64)
    step = max(1, SCORE_BLOCK_ELEMENTS // len(centroids))
    for first_row, block in index.iter_blocks(step):
        assignment[first_row : first_row + len(block)] = nearest_centroids(
            block, centroids, 1)[:, 0]
    return assignment


def csr_from_assignment(assignment: npt.NDArray[np.int64],
                        nlist: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(rows sorted by (list, row), offsets) -- list j holds rows[offsets[j]:offsets[j + 1]]."""
    rows = np.argsort(assignment, kind="stable").astype(np.int64, copy=False)
    sizes = np.bincount(assignment, minlength=nlist)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return rows, offsets


class StalePartitionError(EmbeddingIndexError):
    """The saved partition is missing, unreadable, or was computed from other rows or centroids."""


class IVFPartition:
    """The private rows grouped by their public centroid; candidate sets per query.

    ``IVFPartition(index, quantizer)`` computes the assignment; :meth:`open` reuses the one saved
    in the index directory when it is current, :meth:`save` writes it there.
    """

    def __init__(self, index: EmbeddingIndex, quantizer: PublicQuantizer,
                 nprobe: int | None = None, *,
                 csr: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None) -> None:
        if quantizer.dim != index.dim:
            raise InvalidParameterError(
                f"quantizer has dimension {quantizer.dim} but the index has {index.dim}"
            )
        self.index = index
        self.quantizer = quantizer
        self.n = index.n
        self.dim = index.dim
        self.nlist = quantizer.nlist
        self.nprobe = min(DEFAULT_NPROBE, self.nlist) if nprobe is None else nprobe
        self.centroids = np.ascontiguousarray(quantizer.centroids, dtype=np.float32)
        self.loaded = csr is not None  # True: memory-mapped from the saved files (see load)
        if csr is None:
            csr = csr_from_assignment(assign_rows(index, self.centroids), self.nlist)
        self._rows, self._offsets = csr  # (N,) rows by (list, row); (nlist + 1,) list starts
        self.list_sizes = np.diff(self._offsets)

    # ---- persistence ------------------------------------------------------------------------

    @classmethod
    def load(cls, index: EmbeddingIndex, quantizer: PublicQuantizer | None = None,
             nprobe: int | None = None) -> IVFPartition:
        """The partition saved in the index directory, memory-mapped, after checking that it was
        computed from these rows (n, dim, embeddings SHA-256) and these centroids (SHA-256).

        Raises :class:`StalePartitionError` when it is missing, unreadable or stale.
        `quantizer` defaults to the index's saved quantizer.
        """
        if quantizer is None:
            quantizer = PublicQuantizer.load(index.path)
        manifest_path = index.path / PARTITION_MANIFEST_FILE
        if not manifest_path.is_file():
            raise StalePartitionError(f"no saved IVF partition in {index.path}")
        try:
            manifest = read_json_object(manifest_path)
        except EmbeddingIndexError as error:
            raise StalePartitionError(str(error)) from error
        expected = {
            "format_version": PARTITION_FORMAT_VERSION,
            "n": index.n,
            "dim": index.dim,
            "nlist": quantizer.nlist,
            "centroids_sha256": quantizer.manifest()["centroids_sha256"],
        }
        for key, value in expected.items():
            if manifest.get(key) != value:
                raise StalePartitionError(
                    f"the saved IVF partition is stale: its {key} does not match the "
                    + ("quantizer" if key in ("nlist", "centroids_sha256") else "index")
                )
        if manifest.get("embeddings_sha256") != index.embeddings_sha256:
            raise StalePartitionError(
                "the saved IVF partition is stale: it was computed from other embeddings")
        rows = _load_part(index.path, manifest, "rows", (index.n,))
        offsets = _load_part(index.path, manifest, "offsets", (quantizer.nlist + 1,))
        if offsets[0] != 0 or offsets[-1] != index.n or (np.diff(offsets) < 0).any():
            raise StalePartitionError(
                f"{index.path}: the saved IVF partition's offsets are invalid")
        return cls(index, quantizer, nprobe, csr=(rows, offsets))

    @classmethod
    def open(cls, index: EmbeddingIndex, quantizer: PublicQuantizer | None = None,
             nprobe: int | None = None, *, persist: bool = True,
             notice: Callable[[str], object] | None = None) -> IVFPartition:
        """The saved partition when it is current, else a freshly computed one.

        A computed partition is saved into the index directory (for the next open) when `persist`
        and `quantizer` is the index's own saved quantizer (or None); a directory that cannot be
        written is not an error -- the partition is then used from memory only. `notice(text)`
        is told why the records are re-assigned (missing or stale partition).
        """
        own = quantizer is None or _is_saved_quantizer(index, quantizer)
        if quantizer is None:
            quantizer = PublicQuantizer.load(index.path)
        if own:
            try:
                return cls.load(index, quantizer, nprobe)
            except StalePartitionError as error:
                if notice is not None:
                    notice(f"{error}; assigning the {index.n} records to the quantizer's lists"
                           + (" (saved for the next call)" if persist else ""))
        partition = cls(index, quantizer, nprobe)
        if persist and own:
            try:
                partition.save()
            except OSError as error:
                if notice is not None:
                    notice(f"could not save the IVF partition in {index.path}: {error}")
        return partition

    def save(self) -> None:
        """Write the partition into its index directory (atomically; see the module docstring).

        Only for the index's own saved quantizer: a partition names the centroids it was
        computed from, and :meth:`load` would refuse it otherwise."""
        directory = self.index.path
        if not _is_saved_quantizer(self.index, self.quantizer):
            raise InvalidParameterError(
                f"the partition's quantizer is not the one saved in {directory}; save it first")
        generation = uuid.uuid4().hex[:12]
        names = {part: f"{PARTITION_FILE_PREFIX}{generation}.{part}.npy"
                 for part in ("rows", "offsets")}
        manifest: dict[str, Any] = {
            "format_version": PARTITION_FORMAT_VERSION,
            "n": self.n,
            "dim": self.dim,
            "nlist": self.nlist,
            "embeddings_sha256": self.index.embeddings_sha256,
            "centroids_sha256": self.quantizer.manifest()["centroids_sha256"],
            "created": utc_now(),
        }
        written: list[Path] = []
        try:
            for part, array in (("rows", self._rows), ("offsets", self._offsets)):
                path = directory / names[part]
                written.append(path)
                _write_npy_durably(path, np.asarray(array, dtype=np.int64))
                manifest[f"{part}_file"] = names[part]
                manifest[f"{part}_sha256"] = file_sha256(path)
            fsync_directory(directory)
            # the commit point: from here on the new generation is the partition
            write_bytes_atomically(directory / PARTITION_MANIFEST_FILE,
                                   (json.dumps(manifest, indent=1) + "\n").encode())
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        for stale in directory.glob(f"{PARTITION_FILE_PREFIX}*.npy"):
            if stale.name not in names.values():
                stale.unlink(missing_ok=True)

    # ---- the candidate sets -------------------------------------------------------------------

    @property
    def nprobe(self) -> int:
        """Lists probed per query; may be changed between calls (the assignment stays)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = check_nprobe(value, self.nlist)

    @property
    def rows(self) -> npt.NDArray[np.int64]:
        """(N,) row numbers sorted by (list, row) -- the CSR member array (may be memory-mapped)."""
        return self._rows

    @property
    def offsets(self) -> npt.NDArray[np.int64]:
        """(nlist + 1,) list boundaries in :attr:`rows`."""
        return self._offsets

    @cached_property
    def assignment(self) -> npt.NDArray[np.int64]:
        """(N,) list number of every row (derived from the CSR arrays on first use)."""
        assignment = np.empty(self.n, np.int64)
        assignment[self._rows] = np.repeat(np.arange(self.nlist, dtype=np.int64), self.list_sizes)
        return assignment

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


def _is_saved_quantizer(index: EmbeddingIndex, quantizer: PublicQuantizer) -> bool:
    """Whether `quantizer` has the centroids of the quantizer saved in the index directory."""
    if not (index.path / QUANTIZER_MANIFEST_FILE).is_file():
        return False
    saved = index.quantizer_manifest() or {}
    return saved.get("centroids_sha256") == quantizer.manifest()["centroids_sha256"]


def _write_npy_durably(path: Path, array: npt.NDArray[Any]) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    with open(path, "xb") as handle:  # a fresh name: never an existing file
        handle.write(buffer.getbuffer())
        handle.flush()
        os.fsync(handle.fileno())


def _load_part(directory: Path, manifest: dict[str, Any], part: str,
               shape: tuple[int, ...]) -> npt.NDArray[np.int64]:
    name = manifest.get(f"{part}_file")
    if not isinstance(name, str) or Path(name).name != name or not name.startswith(
            PARTITION_FILE_PREFIX):
        raise StalePartitionError(f"{directory / PARTITION_MANIFEST_FILE}: bad {part}_file")
    path = directory / name
    try:
        if file_sha256(path) != manifest.get(f"{part}_sha256"):
            raise StalePartitionError(f"{path} does not match {PARTITION_MANIFEST_FILE}")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise StalePartitionError(f"{path} is missing or unreadable") from error
    if array.dtype != np.int64 or array.shape != shape:
        raise StalePartitionError(f"{path} has dtype {array.dtype} and shape {array.shape}, "
                                  f"expected int64 {shape}")
    return array
