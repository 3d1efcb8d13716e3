"""The SQLite store of the privacy ledger: ``<index>/ledger.sqlite`` (the default, one host).

Owns :class:`SqliteLedger`: storage only -- the file, its DDL, connections and the write lock. The
budget rule is :class:`dprdm.privacy.ledger.StoredLedger`'s.

SQLite details: WAL journal, ``synchronous=FULL`` (a committed charge survives kill -9 and power
loss), ``BEGIN IMMEDIATE`` (the write lock is taken before the budget is read, so two processes can
never both spend the last query), a busy timeout for waiting writers. Creation is atomic: the file
is built under a temporary name and linked into place (never replacing an existing ledger).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from dprdm.conditioning import check_lam
from dprdm.errors import DprdmError, InvalidParameterError
from dprdm.files import durable_sqlite, fsync_directory
from dprdm.privacy import accounting
from dprdm.privacy.accounting import MechanismParams
from dprdm.privacy.filter import choose_order
from dprdm.privacy.ledger import (EPSILON_TABLE_DDL, LEDGER_FILENAME, REQUESTS_DDL, SCHEMA_VERSION,
                                  WATERMARK_FILENAME, StoredLedger, _check_budget, _now,
                                  _write_watermark)

SCHEMA = """
CREATE TABLE budget (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epsilon REAL NOT NULL, delta REAL NOT NULL,
    created TEXT NOT NULL, schema_version INTEGER NOT NULL,
    ledger_id TEXT NOT NULL, embeddings_sha256 TEXT NOT NULL,
    filter_order REAL NOT NULL);
CREATE TABLE mechanisms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sigma REAL NOT NULL, q REAL NOT NULL, k INTEGER NOT NULL, lam REAL NOT NULL,
    time TEXT NOT NULL);
CREATE TABLE releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sigma REAL NOT NULL, q REAL NOT NULL, k INTEGER NOT NULL,
    count INTEGER NOT NULL CHECK (count >= 1),
    time TEXT NOT NULL, caller TEXT NOT NULL, mechanism_id INTEGER NOT NULL);
CREATE TABLE totals (
    sigma REAL NOT NULL, q REAL NOT NULL, k INTEGER NOT NULL,
    count INTEGER NOT NULL, PRIMARY KEY (sigma, q, k));
CREATE TABLE capacity (
    sigma REAL NOT NULL, q REAL NOT NULL, k INTEGER NOT NULL,
    max_queries INTEGER NOT NULL, PRIMARY KEY (sigma, q, k));
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""
ADDED_TABLES = (EPSILON_TABLE_DDL.format(real="REAL"), REQUESTS_DDL.format(real="REAL"))


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def sql(self, statement: str, args: tuple = ()) -> sqlite3.Cursor:
        return self.conn.execute(statement, args)


class SqliteLedger(StoredLedger):
    """The production ledger of one private index, in ``<index_dir>/ledger.sqlite``."""

    def __init__(self, path: str | os.PathLike, *, busy_timeout_s: float = 60.0,
                 read_only: bool = False) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / LEDGER_FILENAME
        if not self.path.is_file():
            raise DprdmError(
                f"no privacy ledger at {self.path}; create one with `dprdm budget init "
                f"{self.path.parent} --epsilon E --delta D --k K --q Q --sigma S`"
            )
        self.location = str(self.path)
        self.read_only = read_only
        self.watermark_path = self.path.parent / WATERMARK_FILENAME
        self._busy_timeout_s = busy_timeout_s
        watermark = self._read_watermark()  # BEFORE the total (see StoredLedger._load)
        with self._connect() as conn:
            try:
                row = conn.execute("SELECT epsilon, delta, schema_version FROM budget").fetchone()
            except sqlite3.DatabaseError:
                row = None
            if row is not None and row[2] == 1:
                raise DprdmError(
                    f"{self.path} is a schema-1 ledger (older dprdm): it has no pinned mechanism "
                    "and no binding to its index, and is refused rather than migrated (a silent "
                    "migration could re-arm the budget). Keep it: it records what was released. "
                    "To continue, build a NEW index (a new data set) in another directory and run "
                    "`dprdm budget init` there with --k --q --sigma (or --calibrate)."
                )
            if row is None or row[2] != SCHEMA_VERSION:
                raise DprdmError(f"{self.path} is not a dprdm ledger (schema {SCHEMA_VERSION})")
            present = {name for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"epsilon_table", "requests"} <= present:
                for statement in ADDED_TABLES:  # additive: a cache and idempotency keys
                    conn.execute(statement)
        self._load(watermark)

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    def create(cls, index_dir: str | os.PathLike, epsilon: float, delta: float, *,
               mechanism: MechanismParams, lam: float = 1.0, ledger_id: str | None = None,
               embeddings_sha256: str = "", event: str = "") -> "SqliteLedger":
        """Create the ledger of an index with its pinned mechanism. Refuses to replace an existing
        one (that would reset the budget). Atomic: the file appears complete or not at all.
        `event` is recorded in the ledger's event log (e.g. that it replaces a lost ledger)."""
        epsilon, delta = _check_budget(epsilon, delta)
        if not isinstance(mechanism, MechanismParams):
            raise InvalidParameterError("mechanism must be a MechanismParams (sigma, q, k)")
        lam = check_lam(lam)
        ledger_id = ledger_id or secrets.token_hex(16)
        index_dir = Path(index_dir)
        if not index_dir.is_dir():
            raise DprdmError(f"{index_dir} is not a directory")
        path = index_dir / LEDGER_FILENAME
        if path.exists():
            raise DprdmError(
                f"{path} already exists; a privacy budget is never reset or replaced"
            )
        capacity = accounting.max_queries(mechanism, epsilon, delta)  # cached for every process
        order = choose_order(mechanism, epsilon, delta)  # public parameters only, before releases
        now = _now()
        tmp = index_dir / f".{LEDGER_FILENAME}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.executescript("PRAGMA journal_mode=DELETE;" + SCHEMA
                               + ";\n".join(ADDED_TABLES) + ";")
            conn.execute("INSERT INTO budget VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                         (epsilon, delta, now, SCHEMA_VERSION, ledger_id, embeddings_sha256,
                          order))
            conn.execute("INSERT INTO mechanisms (sigma, q, k, lam, time) VALUES (?, ?, ?, ?, ?)",
                         (mechanism.sigma, mechanism.q, mechanism.k, lam, now))
            conn.execute("INSERT INTO events (time, kind, detail) VALUES (?, 'created', ?)",
                         (now, event or "budget init"))
            conn.execute("INSERT INTO capacity VALUES (?, ?, ?, ?)",
                         (mechanism.sigma, mechanism.q, mechanism.k, capacity))
        finally:
            conn.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # fails if another process created the ledger meanwhile
        except FileExistsError:
            raise DprdmError(f"{path} already exists; a privacy budget is never reset") from None
        finally:
            tmp.unlink(missing_ok=True)
        fsync_directory(index_dir)
        _write_watermark(index_dir / WATERMARK_FILENAME, ledger_id, 0)
        ledger = cls(path)
        with ledger._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        return ledger

    # -- connections and transactions ------------------------------------------------------------
    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return durable_sqlite(self.path, self._busy_timeout_s)

    @contextmanager
    def _read(self) -> Iterator[_Transaction]:
        with self._connect() as conn:
            yield _Transaction(conn)

    @contextmanager
    def _write(self) -> Iterator[_Transaction]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock BEFORE reading the budget
            try:
                yield _Transaction(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _advance_watermark(self, committed_total: int) -> None:
        """Write the committed total to the watermark; under the write lock, so writers are
        serialised and the watermark only grows; after the commit, so it never exceeds it."""
        with self._write() as tx:
            _write_watermark(self.watermark_path, self.ledger_id, self._queries(tx))
