"""Loading captioned image datasets from disk into one in-memory form.

Owns the result types and the three on-disk layouts dprdm reads:

* :class:`ImageDataset` -- ``images`` (uint8 N x size x size x 3), ``captions``, ``ids`` and
  per-record ``extra`` fields, plus the :class:`LoadReport` of what was skipped and why.
* :func:`load_folder` -- a folder of images (recursive) with ``captions.jsonl`` (rows ``{"file",
  "caption", ...extra}``) or ``captions.csv`` (header ``file,caption[,extra...]``), or the
  ``metadata.jsonl`` / ``metadata.csv`` of a Hugging Face ``datasets`` imagefolder (``file_name``
  plus a text column); for uses that need captions.
* :func:`iter_image_folder` / :func:`scan_image_folder` -- every image under a folder, no captions
  needed (image embeddings), decoded one batch at a time.
* :func:`load_webdataset` -- WebDataset tar shards: ``KEY.png|jpg|jpeg|webp`` beside ``KEY.txt`` or
  ``KEY.json`` (with a ``"caption"`` field). Read with :mod:`tarfile`, one member at a time.
* :func:`load_parquet` -- Parquet files with an image column of bytes or ``{"bytes": ...,
  "path": ...}`` structs (the Hugging Face datasets convention) and a caption column.
* :func:`load_dataset` -- picks one of the above from what ``source`` is.

Every image goes through :func:`dprdm.data.images.decode_image`. A corrupt or missing file, a
malformed caption row or a truncated shard never stops a load: it is recorded in the report with
its path (or key), reason and kind, skipped, and summarised once on stderr at the end
(:func:`load_folder` raises when nothing at all could be loaded). Large inputs show
a rich progress bar on stderr.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress,
                           TextColumn, TimeRemainingColumn)

from dprdm.data.images import ImageSource, UnreadableImageError, check_size, decode_image
from dprdm.errors import InvalidParameterError

CAPTION_FILES = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")
FILE_COLUMNS = ("file", "file_name")  # dprdm's own name, then the datasets imagefolder's
CAPTION_COLUMNS = ("caption", "text")  # tried in this order unless a column is named
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")  # what a WebDataset sample's image may be
# what a folder may hold: everything Pillow decodes that photos and artwork commonly come in
FOLDER_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS + ("gif", "bmp", "tif", "tiff")
PROGRESS_MIN_ITEMS = 500  # fewer items than this load without a progress bar
PROGRESS_MIN_BYTES = 64 * 2**20  # tar shards smaller than this in all load without one
WARN_LIST_MAX = 10  # the stderr warning lists at most this many skipped paths

PathLike = Union[str, Path]

_stderr = Console(stderr=True)


@dataclass
class LoadReport:
    """How a load went: records loaded, and every skipped path or key with the reason.

    Each skip also carries a short `kind` (``corrupt``, ``missing``, ``unreadable``,
    ``too_large``, ``unsupported_type``, ``not_listed``, ``no_caption``, ``bad_row``, ...) so a
    report can count skips per cause (:meth:`by_kind`).
    """

    n_loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def skip(self, where: object, reason: str, kind: str = "unreadable") -> None:
        self.skipped.append((str(where), reason))
        self.kinds.append(kind)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def by_kind(self, examples: int = 5) -> dict[str, dict[str, Any]]:
        """{kind: {"count": n, "examples": [first `examples` paths or keys]}}, in first-seen order.

        Skips recorded without a kind (an old-style ``skipped`` list) count as ``unreadable``.
        """
        kinds = self.kinds + ["unreadable"] * (len(self.skipped) - len(self.kinds))
        out: dict[str, dict[str, Any]] = {}
        for (where, _), kind in zip(self.skipped, kinds):
            entry = out.setdefault(kind, {"count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < examples:
                entry["examples"].append(where)
        return out


@dataclass
class ImageDataset:
    """Captioned images, all decoded to the same square size on a white background."""

    images: np.ndarray  # uint8, (N, size, size, 3)
    captions: list[str]
    ids: list[str]
    extra: list[dict[str, Any]]
    report: LoadReport = field(default_factory=LoadReport)

    def __post_init__(self) -> None:
        n = len(self.images)
        if not (len(self.captions) == len(self.ids) == len(self.extra) == n):
            raise InvalidParameterError(
                f"ImageDataset fields disagree in length: images={n}, captions="
                f"{len(self.captions)}, ids={len(self.ids)}, extra={len(self.extra)}"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])


class _Collector:
    """Accumulates decoded records and skip reasons while a loader walks its input."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.images: list[np.ndarray] = []
        self.captions: list[str] = []
        self.ids: list[str] = []
        self.extra: list[dict[str, Any]] = []
        self.report = LoadReport()

    def add(self, where: object, source: ImageSource, caption: object, record_id: str,
            extra: dict[str, Any]) -> bool:
        if not isinstance(caption, str):
            self.report.skip(where, f"caption is not text: {type(caption).__name__}",
                             "no_caption")
            return False
        try:
            pixels = decode_image(source, self.size)
        except UnreadableImageError as error:
            self.report.skip(where, str(error), error.kind)
            return False
        self.images.append(pixels)
        self.captions.append(caption)
        self.ids.append(record_id)
        self.extra.append(extra)
        return True

    def finish(self, what: str, warn: bool) -> ImageDataset:
        self.report.n_loaded = len(self.images)
        images = (np.stack(self.images) if self.images
                  else np.zeros((0, self.size, self.size, 3), dtype=np.uint8))
        if warn:
            warn_skipped(self.report, what)
        return ImageDataset(images, self.captions, self.ids, self.extra, self.report)


def warn_skipped(report: LoadReport, what: str) -> None:
    """Print one rich warning on stderr naming up to WARN_LIST_MAX skipped paths."""
    if not report.skipped:
        return
    lines = [f"[bold yellow]warning:[/] {escape(what)}: loaded {report.n_loaded}, skipped "
             f"{report.n_skipped} (unreadable files, rows or shards):"]
    for where, reason in report.skipped[:WARN_LIST_MAX]:
        lines.append(f"  {escape(where)}: {escape(reason)}")
    if report.n_skipped > WARN_LIST_MAX:
        lines.append(f"  and {report.n_skipped - WARN_LIST_MAX} more")
    _stderr.print("\n".join(lines), markup=True, highlight=False, soft_wrap=True)


def _progress(items: Sequence[Any] | Iterable[Any], total: int | None, label: str,
              show: bool) -> Iterator[Any]:
    """Iterate `items`, with a transient stderr progress bar when there are many of them."""
    if not show or total is None or total < PROGRESS_MIN_ITEMS:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=_stderr, transient=True) as progress:
        task = progress.add_task(label, total=total)
        for item in items:
            yield item
            progress.advance(task)


# ---------------------------------------------------------------------------------------------
# folder + captions file


def _caption_rows_jsonl(path: Path, report: LoadReport) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                report.skip(where, f"invalid JSON: {error.msg}", "bad_row")
                continue
            if not isinstance(row, dict):
                report.skip(where, "a row must be a JSON object", "bad_row")
                continue
            yield where, row


def _caption_rows_csv(path: Path, report: LoadReport) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("r", encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        for number, row in enumerate(reader, start=2):
            yield f"{path}:{number}", {k: v for k, v in row.items() if k is not None}


def _csv_header(path: Path) -> list[str]:
    with path.open("r", encoding="utf-8", errors="replace", newline="") as handle:
        return list(csv.DictReader(handle).fieldnames or [])


def _find_captions(directory: Path, captions: PathLike | None) -> Path | None:
    """The captions file: `captions` (relative to `directory` or absolute), else the first of
    :data:`CAPTION_FILES` in `directory`, else None."""
    if captions is not None:
        path = Path(captions)
        path = path if path.is_absolute() else directory / path
        if not path.is_file():
            raise InvalidParameterError(f"captions file not found: {path}")
        return path
    return next((directory / name for name in CAPTION_FILES if (directory / name).is_file()),
                None)


def _pick_columns(path: Path, columns: Sequence[str],
                  caption_column: str | None) -> tuple[str, str]:
    """(file column, caption column) of a captions file whose rows have `columns`."""
    shown = ", ".join(repr(c) for c in columns) or "none"
    file_column = next((c for c in FILE_COLUMNS if c in columns), None)
    if file_column is None:
        raise InvalidParameterError(
            f"{path} has no file-name column (expected {' or '.join(map(repr, FILE_COLUMNS))}); "
            f"its columns are {shown}"
        )
    if caption_column is not None:
        if caption_column not in columns:
            raise InvalidParameterError(
                f"{path} has no column {caption_column!r} (--caption-column); its columns are "
                f"{shown}"
            )
        return file_column, caption_column
    found = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if found is None:
        raise InvalidParameterError(
            f"{path} has no caption column (expected {' or '.join(map(repr, CAPTION_COLUMNS))}); "
            f"its columns are {shown}. Name the text column with --caption-column."
        )
    return file_column, found


def _relative_name(name: str) -> str:
    """A listed file name as the relative POSIX path :func:`scan_image_folder` reports."""
    return posixpath.normpath(name.replace("\\", "/")).lstrip("/")


def scan_image_folder(directory: PathLike, report: LoadReport | None = None,
                      exclude: Iterable[str] = ()) -> list[str]:
    """Every image file under `directory`, recursively, as sorted relative POSIX paths.

    Hidden files and folders (``.name``) are passed over silently, and so are the names in
    `exclude` (relative paths: the captions file). Any other file whose extension is not one of
    :data:`FOLDER_IMAGE_EXTENSIONS` is recorded in `report` as ``unsupported_type``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidParameterError(f"not a directory: {directory}")
    excluded = set(exclude)
    images: list[str] = []
    unsupported: list[tuple[str, str]] = []
    for root, folders, files in os.walk(directory):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        base = Path(root).relative_to(directory)
        for name in files:
            if name.startswith("."):
                continue
            relative = (base / name).as_posix()
            if relative in excluded:
                continue
            extension = name.rpartition(".")[2].lower() if "." in name else ""
            if extension in FOLDER_IMAGE_EXTENSIONS:
                images.append(relative)
            else:
                unsupported.append((relative, extension))
    if report is not None:
        supported = ", ".join(FOLDER_IMAGE_EXTENSIONS)
        for relative, extension in sorted(unsupported):
            shown = f".{extension}" if extension else "no extension"
            report.skip(directory / relative,
                        f"not a supported image type ({shown}; supported: {supported})",
                        "unsupported_type")
    return sorted(images)


def iter_image_folder(directory: PathLike, size: int, batch_size: int, report: LoadReport, *,
                      show_progress: bool = True, names: Sequence[str] | None = None
                      ) -> Iterator[tuple[list[str], np.ndarray]]:
    """Decode every image under `directory` (no captions needed), `batch_size` at a time.

    `names` (relative paths from :func:`scan_image_folder`) limits it to those files, in that
    order, without scanning again (a shard or the rest of an interrupted run).

    Yields ``(ids, pixels)`` with ids the relative POSIX paths and pixels ``uint8 (n, size, size,
    3)``; batches hold only decodable images, so a batch may be shorter (never empty). Unsupported
    files and undecodable images are recorded in `report` (``n_loaded`` counts the decoded ones).
    Memory stays at one batch of pixels, whatever the folder's size.
    """
    size = check_size(size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
    directory = Path(directory)
    if names is None:
        names = scan_image_folder(directory, report, exclude=CAPTION_FILES)
    ids: list[str] = []
    pixels: list[np.ndarray] = []
    for name in _progress(names, len(names), f"reading {directory.name}", show_progress):
        try:
            pixels.append(decode_image(directory / name, size))
        except UnreadableImageError as error:
            report.skip(directory / name, str(error), error.kind)
            continue
        ids.append(name)
        report.n_loaded += 1
        if len(ids) == batch_size:
            yield ids, np.stack(pixels)
            ids, pixels = [], []
    if ids:
        yield ids, np.stack(pixels)


def load_folder(directory: PathLike, size: int, captions: PathLike | None = None, *,
                caption_column: str | None = None, show_progress: bool = True,
                warn: bool = True) -> ImageDataset:
    """Load a folder of images described by a captions file (for uses that need the text).

    `captions` is a file name relative to `directory` (or an absolute path); by default the first
    of ``captions.jsonl``, ``captions.csv``, ``metadata.jsonl``, ``metadata.csv`` in `directory`
    is used (``metadata.*`` is the layout the Hugging Face ``datasets`` imagefolder writes). A
    ``.jsonl`` file has one JSON object per line, a ``.csv`` file a header row. The file name is
    the ``file`` or ``file_name`` column (relative to `directory`, subfolders allowed); the
    caption is `caption_column`, by default ``caption`` else ``text``. Every other field is kept
    in ``extra``; ids are the file names. Images under `directory` (recursively) that the file
    does not list are skipped and reported (``not_listed``), as are rows without a caption and
    files that are missing or undecodable. Raises :class:`InvalidParameterError` when there is no
    captions file, it lacks the columns, or nothing could be loaded.
    For image embeddings, which need no captions, see :func:`iter_image_folder`.
    """
    size = check_size(size)
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidParameterError(f"not a directory: {directory}")
    captions_path = _find_captions(directory, captions)
    if captions_path is None:
        raise InvalidParameterError(
            f"no captions file in {directory} (expected one of {', '.join(CAPTION_FILES)}); "
            "captions are needed here (training, held-out prompts). Image embeddings need none: "
            "`dprdm encoders embed --images` reads a plain folder."
        )
    collector = _Collector(size)
    is_csv = captions_path.suffix.lower() == ".csv"
    rows = list((_caption_rows_csv if is_csv else _caption_rows_jsonl)(captions_path,
                                                                       collector.report))
    columns = (_csv_header(captions_path) if is_csv
               else list(dict.fromkeys(k for _, row in rows for k in row)))
    file_column, text_column = _pick_columns(captions_path, columns, caption_column)
    listed: set[str] = set()
    for where, row in _progress(rows, len(rows), f"loading {directory.name}", show_progress):
        name, caption = row.get(file_column), row.get(text_column)
        if not isinstance(name, str) or not name:
            collector.report.skip(where, f"row has no {file_column!r} field", "bad_row")
            continue
        listed.add(_relative_name(name))
        if caption is None:
            collector.report.skip(directory / name, f"row has no {text_column!r} field",
                                  "no_caption")
            continue
        extra = {k: v for k, v in row.items() if k not in (file_column, text_column)}
        collector.add(directory / name, directory / name, caption, name, extra)
    try:
        own_name = [captions_path.resolve().relative_to(directory.resolve()).as_posix()]
    except ValueError:
        own_name = []
    for name in scan_image_folder(directory, exclude=own_name):
        if name not in listed:
            collector.report.skip(directory / name, f"not listed in {captions_path.name}",
                                  "not_listed")
    dataset = collector.finish(str(directory), warn=False)
    if len(dataset) == 0:
        raise InvalidParameterError(
            f"nothing could be loaded from {directory} with {captions_path.name}: "
            f"{describe_skips(dataset.report)}"
        )
    if warn:
        warn_skipped(dataset.report, str(directory))
    return dataset


def describe_skips(report: LoadReport, examples: int = 3) -> str:
    """One line: ``'2 corrupt (a.png, b.png), 1 not_listed (c.png)'`` or ``'nothing skipped'``."""
    parts = []
    for kind, entry in report.by_kind(examples).items():
        names = ", ".join(Path(e).name for e in entry["examples"])
        more = ", ..." if entry["count"] > len(entry["examples"]) else ""
        parts.append(f"{entry['count']} {kind} ({names}{more})")
    return ", ".join(parts) if parts else "nothing skipped"


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_ANY = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``a-{000..002}.tar`` and ``{train,val}.tar`` (nesting allowed).

    Numeric ranges keep the zero padding of their first bound, as WebDataset's do.
    """
    match = _BRACE_ANY.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    head, tail = pattern[:match.start()], pattern[match.end():]
    numeric = _BRACE_RANGE.fullmatch(match.group(0))
    if numeric:
        first, last = numeric.group(1), numeric.group(2)
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _shard_paths(shards: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(shards, (str, Path)):
        return [Path(p) for p in expand_braces(str(shards))]
    paths: list[Path] = []
    for shard in shards:
        paths.extend(Path(p) for p in expand_braces(str(shard)))
    return paths


def _split_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    directory, _, base = member_name.rpartition("/")
    stem, dot, extension = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, extension.lower() if dot else ""


def _iter_tar_samples(shard: Path, report: LoadReport
                      ) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """Yield (key, {extension: bytes}, bytes read so far) for consecutive members sharing a key."""
    wanted = set(IMAGE_EXTENSIONS) | {"txt", "json"}
    current_key: str | None = None
    current: dict[str, bytes] = {}
    kept = "; samples read before the damage were kept"
    try:
        with tarfile.open(shard, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = _split_key(member.name)
                if key != current_key:
                    if current_key is not None:
                        yield current_key, current, member.offset
                    current_key, current = key, {}
                if extension in wanted:
                    handle = archive.extractfile(member)
                    if handle is not None:
                        current[extension] = handle.read()
            # tarfile stops silently at a partial header. An intact uncompressed archive ends
            # with two zero blocks after the last member; without room for them it was cut.
            uncompressed = getattr(archive.fileobj, "comptype", "tar") == "tar"
            if uncompressed and shard.stat().st_size - archive.offset < 2 * tarfile.BLOCKSIZE:
                report.skip(shard, f"truncated tar (no end-of-archive marker){kept}", "corrupt")
                current_key = None  # the last sample may be incomplete: drop it
    except (tarfile.TarError, OSError, EOFError) as error:
        report.skip(shard, f"unreadable or truncated tar ({type(error).__name__}: {error})"
                           f"{kept}", "corrupt")
        return
    if current_key is not None:
        yield current_key, current, shard.stat().st_size


def _webdataset_caption(key: str, parts: dict[str, bytes]) -> tuple[object, dict[str, Any], str]:
    """(caption or None, extra fields, reason when there is no caption)."""
    extra: dict[str, Any] = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return None, extra, f"invalid {key}.json: {error}"
        if isinstance(meta, dict):
            extra = {k: v for k, v in meta.items() if k != "caption"}
            if "caption" in meta:
                return meta["caption"], extra, ""
    if "txt" in parts:
        return parts["txt"].decode("utf-8", errors="replace").strip(), extra, ""
    return None, extra, "no caption (.txt, or .json with a 'caption' field)"


def _add_webdataset_sample(collector: _Collector, shard: Path, key: str,
                           parts: dict[str, bytes]) -> None:
    where = f"{shard}:{key}"
    extension = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    if extension is None:
        collector.report.skip(where, "no image (.png, .jpg, .jpeg or .webp)", "no_image")
        return
    caption, extra, reason = _webdataset_caption(key, parts)
    if caption is None:
        collector.report.skip(where, reason, "no_caption")
        return
    collector.add(where, parts[extension], caption, key, {**extra, "shard": shard.name})


def load_webdataset(shards: PathLike | Sequence[PathLike], size: int, *,
                    show_progress: bool = True, warn: bool = True) -> ImageDataset:
    """Load WebDataset tar shards: a path, a brace pattern, or a list of either.

    A sample is the run of consecutive members sharing a key; its image is the first of
    ``png, jpg, jpeg, webp`` present and its caption is ``KEY.json["caption"]``, else ``KEY.txt``.
    Other ``KEY.json`` fields and the shard name go to ``extra``. A missing or truncated shard is
    reported; samples read from it before the damage are kept.
    """
    size = check_size(size)
    paths = _shard_paths(shards)
    if not paths:
        raise InvalidParameterError("no WebDataset shards given")
    collector = _Collector(size)
    existing = [p for p in paths if p.is_file()]
    for shard in paths:
        if not shard.is_file():
            collector.report.skip(shard, "shard not found", "missing")
    total_bytes = sum(p.stat().st_size for p in existing)
    show = show_progress and total_bytes >= PROGRESS_MIN_BYTES
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=_stderr, transient=True, disable=not show) as progress:
        task = progress.add_task("reading shards", total=total_bytes)
        done_before = 0
        for shard in existing:
            shard_bytes = shard.stat().st_size
            for key, parts, position in _iter_tar_samples(shard, collector.report):
                progress.update(task, completed=done_before + min(position, shard_bytes))
                _add_webdataset_sample(collector, shard, key, parts)
            done_before += shard_bytes
    what = str(paths[0]) if len(paths) == 1 else f"{len(paths)} shards"
    return collector.finish(what, warn)


# ---------------------------------------------------------------------------------------------
# Parquet


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise InvalidParameterError(f"no .parquet files under {path}")
        return files
    if not path.is_file():
        raise InvalidParameterError(f"parquet file not found: {path}")
    return [path]


def _parquet_image(cell: object, base: Path) -> tuple[ImageSource | None, str]:
    """The decodable source in an image cell, or None and the reason."""
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell), ""
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > 0:
            return bytes(data), ""
        if isinstance(path, str) and path:
            file = Path(path)
            return (file if file.is_absolute() else base / file), ""
        return None, "image struct has neither bytes nor path"
    if cell is None:
        return None, "image is null"
    return None, f"unsupported image cell type {type(cell).__name__}"


def _jsonable_scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def load_parquet(path: PathLike, size: int, image_column: str = "image",
                 caption_column: str = "caption", *, batch_rows: int = 256,
                 show_progress: bool = True, warn: bool = True) -> ImageDataset:
    """Load a Parquet file (or every ``*.parquet`` under a folder), one row batch at a time.

    Image cells are raw bytes or ``{"bytes": ..., "path": ...}`` structs; a struct without bytes
    is read from its path (relative to the Parquet file's folder). Ids are the ``id`` or ``key``
    column when there is one, else ``FILE:ROW``. Other scalar columns go to ``extra``.
    """
    import pyarrow.parquet as pq  # imported here: only Parquet users need pyarrow

    size = check_size(size)
    files = _parquet_files(Path(path))
    collector = _Collector(size)
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except Exception as error:  # pyarrow raises several unrelated types for bad files
            collector.report.skip(file, f"unreadable parquet: {error}", "corrupt")
            continue
        names = parquet.schema_arrow.names
        missing = [c for c in (image_column, caption_column) if c not in names]
        if missing:
            collector.report.skip(file, f"missing column(s) {missing}; columns are {names}",
                                  "bad_columns")
            continue
        id_column = next((c for c in ("id", "key") if c in names), None)
        total = parquet.metadata.num_rows
        rows = _parquet_rows(parquet, batch_rows, file, collector)
        for number, row in _progress(rows, total, f"loading {file.name}", show_progress):
            where = f"{file}:{number}"
            source, reason = _parquet_image(row.get(image_column), file.parent)
            if source is None:
                collector.report.skip(where, reason, "bad_row")
                continue
            record_id = str(row[id_column]) if id_column else f"{file.name}:{number}"
            extra = {k: v for k, v in row.items()
                     if k not in (image_column, caption_column) and _jsonable_scalar(v)}
            collector.add(where, source, row.get(caption_column), record_id, extra)
    what = str(files[0]) if len(files) == 1 else f"{len(files)} parquet files"
    return collector.finish(what, warn)


def _parquet_rows(parquet: Any, batch_rows: int, file: Path,
                  collector: _Collector) -> Iterator[tuple[int, dict[str, Any]]]:
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                yield number, row
                number += 1
    except Exception as error:
        collector.report.skip(file, f"parquet read failed after {number} rows: {error}",
                              "corrupt")


# ---------------------------------------------------------------------------------------------
# dispatch


def load_dataset(source: PathLike | Sequence[PathLike], size: int, **options: Any) -> ImageDataset:
    """Load `source` with the loader its form calls for.

    * a list of ``.tar`` paths, a brace pattern, or one ``.tar`` -> :func:`load_webdataset`
    * a list of / one ``.parquet`` file -> :func:`load_parquet` (a list is loaded file by file)
    * a ``.jsonl`` / ``.csv`` file -> :func:`load_folder` on its folder with that captions file
    * a folder: with a captions file -> :func:`load_folder`; else its ``*.parquet`` files ->
      :func:`load_parquet`; else its ``*.tar`` shards -> :func:`load_webdataset`

    Keyword `options` are passed to the chosen loader.
    """
    if not isinstance(source, (str, Path)):
        paths = [Path(p) for p in source]
        if paths and all(p.suffix.lower() == ".tar" for p in paths):
            return load_webdataset(paths, size, **options)
        if paths and all(p.suffix.lower() == ".parquet" for p in paths):
            warn = bool(options.pop("warn", True))
            return _concat([load_parquet(p, size, warn=False, **options) for p in paths],
                           size, f"{len(paths)} parquet files", warn)
        raise InvalidParameterError("a list source must be all .tar shards or all .parquet files")
    text = str(source)
    if _BRACE_ANY.search(text) and not Path(text).exists():
        return load_webdataset(text, size, **options)
    path = Path(text)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".tar":
            return load_webdataset([path], size, **options)
        if suffix == ".parquet":
            return load_parquet(path, size, **options)
        if suffix in (".jsonl", ".csv"):
            return load_folder(path.parent, size, captions=path, **options)
        raise InvalidParameterError(f"cannot tell how to load {path} (unknown suffix)")
    if path.is_dir():
        if any((path / name).is_file() for name in CAPTION_FILES):
            return load_folder(path, size, **options)
        if any(path.rglob("*.parquet")):
            return load_parquet(path, size, **options)
        shards = sorted(path.glob("*.tar"))
        if shards:
            return load_webdataset(shards, size, **options)
        raise InvalidParameterError(
            f"{path} holds no captions file, .parquet files or .tar shards"
        )
    raise InvalidParameterError(f"dataset source not found: {path}")


def _concat(parts: list[ImageDataset], size: int, what: str, warn: bool) -> ImageDataset:
    report = LoadReport()
    for part in parts:
        report.n_loaded += part.report.n_loaded
        report.skipped.extend(part.report.skipped)
        report.kinds.extend(part.report.kinds)
    images = (np.concatenate([p.images for p in parts]) if parts
              else np.zeros((0, size, size, 3), dtype=np.uint8))
    dataset = ImageDataset(images, [c for p in parts for c in p.captions],
                           [i for p in parts for i in p.ids], [e for p in parts for e in p.extra],
                           report)
    if warn:
        warn_skipped(report, what)
    return dataset


__all__ = [
    "ImageDataset", "LoadReport", "describe_skips", "expand_braces", "iter_image_folder",
    "load_dataset", "load_folder", "load_parquet", "load_webdataset", "scan_image_folder",
    "warn_skipped",
]
