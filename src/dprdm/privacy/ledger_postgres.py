"""The PostgreSQL store of the privacy ledger: one budget shared by several service replicas.

Owns :class:`PostgresLedger`: storage only -- the database, its DDL, connections, the lock and the
retry of an unacknowledged commit. The budget rule is :class:`dprdm.privacy.ledger.StoredLedger`'s,
the same as the SQLite store's.

One ledger per database (or per schema: ``?options=-csearch_path%3Dname`` in the URL).

* The write transaction takes ``SELECT ... FROM budget WHERE id = 1 FOR UPDATE`` first: one row
  lock serialises every charge of every replica; the totals are read, the composed epsilon is
  checked, and the release and its request id are inserted under it, in the same transaction
  (READ COMMITTED: each statement after the lock sees every earlier commit).
* ``synchronous_commit = on`` for every session: a charge is acknowledged only once its commit is
  flushed to the server's WAL (kill -9 or ``pg_ctl stop -m immediate`` loses nothing
  acknowledged).
* Every charge carries a unique request id (the caller's, or a fresh one). When the connection
  breaks around the COMMIT, the outcome is unknown: the store reconnects and looks the id up; a
  committed id returns its original receipt, an absent one is charged again. So a retry never
  double-charges, and a lost acknowledgement never releases without a record.
* The URL the index manifest records has no password (:func:`public_url`); give it with
  PGPASSWORD, ~/.pgpass or a libpq service file.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dprdm.conditioning import check_lam
from dprdm.errors import DprdmError, InvalidParameterError
from dprdm.privacy import accounting
from dprdm.privacy.accounting import MechanismParams
from dprdm.privacy.filter import choose_order
from dprdm.privacy.ledger import (EPSILON_TABLE_DDL, REQUESTS_DDL, SCHEMA_VERSION,
                                  WATERMARK_FILENAME, Charge, StoredLedger, _check_budget, _now,
                                  _write_watermark, new_request_id)

REAL = "DOUBLE PRECISION"
SCHEMA = [
    f"""CREATE TABLE budget (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epsilon {REAL} NOT NULL, delta {REAL} NOT NULL,
        created TEXT NOT NULL, schema_version INTEGER NOT NULL,
        ledger_id TEXT NOT NULL, embeddings_sha256 TEXT NOT NULL,
        filter_order {REAL} NOT NULL)""",
    f"""CREATE TABLE mechanisms (
        id BIGSERIAL PRIMARY KEY,
        sigma {REAL} NOT NULL, q {REAL} NOT NULL, k INTEGER NOT NULL, lam {REAL} NOT NULL,
        time TEXT NOT NULL)""",
    f"""CREATE TABLE releases (
        id BIGSERIAL PRIMARY KEY,
        sigma {REAL} NOT NULL, q {REAL} NOT NULL, k INTEGER NOT NULL,
        count BIGINT NOT NULL CHECK (count >= 1),
        time TEXT NOT NULL, caller TEXT NOT NULL, mechanism_id BIGINT NOT NULL)""",
    f"""CREATE TABLE totals (
        sigma {REAL} NOT NULL, q {REAL} NOT NULL, k INTEGER NOT NULL,
        count BIGINT NOT NULL, PRIMARY KEY (sigma, q, k))""",
    f"""CREATE TABLE capacity (
        sigma {REAL} NOT NULL, q {REAL} NOT NULL, k INTEGER NOT NULL,
        max_queries BIGINT NOT NULL, PRIMARY KEY (sigma, q, k))""",
    """CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        time TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL)""",
    EPSILON_TABLE_DDL.format(real=REAL),
    REQUESTS_DDL.format(real=REAL),
]
CREATE_LOCK = 0x64707264  # advisory lock key serialising concurrent `budget init`s
COMMIT_RETRIES = 3


class MissingLedgerError(DprdmError):
    """The database holds no dprdm ledger (never created, or dropped)."""


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise DprdmError("a postgresql:// ledger needs psycopg: pip install 'dprdm[postgres]'") from None
    return psycopg


def public_url(url: str) -> str:
    """`url` without its password (userinfo or ``password=`` parameter): what may be recorded in
    the index manifest, printed and logged."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise InvalidParameterError(f"not a postgresql:// URL: {parts.scheme}://...")
    netloc = parts.hostname or ""
    if parts.hostname and ":" in parts.hostname:
        netloc = f"[{parts.hostname}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class _Transaction:
    def __init__(self, conn) -> None:
        self.conn = conn

    def sql(self, statement: str, args: tuple = ()):
        return self.conn.execute(statement.replace("?", "%s"), args)


class PostgresLedger(StoredLedger):
    """The production ledger of one private index in a PostgreSQL database."""

    def __init__(self, url: str, *, read_only: bool = False,
                 watermark_dir: str | os.PathLike | None = None,
                 connect_timeout_s: int = 10) -> None:
        self._url = url
        self.location = public_url(url)
        self.read_only = read_only
        self.watermark_path = (None if watermark_dir is None
                               else Path(watermark_dir) / WATERMARK_FILENAME)
        self._connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        watermark = self._read_watermark()  # BEFORE the total (see StoredLedger._load)
        with self._read() as tx:
            if tx.sql("SELECT to_regclass('budget')").fetchone()[0] is None:
                raise MissingLedgerError(
                    f"no privacy ledger in {self.location}; create one with `dprdm budget init "
                    "INDEX_DIR --ledger URL --epsilon E --delta D --k K --q Q --sigma S`")
            version = tx.sql("SELECT schema_version FROM budget WHERE id = 1").fetchone()
            if version is None or int(version[0]) != SCHEMA_VERSION:
                raise DprdmError(f"{self.location} is not a dprdm ledger (schema "
                                 f"{SCHEMA_VERSION})")
        self._load(watermark)

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, epsilon: float, delta: float, *, mechanism: MechanismParams,
               lam: float = 1.0, ledger_id: str | None = None, embeddings_sha256: str = "",
               event: str = "", watermark_dir: str | os.PathLike | None = None
               ) -> "PostgresLedger":
        """Create the ledger in the database of `url`, in ONE transaction (the tables appear
        complete or not at all). Refuses a database that already holds a ledger."""
        psycopg = _psycopg()
        epsilon, delta = _check_budget(epsilon, delta)
        if not isinstance(mechanism, MechanismParams):
            raise InvalidParameterError("mechanism must be a MechanismParams (sigma, q, k)")
        lam = check_lam(lam)
        ledger_id = ledger_id or secrets.token_hex(16)
        capacity = accounting.max_queries(mechanism, epsilon, delta)
        order = choose_order(mechanism, epsilon, delta)
        now = _now()
        try:
            with psycopg.connect(url, connect_timeout=10) as conn:
                conn.execute("SET synchronous_commit = on")
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (CREATE_LOCK,))
                    if conn.execute("SELECT to_regclass('budget')").fetchone()[0] is not None:
                        raise DprdmError(f"{public_url(url)} already holds a privacy ledger; a "
                                         "privacy budget is never reset or replaced")
                    for statement in SCHEMA:
                        conn.execute(statement)
                    tx = _Transaction(conn)
                    tx.sql("INSERT INTO budget VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                           (epsilon, delta, now, SCHEMA_VERSION, ledger_id, embeddings_sha256,
                            order))
                    tx.sql("INSERT INTO mechanisms (sigma, q, k, lam, time) "
                           "VALUES (?, ?, ?, ?, ?)",
                           (mechanism.sigma, mechanism.q, mechanism.k, lam, now))
                    tx.sql("INSERT INTO events (time, kind, detail) VALUES (?, 'created', ?)",
                           (now, event or "budget init"))
                    tx.sql("INSERT INTO capacity VALUES (?, ?, ?, ?)",
                           (mechanism.sigma, mechanism.q, mechanism.k, capacity))
        except psycopg.Error as error:
            raise DprdmError(f"cannot create the ledger in {public_url(url)}: "
                             f"{type(error).__name__}: {error}") from None
        if watermark_dir is not None:
            _write_watermark(Path(watermark_dir) / WATERMARK_FILENAME, ledger_id, 0)
        return cls(url, watermark_dir=watermark_dir)

    # -- connections and transactions ------------------------------------------------------------
    def _connection(self):
        """This thread's connection (opened once per thread and process; reopened if broken)."""
        psycopg = _psycopg()
        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or self._local.pid != os.getpid()):
            conn = None
        if conn is None:
            try:
                conn = psycopg.connect(self._url, autocommit=True,
                                       connect_timeout=self._connect_timeout_s)
            except psycopg.Error as error:
                raise DprdmError(f"the privacy ledger {self.location} is unreachable "
                                 f"({type(error).__name__}); nothing was charged or "
                                 "released") from None
            conn.execute("SET synchronous_commit = on")
            if self.read_only:
                conn.execute("SET default_transaction_read_only = on")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a broken connection: nothing more to do
                pass

    @contextmanager
    def _guard(self) -> Iterator[None]:
        psycopg = _psycopg()
        try:
            yield
        except psycopg.OperationalError as error:
            self._drop_connection()
            raise LedgerUnavailable(f"the privacy ledger {self.location} failed "
                                    f"({type(error).__name__}); nothing was released") from None

    @contextmanager
    def _read(self) -> Iterator[_Transaction]:
        conn = self._connection()
        with self._guard(), conn.transaction():
            yield _Transaction(conn)

    @contextmanager
    def _write(self) -> Iterator[_Transaction]:
        conn = self._connection()
        with self._guard(), conn.transaction():
            # The ledger's one lock, taken BEFORE the budget is read; held until the commit.
            conn.execute("SELECT id FROM budget WHERE id = 1 FOR UPDATE")
            yield _Transaction(conn)

    # -- the charge, with the retry of an unacknowledged commit ----------------------------------
    def _charge_once(self, params: MechanismParams, count: int, caller: str,
                     request_id: str | None, capacity: int | None) -> Charge:
        given = request_id is not None
        request_id = request_id if given else new_request_id()
        for attempt in range(COMMIT_RETRIES):
            try:
                charge = super()._charge_once(params, count, caller, request_id, capacity)
                return charge if given else Charge(charge.params, charge.count,
                                                   charge.queries_total)
            except LedgerUnavailable:
                if attempt == COMMIT_RETRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
                try:
                    committed = self.charged(request_id)  # did the lost COMMIT happen?
                except (LedgerUnavailable, DprdmError):
                    continue
                if committed is not None:  # yes: this caller's one receipt, not a replay
                    self._advance_watermark(committed.queries_total)
                    return Charge(committed.params, committed.count, committed.queries_total,
                                  request_id=request_id if given else None)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._drop_connection()


class LedgerUnavailable(DprdmError):
    """The database connection failed during a ledger operation (outcome of a COMMIT unknown
    until the request id is looked up)."""
