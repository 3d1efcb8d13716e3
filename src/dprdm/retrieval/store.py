"""The on-disk embedding index: atomic building, validated opening, read-only memory-mapped rows.

An index is a directory holding

* ``embeddings.npy``  -- the N x d matrix of L2-normalised rows (``np.save`` format, so it can be
  memory-mapped with ``np.load(mmap_mode="r")``), float32 or float16;
* ``ids.json``        -- the record id of every row (str or int; default ``0 .. N-1``);
* ``metadata.jsonl``  -- optional, one JSON object per row;
* ``index.json``      -- the manifest (format_version, n, dim, dtype, created, normalized);
* ``quantizer.*``     -- optional public coarse quantizer (see :mod:`dprdm.retrieval.search`);
* ``partition.json`` and ``partition-<id>.{rows,offsets}.npy`` -- optional, the rows grouped by
  their public centroid (CSR), written with the quantizer (see :mod:`dprdm.retrieval.partition`);
* ``ledger.sqlite``   -- the privacy ledger, when the privacy layer keeps it beside the index.

Building is atomic: every file is written and fsync'ed inside a temporary sibling directory which
is then renamed into place, so an exception or a crash leaves the previous index (or none), never
a half-written one. A rebuild never replaces a directory that holds a privacy ledger: that would
silently reset the privacy budget spent on the old records.

Row numbers (0 .. N-1) are how the rest of dprdm names records; ids are only carried along.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.errors import EmbeddingIndexError, InvalidParameterError
from dprdm.files import fsync_directory

FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.json"
METADATA_FILE = "metadata.jsonl"
MANIFEST_FILE = "index.json"
LEDGER_FILE = "ledger.sqlite"
QUANTIZER_CENTROIDS_FILE = "quantizer.npy"
QUANTIZER_MANIFEST_FILE = "quantizer.json"
PARTITION_MANIFEST_FILE = "partition.json"

STORAGE_DTYPES = ("float32", "float16")
# Row numbers are packed into 32 bits by the searchers (see search.py).
MAX_ROWS = 2**32 - 2
# Rows are normalised and written in blocks of about this many matrix elements (~32 MB in float64).
BLOCK_ELEMENTS = 2**22
# Error messages list at most this many offending row numbers.
ROWS_SHOWN = 20

ProgressCallback = Callable[[int, int], None]
RecordId = str | int


def rows_per_block(dim: int) -> int:
    """Rows of a d-dimensional matrix that fit in one processing block."""
    return max(1, BLOCK_ELEMENTS // max(1, dim))


def describe_rows(rows: Sequence[int] | npt.NDArray[np.integer]) -> str:
    """'rows 3, 17 (2 rows)' -- the first ROWS_SHOWN row numbers and the total count."""
    rows = [int(r) for r in rows]
    shown = ", ".join(str(r) for r in rows[:ROWS_SHOWN])
    more = f", ... ({len(rows)} rows in total)" if len(rows) > ROWS_SHOWN else ""
    noun = "row" if len(rows) == 1 else "rows"
    return f"{noun} {shown}{more}"


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: np.dtype) -> type[np.floating]:
    """float64 for float64 and integer input (no precision lost before the cast), else float32."""
    if dtype == np.float64 or np.issubdtype(dtype, np.integer):
        return np.float64
    return np.float32


def normalize_rows(block: npt.ArrayLike) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.bool_]]:
    """L2-normalise every row; return (unit rows, mask of rows that cannot be normalised).

    A row cannot be normalised when it holds a non-finite value or is all zeros; such rows come
    back as zeros and are flagged in the mask. Each row is first divided by its largest absolute
    value, so the norm neither overflows (huge values) nor underflows (tiny ones). Signed zeros are
    canonicalised to +0.0, so equal vectors are bitwise equal. The computation is per row, hence
    independent of the other rows in the block.
    """
    array = np.asarray(block)
    x = np.array(array, dtype=_compute_dtype(array.dtype), copy=True)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(x).all(axis=1)
        x[~finite] = 0
        scale = np.max(np.abs(x), axis=1)
    bad = ~finite | (scale == 0)
    scale[bad] = 1
    x /= scale[:, None]
    norms = np.sqrt(np.sum(x * x, axis=1))
    norms[bad] = 1  # bad rows are all zeros by now
    x /= norms[:, None]
    x += 0.0  # -0.0 -> +0.0
    return x, bad


# float16 rounds each element to within a relative 2^-11 (normal numbers); scaling a unit row by
# 1 / (1 + 2^-11) first keeps the rounded row's norm <= 1 unless subnormals round up.
FLOAT16_PRESCALE = 1.0 / (1.0 + 2.0**-11)
FLOAT16_SHRINK = 1.0 - 2.0**-11  # applied again to any row whose float16 norm still exceeds 1


def to_storage_rows(unit: npt.NDArray[np.floating], storage: np.dtype) -> npt.NDArray[Any]:
    """Unit rows in the storage dtype, each with norm <= 1 EXACTLY as stored values read back.

    float32 rows are cast as they are (norm 1 to within ~1e-7; the release clamps every row to
    norm <= 1 anyway). float16 rows are scaled down by the worst-case rounding before the cast,
    then any row whose float16 values still have norm > 1 (computed in float64) is shrunk and
    recast until none does: stored norms lie in [1 - 2^-10, 1] up to subnormal effects."""
    if storage != np.float16:
        return np.ascontiguousarray(unit, dtype=storage)
    scaled = np.asarray(unit, dtype=np.float64) * FLOAT16_PRESCALE
    stored = scaled.astype(np.float16)
    while True:
        wide = stored.astype(np.float64)
        over = np.flatnonzero(np.sqrt(np.einsum("ij,ij->i", wide, wide)) > 1.0)
        if over.size == 0:
            return np.ascontiguousarray(stored)
        scaled[over] *= FLOAT16_SHRINK
        stored[over] = scaled[over].astype(np.float16)


def describe_bad_rows(nonfinite: Sequence[int], zero: Sequence[int], what: str) -> str:
    """Error text naming the rows that cannot be L2-normalised (row numbers only, no values)."""
    parts = []
    if nonfinite:
        parts.append(f"non-finite values in {describe_rows(nonfinite)}")
    if zero:
        parts.append(f"zero norm in {describe_rows(zero)}")
    total = len(nonfinite) + len(zero)
    return f"{total} {what} cannot be L2-normalised: " + "; ".join(parts)


def _split_bad(block: npt.NDArray[Any], bad: npt.NDArray[np.bool_], offset: int,
               nonfinite: list[int], zero: list[int]) -> None:
    for row in np.flatnonzero(bad):
        target = nonfinite if not np.isfinite(block[row]).all() else zero
        target.append(offset + int(row))


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def check_matrix(embeddings: object, what: str = "embeddings") -> npt.NDArray[Any]:
    """The input as a real N x d array (N, d >= 1); nothing is copied for ndarrays or memmaps."""
    if not isinstance(embeddings, np.ndarray):
        try:
            embeddings = np.asarray(embeddings)
        except (TypeError, ValueError) as error:
            raise InvalidParameterError(f"{what} must be an N x d numeric array") from error
    dtype = embeddings.dtype
    numeric = np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
    if dtype == np.bool_ or not numeric:
        raise InvalidParameterError(f"{what} must hold real numbers, got dtype {dtype}")
    if embeddings.ndim != 2:
        raise InvalidParameterError(
            f"{what} must be a 2-D (N x d) array, got shape {tuple(embeddings.shape)}"
        )
    n, dim = embeddings.shape
    if n == 0 or dim == 0:
        raise InvalidParameterError(
            f"{what} must have at least one row and one column, got {n} x {dim}"
        )
    if n > MAX_ROWS:
        raise InvalidParameterError(f"{what} has {n} rows; at most {MAX_ROWS} are supported")
    return embeddings


def _check_storage_dtype(dtype: str | np.dtype | type) -> np.dtype:
    try:
        storage = np.dtype(dtype)
    except TypeError as error:
        message = f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}"
        raise InvalidParameterError(message) from error
    if storage.name not in STORAGE_DTYPES:
        raise InvalidParameterError(f"dtype must be one of {STORAGE_DTYPES}, got {storage.name}")
    return storage


def _check_ids(ids: Sequence[RecordId] | None, n: int) -> list[RecordId]:
    if ids is None:
        return list(range(n))
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence | np.ndarray):
        raise InvalidParameterError("ids must be a list of str or int")
    checked: list[RecordId] = []
    for value in ids:
        if isinstance(value, np.integer):
            value = int(value)
        elif isinstance(value, np.str_):
            value = str(value)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidParameterError(
                f"ids must be str or int, got {type(value).__name__} at row {len(checked)}"
            )
        checked.append(value)
    if len(checked) != n:
        raise InvalidParameterError(f"got {len(checked)} ids for {n} embedding rows")
    if len({type(value) for value in checked}) > 1:
        raise InvalidParameterError("ids must be all str or all int, not a mix")
    first_row: dict[RecordId, int] = {}
    duplicates: list[int] = []
    for row, value in enumerate(checked):
        if value in first_row:
            duplicates.append(row)
        else:
            first_row[value] = row
    if duplicates:
        raise InvalidParameterError(
            f"ids must be unique (a record indexed twice would be retrieved twice): "
            f"{describe_rows(duplicates)} repeat an earlier id"
        )
    return checked


def _check_metadata(metadata: Sequence[Mapping[str, Any]] | None, n: int) -> list[str] | None:
    if metadata is None:
        return None
    if isinstance(metadata, (str, bytes, Mapping)) or not isinstance(metadata, Sequence):
        raise InvalidParameterError("metadata must be a list with one JSON object per row")
    if len(metadata) != n:
        raise InvalidParameterError(f"got {len(metadata)} metadata entries for {n} embedding rows")
    lines = []
    for row, entry in enumerate(metadata):
        if not isinstance(entry, Mapping):
            raise InvalidParameterError(f"metadata row {row} is not a JSON object")
        try:
            lines.append(json.dumps(dict(entry), ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise InvalidParameterError(f"metadata row {row} is not JSON-serialisable") from error
    return lines


# --------------------------------------------------------------------------------------------
# Durable writes
# --------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 16 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(1 << 24):
            digest.update(piece)
    return digest.hexdigest()


def write_bytes_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_json(path: Path, value: Any) -> None:
    write_bytes_durably(path, (json.dumps(value, ensure_ascii=False, indent=1) + "\n").encode())


def _write_ids(path: Path, ids: list[RecordId]) -> None:
    write_bytes_durably(path, (json.dumps(ids, ensure_ascii=False) + "\n").encode())


def _write_metadata(path: Path, lines: list[str]) -> None:
    write_bytes_durably(path, ("\n".join(lines) + "\n").encode())


def _write_embeddings(path: Path, matrix: npt.NDArray[Any], storage: np.dtype,
                      progress: ProgressCallback | None) -> None:
    """Stream normalised rows into an .npy file; raise naming every row that cannot be."""
    n, dim = matrix.shape
    header = {"descr": np.lib.format.dtype_to_descr(storage), "fortran_order": False,
              "shape": (n, dim)}
    nonfinite: list[int] = []
    zero: list[int] = []
    step = rows_per_block(dim)
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for start in range(0, n, step):
            block = np.asarray(matrix[start : start + step])
            unit, bad = normalize_rows(block)
            if bad.any():
                _split_bad(block, bad, start, nonfinite, zero)
            if not nonfinite and not zero:  # keep scanning after an error to count every bad row
                handle.write(to_storage_rows(unit, storage).tobytes())
            if progress is not None:
                progress(min(start + step, n), n)
        if nonfinite or zero:
            raise InvalidParameterError(describe_bad_rows(nonfinite, zero, "embedding rows"))
        handle.flush()
        os.fsync(handle.fileno())


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# Destination handling
# --------------------------------------------------------------------------------------------


def ledger_files(directory: Path) -> list[str]:
    """Names of privacy-ledger files (``ledger.sqlite`` and its sqlite sidecars) in `directory`."""
    try:
        return sorted(p.name for p in directory.iterdir() if p.name.startswith(LEDGER_FILE))
    except FileNotFoundError:
        return []


def _had_ledger(directory: Path) -> bool:
    """Does the manifest name a privacy ledger (see dprdm.privacy.binding), present or not?"""
    try:
        privacy = json.loads((directory / MANIFEST_FILE).read_text()).get("privacy")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(privacy, dict) and bool(privacy.get("ledger_id"))


def _refuse_ledger(directory: Path) -> None:
    if ledger_files(directory) or _had_ledger(directory):
        raise EmbeddingIndexError(
            f"refusing to overwrite {directory}: it holds (or held) a privacy ledger "
            f"({LEDGER_FILE}). "
            "Rebuilding the index in place would reset the privacy budget already spent on its "
            "records; build the new index in a different directory."
        )


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise EmbeddingIndexError(
            f"{out_dir} already exists; rebuild with overwrite (--overwrite) to replace it"
        )
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise EmbeddingIndexError(f"refusing to overwrite {out_dir}: it is not a directory")
    _refuse_ledger(out_dir)
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise EmbeddingIndexError(
            f"refusing to overwrite {out_dir}: it is neither empty nor a dprdm index"
        )


def _sibling(out_dir: Path, purpose: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{purpose}-{uuid.uuid4().hex[:12]}"


def _install(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished staging directory to `out_dir`, swapping out an old index if allowed."""
    parent = out_dir.parent
    if not os.path.lexists(out_dir):
        try:
            os.rename(staging, out_dir)  # atomic; fails if a non-empty out_dir appeared meanwhile
        except OSError as error:
            message = f"could not move the new index into {out_dir}: {error}"
            raise EmbeddingIndexError(message) from error
        fsync_directory(parent)
        return
    _check_destination(out_dir, overwrite)
    retired = _sibling(out_dir, "retired")
    os.rename(out_dir, retired)
    try:
        _refuse_ledger(retired)  # a ledger created after the first check still blocks the swap
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(retired, out_dir)
        raise
    fsync_directory(parent)
    shutil.rmtree(retired, ignore_errors=True)


def build_index(
    embeddings: npt.ArrayLike,
    out_dir: str | os.PathLike[str],
    ids: Sequence[RecordId] | None = None,
    metadata: Sequence[Mapping[str, Any]] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    *,
    progress: ProgressCallback | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> EmbeddingIndex:
    """Write an N x d embedding matrix as an index at `out_dir` and open it.

    `extra_files` (name -> bytes) are written into the index with it, in the same atomic install
    (e.g. ``conditioning_space.json``: the image tower the rows were embedded with).

    Every row is L2-normalised (in float64 for float64/integer input, else float32) and then
    stored as `dtype`. float16 storage is half the size; its rows are scaled down before the cast
    so that every stored row has norm <= 1 (and >= 1 - 2^-10) as read back (``to_storage_rows``). Rows with non-finite values or zero norm,
    duplicate ids, and ids/metadata of the wrong length are refused before anything is installed.

    The index is written into a temporary sibling directory, fsync'ed and renamed into place. If
    `out_dir` exists the build is refused unless `overwrite`; even then it is refused when the
    directory holds a privacy ledger (``ledger.sqlite``) or is a non-empty non-index directory.
    Overwriting renames the old index away, renames the new one in and deletes the old one; a
    crash between the two renames leaves the old index at ``.NAME.retired-*`` beside `out_dir`.

    `progress(rows_done, rows_total)` is called after each block of rows.
    """
    out_dir = Path(out_dir)
    storage = _check_storage_dtype(dtype)
    matrix = check_matrix(embeddings)
    n, dim = matrix.shape
    id_list = _check_ids(ids, n)
    metadata_lines = _check_metadata(metadata, n)
    _check_destination(out_dir, overwrite)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out_dir, "building")
    staging.mkdir()
    try:
        _write_embeddings(staging / EMBEDDINGS_FILE, matrix, storage, progress)
        _write_ids(staging / IDS_FILE, id_list)
        if metadata_lines is not None:
            _write_metadata(staging / METADATA_FILE, metadata_lines)
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or name in (EMBEDDINGS_FILE, IDS_FILE, METADATA_FILE,
                                                   MANIFEST_FILE):
                raise InvalidParameterError(f"cannot add {name!r} to an index")
            (staging / name).write_bytes(data)
        manifest = {
            "format_version": FORMAT_VERSION,
            "n": n,
            "dim": dim,
            "dtype": storage.name,
            "created": utc_now(),
            "normalized": True,
            "has_metadata": metadata_lines is not None,
            # the identity of these rows: a saved IVF partition must name the same digest
            "embeddings_sha256": file_sha256(staging / EMBEDDINGS_FILE),
        }
        _write_json(staging / MANIFEST_FILE, manifest)  # last: a directory without it is no index
        fsync_directory(staging)
        _install(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return EmbeddingIndex.open(out_dir)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_json_object(manifest_path: Path) -> dict[str, Any]:
    """A JSON object from `manifest_path`, or a clear EmbeddingIndexError."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise EmbeddingIndexError(f"{manifest_path} is not valid JSON") from error
    if not isinstance(manifest, dict):
        raise EmbeddingIndexError(f"{manifest_path} must hold a JSON object")
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise EmbeddingIndexError(f"no embedding index at {path} ({MANIFEST_FILE} is missing)")
    manifest = read_json_object(manifest_path)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EmbeddingIndexError(
            f"{manifest_path}: unsupported format_version {version!r} (expected {FORMAT_VERSION})"
        )
    for key in ("n", "dim"):
        value = manifest.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EmbeddingIndexError(f"{manifest_path}: {key} must be a positive integer")
    if manifest.get("dtype") not in STORAGE_DTYPES:
        raise EmbeddingIndexError(f"{manifest_path}: dtype must be one of {STORAGE_DTYPES}")
    if manifest.get("normalized") is not True:
        raise EmbeddingIndexError(f"{manifest_path}: the rows are not marked as L2-normalised")
    return manifest


class EmbeddingIndex:
    """A built index, opened read-only; the embedding matrix stays on disk (memory-mapped)."""

    def __init__(self, path: Path, manifest: Mapping[str, Any], vectors: np.memmap) -> None:
        self._path = path
        self._manifest = dict(manifest)
        self._vectors = vectors

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> EmbeddingIndex:
        """Open the index at `path`, checking the manifest against the stored array."""
        path = Path(path)
        manifest = _read_manifest(path)
        embeddings_path = path / EMBEDDINGS_FILE
        if not embeddings_path.is_file():
            raise EmbeddingIndexError(f"{embeddings_path} is missing")
        if not (path / IDS_FILE).is_file():
            raise EmbeddingIndexError(f"{path / IDS_FILE} is missing")
        try:
            vectors = np.load(embeddings_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise EmbeddingIndexError(f"{embeddings_path} is not a readable .npy array") from error
        expected = (manifest["n"], manifest["dim"])
        if vectors.shape != expected:
            raise EmbeddingIndexError(
                f"{embeddings_path} has shape {tuple(vectors.shape)} but {MANIFEST_FILE} "
                f"says {expected}"
            )
        if vectors.dtype != np.dtype(manifest["dtype"]):
            raise EmbeddingIndexError(
                f"{embeddings_path} has dtype {vectors.dtype} but {MANIFEST_FILE} says "
                f"{manifest['dtype']}"
            )
        if not vectors.flags.c_contiguous:
            raise EmbeddingIndexError(f"{embeddings_path} must be stored in C (row-major) order")
        return cls(path, manifest, vectors)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def n(self) -> int:
        return int(self._manifest["n"])

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def dtype(self) -> np.dtype:
        return self._vectors.dtype

    @property
    def created(self) -> str:
        return str(self._manifest.get("created", ""))

    @cached_property
    def embeddings_sha256(self) -> str:
        """SHA-256 of ``embeddings.npy``: from the manifest (written by :func:`build_index`), or,
        for an index built before the manifest recorded it, computed from the file (~1 s/GB)."""
        recorded = self._manifest.get("embeddings_sha256")
        if isinstance(recorded, str):
            return recorded
        return file_sha256(self._path / EMBEDDINGS_FILE)

    @property
    def vectors(self) -> np.memmap:
        """The N x d unit rows, a read-only memmap in the storage dtype."""
        return self._vectors

    @cached_property
    def ids(self) -> list[RecordId]:
        """The record id of every row (read on first use)."""
        ids_path = self._path / IDS_FILE
        try:
            ids = json.loads(ids_path.read_text())
        except (OSError, ValueError) as error:
            raise EmbeddingIndexError(f"{ids_path} is not valid JSON") from error
        if not isinstance(ids, list) or len(ids) != self.n:
            raise EmbeddingIndexError(f"{ids_path} must list exactly {self.n} ids")
        return ids

    @cached_property
    def metadata(self) -> list[dict[str, Any]] | None:
        """One JSON object per row, or None when the index was built without metadata."""
        metadata_path = self._path / METADATA_FILE
        if not metadata_path.is_file():
            return None
        try:
            with open(metadata_path, encoding="utf-8") as handle:
                entries = [json.loads(line) for line in handle if line.strip()]
        except (OSError, ValueError) as error:
            raise EmbeddingIndexError(f"{metadata_path} is not valid JSON lines") from error
        if len(entries) != self.n:
            raise EmbeddingIndexError(f"{metadata_path} must hold exactly {self.n} lines")
        return entries

    @property
    def has_ledger(self) -> bool:
        return (self._path / LEDGER_FILE).exists()

    def quantizer_manifest(self) -> dict[str, Any] | None:
        """The public quantizer's manifest, or None when the index has no quantizer."""
        manifest_path = self._path / QUANTIZER_MANIFEST_FILE
        if not manifest_path.is_file():
            return None
        return read_json_object(manifest_path)

    def partition_manifest(self) -> dict[str, Any] | None:
        """The saved IVF partition's manifest, or None when there is none."""
        manifest_path = self._path / PARTITION_MANIFEST_FILE
        if not manifest_path.is_file():
            return None
        return read_json_object(manifest_path)

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary of the index (no vector values)."""
        quantizer = self.quantizer_manifest()
        if quantizer is not None:
            quantizer = {k: v for k, v in quantizer.items() if k != "centroids_sha256"}
        partition = self.partition_manifest()
        if partition is not None:  # file names and the list count only (sizes are private counts)
            partition = {k: partition.get(k) for k in ("nlist", "created", "rows_file")}
        return {
            "path": str(self._path.resolve()),
            "n": self.n,
            "dim": self.dim,
            "dtype": self.dtype.name,
            "bytes": self.n * self.dim * self.dtype.itemsize,
            "created": self.created,
            "format_version": self._manifest["format_version"],
            "has_metadata": (self._path / METADATA_FILE).is_file(),
            "has_ledger": self.has_ledger,
            "quantizer": quantizer,
            "partition": partition,
        }

    def check_rows(self, rows: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """`rows` as a 1-D int64 array of valid row numbers; -1 (padding) and others refused."""
        array = np.asarray(rows)
        if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
            raise InvalidParameterError("rows must be a 1-D array of integer row numbers")
        array = array.astype(np.int64, copy=False)
        if array.size and (array.min() < 0 or array.max() >= self.n):
            raise InvalidParameterError(
                f"row numbers must lie in [0, {self.n}); got values in "
                f"[{int(array.min())}, {int(array.max())}] (-1 marks padding, not a record)"
            )
        return array

    def rows_float32(self, rows: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Gather the given rows as a (len(rows), d) float32 array."""
        checked = self.check_rows(rows)
        return np.asarray(self._vectors[checked], dtype=np.float32)

    def iter_blocks(
        self, block_rows: int | None = None
    ) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        """Yield (first row, float32 block) over the whole matrix, block_rows rows at a time."""
        step = block_rows or rows_per_block(self.dim)
        if step < 1:
            raise InvalidParameterError(f"block_rows must be >= 1, got {step}")
        for start in range(0, self.n, step):
            yield start, np.asarray(self._vectors[start : start + step], dtype=np.float32)

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex({str(self._path)!r}, n={self.n}, dim={self.dim}, "
            f"dtype={self.dtype.name})"
        )


def load_embeddings(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """Read an N x d matrix from a .npy file (memory-mapped) or an .npz file with one array."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"no embeddings file at {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if len(names) != 1:
                    raise InvalidParameterError(
                        f"{path} holds {len(names)} arrays; expected exactly one"
                    )
                array = archive[names[0]]
        else:
            raise InvalidParameterError(f"{path}: embeddings must be a .npy or .npz file")
    except (OSError, ValueError) as error:
        if isinstance(error, InvalidParameterError):
            raise
        raise InvalidParameterError(f"{path} is not a readable numpy array file") from error
    return check_matrix(array, what=f"embeddings in {path.name}")
