"""A sharded index: one private index split into S shard indexes, named by one manifest.

Layout of a sharded index directory::

    shards.json          -- the manifest: n, dim, dtype, the source index's embeddings SHA-256,
                            the public quantizer's centroids SHA-256 (or null), and per shard its
                            directory name, first GLOBAL row (offset), row count and SHA-256
    shard-0000/ ...      -- ordinary dprdm indexes (:class:`~dprdm.retrieval.store.EmbeddingIndex`)
    ledger.sqlite        -- the ONE privacy ledger of the whole set (``dprdm budget init DIR``),
                            bound to shards.json and every shard's embeddings (privacy.binding)
    conditioning_space.json -- copied from the source index when it has one

Shard s holds the source's rows ``offset_s .. offset_s + n_s - 1``, byte for byte (no
re-normalisation, so the union of the shards IS the source index), with their ids and metadata.
A record's GLOBAL row -- how the sharded mechanism names it and breaks score ties -- is
``offset_s + local row``. Every shard carries a copy of the source's PUBLIC quantizer (the same
centroids everywhere) and its own IVF partition of its own rows under it: a record's list depends
only on the record and the public centroids, so the union of the shards' lists probed for a query
is exactly the single index's candidate set.

Writing is atomic: everything goes into a temporary sibling directory, fsync'ed, then renamed.
Nothing here reads private rows except to copy them; nothing adds noise or spends privacy.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dprdm.errors import EmbeddingIndexError, InvalidParameterError
from dprdm.files import fsync_directory
from dprdm.retrieval.store import (
    EMBEDDINGS_FILE,
    FORMAT_VERSION,
    IDS_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    EmbeddingIndex,
    file_sha256,
    read_json_object,
    rows_per_block,
    utc_now,
    write_bytes_durably,
)

SHARDS_MANIFEST_FILE = "shards.json"
# public files of the source index copied beside shards.json: the conditioning space the
# embeddings were made in (generation/backends/base.py)
PUBLIC_FILES = ("conditioning_space.json",)
SHARDS_FORMAT_VERSION = 1
MAX_SHARDS = 4096


def is_sharded(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a sharded index directory (it holds ``shards.json``)."""
    return (Path(path) / SHARDS_MANIFEST_FILE).is_file()


def shard_name(number: int) -> str:
    return f"shard-{number:04d}"


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """[(first row, end row)] of `shards` contiguous, near-equal slices of range(n)."""
    edges = [(i * n) // shards for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its directory, first global row and size (public: a function of N and S)."""

    number: int
    path: Path
    offset: int
    n: int
    embeddings_sha256: str


class ShardedIndex:
    """An opened sharded index: the manifest checked against every shard index it names."""

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[ShardInfo]) -> None:
        self.path = path
        self._manifest = manifest
        self.shards = shards

    @property
    def n(self) -> int:
        return int(self._manifest["n"])

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def dtype(self) -> str:
        return str(self._manifest["dtype"])

    @property
    def has_quantizer(self) -> bool:
        return self._manifest.get("centroids_sha256") is not None

    @property
    def nlist(self) -> int | None:
        """The public quantizer's list count, or None without a quantizer."""
        return self._manifest.get("nlist")

    @property
    def source_sha256(self) -> str:
        """SHA-256 of the source index's embeddings: the identity of the union of the shards."""
        return str(self._manifest["source_embeddings_sha256"])

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, check_shards: bool = True) -> ShardedIndex:
        """Read and check ``shards.json``; with `check_shards`, open every shard and check it."""
        path = Path(path)
        manifest_path = path / SHARDS_MANIFEST_FILE
        if not manifest_path.is_file():
            raise EmbeddingIndexError(f"no sharded index at {path} ({SHARDS_MANIFEST_FILE} is "
                                      "missing)")
        manifest = read_json_object(manifest_path)
        if manifest.get("format_version") != SHARDS_FORMAT_VERSION:
            raise EmbeddingIndexError(f"{manifest_path}: unsupported format_version")
        entries = manifest.get("shards")
        if not isinstance(entries, list) or not entries:
            raise EmbeddingIndexError(f"{manifest_path}: no shards listed")
        shards: list[ShardInfo] = []
        offset = 0
        for number, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            if name != shard_name(number) or entry.get("offset") != offset:
                raise EmbeddingIndexError(f"{manifest_path}: shard {number} is misnamed or its "
                                          "offset does not follow the previous shard")
            info = ShardInfo(number, path / name, offset, int(entry["n"]),
                             str(entry["embeddings_sha256"]))
            shards.append(info)
            offset += info.n
        if offset != manifest.get("n"):
            raise EmbeddingIndexError(f"{manifest_path}: the shards hold {offset} rows, the "
                                      f"manifest says {manifest.get('n')}")
        sharded = cls(path, manifest, shards)
        if check_shards:
            for info in shards:
                sharded.open_shard(info.number)
        return sharded

    def open_shard(self, number: int) -> EmbeddingIndex:
        """Shard `number` as an EmbeddingIndex, checked against the manifest."""
        info = self.shards[number]
        index = EmbeddingIndex.open(info.path)
        if (index.n, index.dim, index.dtype.name) != (info.n, self.dim, self.dtype) or (
                index.embeddings_sha256 != info.embeddings_sha256):
            raise EmbeddingIndexError(f"{info.path} does not match {SHARDS_MANIFEST_FILE}")
        quantizer = index.quantizer_manifest()
        if (quantizer or {}).get("centroids_sha256") != self._manifest.get("centroids_sha256"):
            raise EmbeddingIndexError(f"{info.path}: its public quantizer is not the one named "
                                      f"in {SHARDS_MANIFEST_FILE}")
        return index

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary (no vector values; shard sizes are a function of N and S)."""
        from dprdm.retrieval.store import LEDGER_FILE

        return {
            "path": str(self.path.resolve()),
            "sharded": True,
            "n": self.n,
            "dim": self.dim,
            "dtype": self.dtype,
            "shards": [{"name": s.path.name, "offset": s.offset, "n": s.n} for s in self.shards],
            "has_quantizer": self.has_quantizer,
            "nlist": self._manifest.get("nlist"),
            "has_ledger": (self.path / LEDGER_FILE).exists(),
            "created": self._manifest.get("created"),
        }


def _write_shard(source: EmbeddingIndex, start: int, stop: int, out: Path) -> str:
    """Copy rows start..stop-1 (bytes unchanged), their ids and metadata into a new index at
    `out`; return the SHA-256 of its embeddings file."""
    out.mkdir()
    n = stop - start
    header = {"descr": np.lib.format.dtype_to_descr(source.dtype), "fortran_order": False,
              "shape": (n, source.dim)}
    with open(out / EMBEDDINGS_FILE, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        step = rows_per_block(source.dim)
        for first in range(start, stop, step):
            handle.write(np.ascontiguousarray(source.vectors[first : min(stop, first + step)])
                         .tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    write_bytes_durably(out / IDS_FILE,
                        (json.dumps(source.ids[start:stop], ensure_ascii=False) + "\n").encode())
    metadata = source.metadata
    if metadata is not None:
        lines = (json.dumps(entry, ensure_ascii=False) for entry in metadata[start:stop])
        write_bytes_durably(out / METADATA_FILE, ("\n".join(lines) + "\n").encode())
    digest = file_sha256(out / EMBEDDINGS_FILE)
    manifest = {"format_version": FORMAT_VERSION, "n": n, "dim": source.dim,
                "dtype": source.dtype.name, "created": utc_now(), "normalized": True,
                "has_metadata": metadata is not None, "embeddings_sha256": digest}
    write_bytes_durably(out / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
    fsync_directory(out)
    return digest


def shard_index(source_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                shards: int) -> ShardedIndex:
    """Split the index at `source_dir` into `shards` shard indexes under a new `out_dir`.

    Each shard gets the source's public quantizer (when it has one) and the IVF partition of its
    own rows. `out_dir` must not exist. The source is left untouched (its ledger too: a sharded
    copy gets its own ledger, so its budget must be set knowing what the source already spent).
    """
    from dprdm.retrieval.partition import IVFPartition
    from dprdm.retrieval.search import PublicQuantizer

    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise InvalidParameterError(f"--shards must be an integer in [1, {MAX_SHARDS}], "
                                    f"got {shards!r}")
    source = EmbeddingIndex.open(source_dir)
    if shards > source.n:
        raise InvalidParameterError(f"cannot split {source.n} records into {shards} shards")
    out_dir = Path(out_dir)
    if os.path.lexists(out_dir):
        raise EmbeddingIndexError(f"{out_dir} already exists; shard into a new directory")
    quantizer = (PublicQuantizer.load(source.path) if source.quantizer_manifest() is not None
                 else None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.building-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        entries = []
        for number, (start, stop) in enumerate(shard_bounds(source.n, shards)):
            path = staging / shard_name(number)
            digest = _write_shard(source, start, stop, path)
            if quantizer is not None:
                quantizer.save(path)
                IVFPartition(EmbeddingIndex.open(path), quantizer).save()
            entries.append({"name": shard_name(number), "offset": start, "n": stop - start,
                            "embeddings_sha256": digest})
        manifest = {
            "format_version": SHARDS_FORMAT_VERSION,
            "n": source.n, "dim": source.dim, "dtype": source.dtype.name,
            "created": utc_now(),
            "source_embeddings_sha256": source.embeddings_sha256,
            "centroids_sha256": (quantizer.manifest()["centroids_sha256"]
                                 if quantizer is not None else None),
            "nlist": quantizer.nlist if quantizer is not None else None,
            "shards": entries,
        }
        for name in PUBLIC_FILES:  # the encoder record: public
            if (source.path / name).is_file():
                write_bytes_durably(staging / name, (source.path / name).read_bytes())
        write_bytes_durably(staging / SHARDS_MANIFEST_FILE,
                            (json.dumps(manifest, indent=1) + "\n").encode())
        fsync_directory(staging)
        os.rename(staging, out_dir)
        fsync_directory(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ShardedIndex.open(out_dir)


def open_index(path: str | os.PathLike[str]) -> EmbeddingIndex | ShardedIndex:
    """The index at `path`, sharded or not (both have n, dim and info()), WITHOUT its ledger:
    for describing it. Releases go through :func:`dprdm.privacy.binding.open_private_index`."""
    return ShardedIndex.open(path) if is_sharded(path) else EmbeddingIndex.open(path)
