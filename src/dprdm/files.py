"""Writing result files atomically: a reader sees the old file or the complete new one, never a
half-written one, and a crash leaves no partial file behind under the final name; and the one way
dprdm opens its SQLite databases (ledger, service keys): every commit synced to disk."""

from __future__ import annotations

import io
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dprdm.errors import InvalidParameterError


def check_writable_destination(path: Path) -> Path:
    """Fail early (before anything is spent) if `path` cannot receive a file."""
    path = Path(path)
    if path.is_dir():
        raise InvalidParameterError(f"{path} is a directory, expected a file path")
    if not path.parent.is_dir():
        raise InvalidParameterError(f"directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise InvalidParameterError(f"directory {path.parent} is not writable")
    return path


def write_bytes_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` via a temporary file in the same directory, fsync and rename.
    The file gets `mode` (the temporary file's own 0600 is only for the write)."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_npy_atomically(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes_atomically(path, buffer.getvalue())


@contextmanager
def durable_sqlite(path: Path, timeout_s: float) -> Iterator[sqlite3.Connection]:
    """A connection in autocommit mode (transactions are explicit ``BEGIN``s) whose commits are
    on disk when they return (``synchronous=FULL``), waiting up to `timeout_s` for a lock;
    closed on exit."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=timeout_s)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        yield conn
    finally:
        conn.close()
