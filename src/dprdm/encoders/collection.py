"""Embedding a real image collection with a generator's image tower: batched, resumable, sharded.

Owns :func:`embed_collection`, behind ``dprdm encoders embed --images DIR``:

* the files are listed once (:func:`dprdm.data.scan_image_folder`, sorted relative paths) and a
  shard ``i/n`` takes the i-th of n contiguous blocks of that list, so shard outputs concatenated
  in shard order are the whole folder in order (``dprdm index build`` takes them all at once);
* files are decoded ``batch_size`` at a time (:func:`dprdm.data.iter_image_folder`) and embedded
  on the tower's device; a corrupt or unreadable file is named and skipped, never fatal;
* progress is journaled in ``OUT.partial/``: the list is cut into chunks of ``chunk_files``
  files, each finished chunk is written atomically (its rows, ids and skips); an interrupted run
  started again with the same arguments continues after the last finished chunk. A journal of
  another job (other folder, shard, tower or file list) is refused, never mixed in;
* when every chunk is done, OUT is assembled on disk (memory-mapped, not in RAM), renamed into
  place, its ids and provenance (with the tower's :class:`ConditioningSpace`) are written, and the
  journal is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dprdm.errors import InvalidParameterError
from dprdm.files import save_npy_atomically, write_bytes_atomically

JOURNAL_SUFFIX = ".partial"
PLAN_FILE = "plan.json"
CHUNK_FILES = 4096  # files per journaled chunk
Progress = Callable[[int, int], None]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise InvalidParameterError(f"--shard must be i/n (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise InvalidParameterError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return index, count


def shard_of(names: list[str], index: int, count: int) -> list[str]:
    """The index-th of `count` contiguous, near-equal blocks of `names`."""
    n = len(names)
    return names[index * n // count:(index + 1) * n // count]


def journal_dir(out: Path) -> Path:
    return out.with_name(out.name + JOURNAL_SUFFIX)


def _names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _open_journal(journal: Path, plan: dict[str, Any]) -> None:
    """Create the journal, or check that an existing one belongs to this very job."""
    plan_file = journal / PLAN_FILE
    if plan_file.is_file():
        try:
            saved = json.loads(plan_file.read_text(encoding="utf-8"))
        except ValueError:
            saved = None
        if saved != plan:
            differs = sorted(k for k in plan if not isinstance(saved, dict)
                             or saved.get(k) != plan[k])
            raise InvalidParameterError(
                f"{journal} holds a partial run of another job (it differs in "
                f"{', '.join(differs) or 'its plan'}): run the same command again, or delete "
                f"{journal} to start over")
        return
    journal.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(plan_file, (json.dumps(plan, indent=1) + "\n").encode())


def _chunk_paths(journal: Path, number: int) -> tuple[Path, Path]:
    return journal / f"chunk-{number:07d}.npy", journal / f"chunk-{number:07d}.json"


def embed_collection(tower, images: Path, out: Path, *, batch_size: int = 64,
                     shard: tuple[int, int] = (0, 1), chunk_files: int = CHUNK_FILES,
                     public: bool = False, ids_out: Path | None = None, size: int | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Embed every image under `images` (this shard's part) with `tower` into `out` (.npy).

    `tower` has ``embed_images(uint8 (N, S, S, 3), batch_size)``, ``load_size``, ``space`` and
    ``describe()`` (:class:`dprdm.generation.backends.ImageTower`); images are decoded at `size`
    (default the tower's ``load_size``). Returns what was written,
    the skip counts per reason (with examples) and how many chunks an earlier run had finished.
    Nothing decodable: an error, and no output (the journal is removed too).
    """
    from dprdm.data import LoadReport, describe_skips, iter_image_folder, scan_image_folder
    from dprdm.data.loaders import CAPTION_FILES, FOLDER_IMAGE_EXTENSIONS
    from dprdm.provenance import write_sidecar

    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise InvalidParameterError(f"--images must be a folder: {images}")
    if out.suffix.lower() != ".npy":
        raise InvalidParameterError(f"--out must end in .npy, got {out}")
    if isinstance(chunk_files, bool) or not isinstance(chunk_files, int) or chunk_files < 1:
        raise InvalidParameterError("chunk_files must be a positive integer")
    index, count = shard
    scan_report = LoadReport()
    names = shard_of(scan_image_folder(images, scan_report, exclude=CAPTION_FILES), index, count)
    size = int(size or tower.load_size)
    plan = {"images": str(images.resolve()), "shard": f"{index}/{count}", "files": len(names),
            "files_sha256": _names_digest(names), "space": tower.space.to_dict(),
            "load_size": size, "chunk_files": chunk_files}
    journal = journal_dir(out)
    made_parent = not out.parent.exists()
    _open_journal(journal, plan)
    chunks = [names[start:start + chunk_files] for start in range(0, len(names), chunk_files)]
    resumed = sum(1 for number in range(len(chunks)) if _chunk_paths(journal, number)[1].is_file())
    done = sum(len(chunk) for number, chunk in enumerate(chunks)
               if _chunk_paths(journal, number)[1].is_file())
    if progress is not None:
        progress(done, len(names))
    for number, chunk in enumerate(chunks):
        rows_path, record_path = _chunk_paths(journal, number)
        if record_path.is_file():
            continue
        report, ids, parts = LoadReport(), [], []
        for batch_ids, pixels in iter_image_folder(images, size, batch_size, report,
                                                   show_progress=False, names=chunk):
            parts.append(np.asarray(tower.embed_images(pixels, batch_size), dtype=np.float32))
            ids += batch_ids
        rows = np.concatenate(parts) if parts else np.zeros((0, tower.space.dim), np.float32)
        save_npy_atomically(rows_path, rows)
        skipped = [[str(Path(where).relative_to(images)) if Path(where).is_relative_to(images)
                    else where, reason, kind]
                   for (where, reason), kind in zip(report.skipped, report.kinds)]
        write_bytes_atomically(record_path, json.dumps({"ids": ids, "skipped": skipped}).encode())
        done += len(chunk)
        if progress is not None:
            progress(done, len(names))

    # every chunk is done: gather ids and skips, then assemble OUT on disk
    total = LoadReport()
    for where, reason in scan_report.skipped:
        total.skip(Path(where).relative_to(images).as_posix(), reason, "unsupported_type")
    ids, lengths = [], []
    for number in range(len(chunks)):
        record = json.loads(_chunk_paths(journal, number)[1].read_text(encoding="utf-8"))
        ids += record["ids"]
        lengths.append(len(record["ids"]))
        for where, reason, kind in record["skipped"]:
            total.skip(where, reason, kind)
    total.n_loaded = len(ids)
    if not ids:
        shutil.rmtree(journal, ignore_errors=True)
        if made_parent:
            with contextlib.suppress(OSError):
                out.parent.rmdir()  # only when empty: nothing of ours is left behind
        raise InvalidParameterError(
            f"nothing to embed: no decodable image under {images} (shard {index}/{count}; looked "
            f"for {', '.join(FOLDER_IMAGE_EXTENSIONS)}, recursively); skipped: "
            f"{describe_skips(total)}; no file was written")
    dim = tower.space.dim
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.assembling.npy")
    matrix = np.lib.format.open_memmap(staging, mode="w+", dtype=np.float32,
                                       shape=(len(ids), dim))
    row = 0
    for number, length in enumerate(lengths):
        if length:
            matrix[row:row + length] = np.load(_chunk_paths(journal, number)[0])
            row += length
    matrix.flush()
    del matrix
    with open(staging, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(staging, out)
    ids_path = ids_out or out.with_suffix(".ids.json")
    write_bytes_atomically(ids_path, (json.dumps(ids) + "\n").encode())
    described = tower.describe()
    sidecar = write_sidecar(out, public=public, source=str(images.resolve()),
                            tool="dprdm encoders embed" + (" --public" if public else ""),
                            rows=len(ids), dim=dim, encoder=described.get("encoder", ""),
                            generator=described.get("generator", ""),
                            conditioning_space=tower.space.to_dict(), shard=f"{index}/{count}")
    shutil.rmtree(journal, ignore_errors=True)
    return {"embeddings": str(out), "ids": str(ids_path), "provenance": str(sidecar),
            "rows": len(ids), "dim": dim, "shard": f"{index}/{count}", "files": len(names),
            "chunks_resumed": resumed, "report": total}


__all__ = ["CHUNK_FILES", "embed_collection", "journal_dir", "parse_shard", "shard_of"]
