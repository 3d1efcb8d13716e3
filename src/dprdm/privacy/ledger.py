"""The privacy ledger: one budget per private index, every release recorded before it is returned.

Owns :class:`SqliteLedger` (the production ledger, ``<index>/ledger.sqlite``) and
:class:`InMemoryLedger` (experiments), which share one budget policy (:class:`_BudgetPolicy`).

The production ledger also holds the POLICY, written once by the operator (``dprdm budget init``):
the pinned mechanism (sigma, q, k) with its mix lam, every later change of it (``dprdm budget
set-mechanism``, recorded with its time), the RDP filter's order, the ledger's random id and the
SHA-256 of the index's embeddings it was created for (see :mod:`dprdm.privacy.binding`).
``charge`` refuses any other parameters. With one mechanism the ledger is accounted by PLD; once
the mechanism was changed, by the RDP filter of :mod:`dprdm.privacy.filter`.

Rollback detection: after each committed charge the ledger writes its committed query total and id
to ``ledger-watermark.json`` beside it (atomically, serialised by the ledger's write lock). A
ledger whose total is below the watermark (a restored backup) is refused on open. A crash between
commit and watermark leaves watermark <= ledger: never a false alarm. Restoring the ledger AND the
watermark together, or copying the whole directory, is not detectable here (it forks the budget).

``charge(params, count)`` is the only way to obtain permission to release. In ONE transaction it
reads what was spent, checks that epsilon(all releases + this one) <= budget, and records the
release. Only after the commit may the caller compute and return the aggregate, so a crash can waste
budget but never under-count it.

SQLite details: WAL journal, ``synchronous=FULL`` (a committed charge survives kill -9 and power
loss), ``BEGIN IMMEDIATE`` (the write lock is taken before the budget is read, so two processes can
never both spend the last query), a busy timeout for waiting writers.

Fast paths (the check runs on every request):
* For a fixed (sigma, q, k) the check reduces to a counter: queries_so_far + count <= T_max, where
  T_max = max_queries(params, budget) is computed once and cached in the database.
* With heterogeneous parameters, the RDP bound is tried first (cheap); only when it does not already
  prove the charge fits is the PLD computed. Accountant results are memoised per ledger state.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from dprdm.conditioning import check_lam
from dprdm.errors import BudgetExceededError, DprdmError, InvalidParameterError
from dprdm.files import fsync_directory, write_bytes_atomically
from dprdm.privacy import accounting
from dprdm.privacy.accounting import MechanismParams
from dprdm.privacy.filter import RdpFilter, choose_order

LEDGER_FILENAME = "ledger.sqlite"
WATERMARK_FILENAME = "ledger-watermark.json"
SCHEMA_VERSION = 2
PLD, RDP_FILTER = "pld", "rdp-filter"


@dataclass(frozen=True)
class Charge:
    """Receipt of a recorded release."""

    params: MechanismParams
    count: int
    queries_total: int


@dataclass(frozen=True)
class LedgerSummary:
    epsilon_budget: float
    delta: float
    epsilon_spent: float
    epsilon_spent_rdp: float
    queries: int
    releases: tuple[tuple[MechanismParams, int], ...]
    accountant: str = PLD
    mechanism: MechanismParams | None = None  # the pinned one (production ledgers)
    lam: float | None = None
    rdp_filter: dict | None = None

    @property
    def epsilon_remaining(self) -> float:
        return max(0.0, self.epsilon_budget - self.epsilon_spent)

    def as_dict(self) -> dict:
        return {
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "epsilon_spent": self.epsilon_spent,
            "epsilon_remaining": self.epsilon_remaining,
            "epsilon_spent_rdp": self.epsilon_spent_rdp,
            "queries": self.queries,
            "releases": [
                {"sigma": p.sigma, "q": p.q, "k": p.k, "count": c} for p, c in self.releases
            ],
            "accountant": self.accountant,
            "mechanism": (None if self.mechanism is None else {
                "sigma": self.mechanism.sigma, "q": self.mechanism.q, "k": self.mechanism.k,
                "lam": self.lam}),
            "rdp_filter": self.rdp_filter,
        }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _check_budget(epsilon: float, delta: float) -> tuple[float, float]:
    return accounting.check_epsilon(epsilon), accounting.check_delta(delta)


class _BudgetPolicy:
    """Decides whether a charge fits, given what the ledger already holds (pure, cached)."""

    def __init__(self, epsilon_budget: float, delta: float) -> None:
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self.capacities: dict[MechanismParams, int] = {}  # T_max per parameter set

    def capacity(self, params: MechanismParams) -> int:
        """T_max: how many releases with these parameters alone fit in the whole budget."""
        if params not in self.capacities:
            self.capacities[params] = accounting.max_queries(
                params, self.epsilon_budget, self.delta
            )
        return self.capacities[params]

    def fits(self, totals: dict[MechanismParams, int]) -> bool:
        """Does a ledger holding `totals` stay within the budget?"""
        groups = [(p, c) for p, c in totals.items() if c > 0]
        if not groups:
            return True
        if len(groups) == 1:  # fixed parameters: a counter against the precomputed T_max
            params, count = groups[0]
            return count <= self.capacity(params)
        if accounting.epsilon_rdp(groups, self.delta)[0] <= self.epsilon_budget:
            return True  # RDP upper-bounds the true epsilon: proven without a PLD
        return accounting.epsilon(groups, self.delta) <= self.epsilon_budget

    def admit(self, totals: dict[MechanismParams, int], params: MechanismParams,
              count: int) -> dict[MechanismParams, int]:
        """The totals after charging `count` releases with `params`; raises if they do not fit."""
        after = dict(totals)
        after[params] = after.get(params, 0) + count
        if not self.fits(after):
            raise self.refusal(totals, params, count)
        return after

    def refusal(self, totals: dict[MechanismParams, int], params: MechanismParams,
                count: int) -> BudgetExceededError:
        spent = accounting.epsilon(list(totals.items()), self.delta) if totals else 0.0
        after = dict(totals)
        after[params] = after.get(params, 0) + count
        would_be = accounting.epsilon(list(after.items()), self.delta)
        return BudgetExceededError(
            f"privacy budget exceeded: budget epsilon={self.epsilon_budget:g} at "
            f"delta={self.delta:g}; spent epsilon={spent:.4f} over {sum(totals.values())} "
            f"queries; this request ({count} quer{'y' if count == 1 else 'ies'} with "
            f"sigma={params.sigma:g}, q={params.q:g}, k={params.k}) would bring it to "
            f"{would_be:.4f}. Nothing was charged or released."
        )

    def summary(self, totals: dict[MechanismParams, int]) -> LedgerSummary:
        groups = tuple(sorted((p, c) for p, c in totals.items() if c > 0))
        return LedgerSummary(
            epsilon_budget=self.epsilon_budget,
            delta=self.delta,
            epsilon_spent=accounting.epsilon(groups, self.delta) if groups else 0.0,
            epsilon_spent_rdp=accounting.epsilon_rdp(groups, self.delta)[0] if groups else 0.0,
            queries=sum(c for _, c in groups),
            releases=groups,
        )


class _Ledger:
    """What both ledgers share: a budget policy and its figures."""

    _policy: _BudgetPolicy

    @property
    def epsilon_budget(self) -> float:
        return self._policy.epsilon_budget

    @property
    def delta(self) -> float:
        return self._policy.delta


class InMemoryLedger(_Ledger):
    """A ledger for experiments: same policy and interface, nothing on disk, thread-safe."""

    def __init__(self, epsilon: float, delta: float) -> None:
        self._policy = _BudgetPolicy(*_check_budget(epsilon, delta))
        self._totals: dict[MechanismParams, int] = {}
        self._lock = threading.Lock()

    def charge(self, params: MechanismParams, count: int = 1, caller: str = "") -> Charge:
        count = accounting.check_queries(count)
        with self._lock:
            after = self._policy.admit(self._totals, params, count)
            self._totals = after
            return Charge(params, count, sum(after.values()))

    def can_afford(self, params: MechanismParams, count: int = 1) -> bool:
        with self._lock:
            after = dict(self._totals)
        after[params] = after.get(params, 0) + accounting.check_queries(count)
        return self._policy.fits(after)

    def remaining_queries(self, params: MechanismParams) -> int:
        return _remaining_queries(self._policy, self.summary(), params)

    def summary(self) -> LedgerSummary:
        with self._lock:
            totals = dict(self._totals)
        return self._policy.summary(totals)


def _remaining_queries(policy: _BudgetPolicy, summary: LedgerSummary,
                       params: MechanismParams) -> int:
    """How many more releases with `params` fit (exact for a single-parameter ledger)."""
    totals = dict(summary.releases)
    if set(totals) <= {params}:
        return max(0, policy.capacity(params) - totals.get(params, 0))
    low, high = 0, policy.capacity(params)
    while low < high:  # largest m with fits(totals + m): bisection on a monotone predicate
        mid = (low + high + 1) // 2
        trial = dict(totals)
        trial[params] = trial.get(params, 0) + mid
        if policy.fits(trial):
            low = mid
        else:
            high = mid - 1
    return low


def _pinned_error(pinned: MechanismParams, params: MechanismParams) -> InvalidParameterError:
    return InvalidParameterError(
        f"this ledger's mechanism is pinned to sigma={pinned.sigma:.6g}, q={pinned.q:g}, "
        f"k={pinned.k}; a request with sigma={params.sigma:.6g}, q={params.q:g}, k={params.k} is "
        "refused (nothing was charged or released). Only the operator changes the mechanism, "
        "with `dprdm budget set-mechanism`."
    )


class SqliteLedger(_Ledger):
    """The production ledger of one private index, in ``<index_dir>/ledger.sqlite``."""

    def __init__(self, path: str | os.PathLike, *, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / LEDGER_FILENAME
        if not self.path.is_file():
            raise DprdmError(
                f"no privacy ledger at {self.path}; create one with `dprdm budget init "
                f"{self.path.parent} --epsilon E --delta D --k K --q Q --sigma S`"
            )
        self._busy_timeout_s = busy_timeout_s
        # The watermark BEFORE the total: both only grow and watermark <= committed total at
        # every instant, so reading in this order can never raise a false alarm.
        watermark = self._read_watermark()
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
            identity = conn.execute(
                "SELECT ledger_id, embeddings_sha256, filter_order FROM budget").fetchone()
            total = self._queries(conn)
        self._policy = _BudgetPolicy(float(row[0]), float(row[1]))
        self.ledger_id, self.embeddings_sha256 = str(identity[0]), str(identity[1])
        self._filter = RdpFilter.for_budget(float(identity[2]), self.epsilon_budget, self.delta)
        self._check_watermark(watermark, total)

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
            conn.executescript(
                """
                PRAGMA journal_mode=DELETE;
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
            )
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
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_timeout_s)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock BEFORE reading the budget
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _totals(conn: sqlite3.Connection) -> dict[MechanismParams, int]:
        rows = conn.execute("SELECT sigma, q, k, count FROM totals").fetchall()
        return {MechanismParams(s, q, k): int(c) for s, q, k, c in rows}

    @staticmethod
    def _queries(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT COALESCE(SUM(count), 0) FROM totals").fetchone()[0])

    @staticmethod
    def _mechanisms(conn: sqlite3.Connection) -> list[tuple[int, MechanismParams, float, str]]:
        rows = conn.execute("SELECT id, sigma, q, k, lam, time FROM mechanisms ORDER BY id")
        return [(int(i), MechanismParams(s, q, k), float(lam), t) for i, s, q, k, lam, t in rows]

    def _capacity(self, conn: sqlite3.Connection, params: MechanismParams) -> int:
        """T_max for `params`: computed once, then read from the database by every process."""
        if params not in self._policy.capacities:
            row = conn.execute(
                "SELECT max_queries FROM capacity WHERE sigma=? AND q=? AND k=?",
                (params.sigma, params.q, params.k),
            ).fetchone()
            if row is not None:
                self._policy.capacities[params] = int(row[0])
        return self._policy.capacity(params)

    # -- rollback detection ----------------------------------------------------------------------
    @property
    def watermark_path(self) -> Path:
        return self.path.parent / WATERMARK_FILENAME

    def _read_watermark(self) -> dict | None:
        # Whether it must exist is the binding's check (the index manifest names a ledger).
        return read_watermark(self.watermark_path) if self.watermark_path.is_file() else None

    def _check_watermark(self, watermark: dict | None, total: int) -> None:
        if watermark is None:
            return
        if watermark["ledger_id"] != self.ledger_id:
            raise DprdmError(
                f"{self.path} (ledger id {self.ledger_id}) does not match the release watermark "
                f"{self.watermark_path} (ledger id {watermark['ledger_id']}): the ledger was "
                "replaced. Refused: nothing is charged or released."
            )
        if total < watermark["queries"]:
            raise DprdmError(
                f"{self.path} records {total} queries but {WATERMARK_FILENAME} shows that "
                f"{watermark['queries']} were released: this ledger was rolled back (a restored "
                "backup?). Refused: nothing is charged or released. Restore the newest ledger."
            )

    def _advance_watermark(self) -> None:
        """Write the committed total to the watermark; under the write lock, so writers are
        serialised and the watermark only grows; after the commit, so it never exceeds it."""
        with self._write_transaction() as conn:
            _write_watermark(self.watermark_path, self.ledger_id, self._queries(conn))

    # -- the policy ------------------------------------------------------------------------------
    def _pinned(self, conn: sqlite3.Connection) -> tuple[MechanismParams, float, bool]:
        """(pinned mechanism, its lam, whether the RDP filter applies)."""
        mechanisms = self._mechanisms(conn)
        _, params, lam, _ = mechanisms[-1]
        return params, lam, len(mechanisms) > 1

    @property
    def mechanism(self) -> MechanismParams:
        """The pinned mechanism: the only parameters `charge` accepts."""
        with self._connect() as conn:
            return self._pinned(conn)[0]

    @property
    def lam(self) -> float:
        """The operator's mix weight stored beside the mechanism (post-processing, free)."""
        with self._connect() as conn:
            return self._pinned(conn)[1]

    def mechanisms(self) -> list[dict]:
        with self._connect() as conn:
            return [{"id": i, "sigma": p.sigma, "q": p.q, "k": p.k, "lam": lam, "time": t}
                    for i, p, lam, t in self._mechanisms(conn)]

    def events(self) -> list[dict]:
        with self._connect() as conn:
            rows = conn.execute("SELECT time, kind, detail FROM events ORDER BY id").fetchall()
        return [{"time": t, "kind": kind, "detail": detail} for t, kind, detail in rows]

    @property
    def rdp_filter(self) -> RdpFilter:
        return self._filter

    def set_mechanism(self, params: MechanismParams, lam: float = 1.0, note: str = "") -> None:
        """Pin a new mechanism (operator only). From now on the ledger is accounted by the RDP
        filter: the new mechanism may have been chosen after seeing earlier outputs."""
        lam = check_lam(lam)
        with self._write_transaction() as conn:
            pinned, _, _ = self._pinned(conn)
            if params == pinned:
                raise InvalidParameterError("that is already the pinned mechanism")
            now = _now()
            conn.execute("INSERT INTO mechanisms (sigma, q, k, lam, time) VALUES (?, ?, ?, ?, ?)",
                         (params.sigma, params.q, params.k, lam, now))
            detail = f"sigma={params.sigma!r} q={params.q!r} k={params.k} lam={lam!r}"
            conn.execute("INSERT INTO events (time, kind, detail) VALUES (?, 'set-mechanism', ?)",
                         (now, detail + (f"; {note}" if note else "")))

    # -- the interface ---------------------------------------------------------------------------
    def charge(self, params: MechanismParams, count: int = 1, caller: str = "") -> Charge:
        """Record `count` releases with `params` if `params` is the pinned mechanism and they fit
        the budget; else refuse, recording nothing. Returns only after the record is durably
        committed (and the watermark advanced)."""
        count = accounting.check_queries(count)
        if not isinstance(caller, str) or len(caller) > 200:
            raise InvalidParameterError("caller must be a string of at most 200 characters")
        # T_max is looked up (or computed: seconds, the first time) OUTSIDE the write lock.
        with self._connect() as conn:
            pinned, _, filtered = self._pinned(conn)
            if params != pinned:
                raise _pinned_error(pinned, params)
            capacity = None if filtered else self._capacity(conn, params)
        with self._write_transaction() as conn:
            pinned, _, filtered = self._pinned(conn)  # re-read under the lock: the decision's
            if params != pinned:
                raise _pinned_error(pinned, params)
            mechanism_id = self._mechanisms(conn)[-1][0]
            totals = self._totals(conn)
            # A ledger rolled back while this process holds it open (watermark writers hold this
            # same lock, so here watermark <= committed total unless the file was replaced).
            self._check_watermark(self._read_watermark(), sum(totals.values()))
            if filtered:
                after = self._filter.admit(totals, params, count)
            else:
                after = self._policy.admit(totals, params, count)
                capacity = self._capacity(conn, params) if capacity is None else capacity
                conn.execute(
                    "INSERT OR IGNORE INTO capacity VALUES (?, ?, ?, ?)",
                    (params.sigma, params.q, params.k, capacity),
                )
            conn.execute(
                "INSERT INTO releases (sigma, q, k, count, time, caller, mechanism_id) "
                "VALUES (?,?,?,?,?,?,?)",
                (params.sigma, params.q, params.k, count, _now(), caller, mechanism_id),
            )
            conn.execute(
                "INSERT INTO totals VALUES (?, ?, ?, ?) ON CONFLICT (sigma, q, k) "
                "DO UPDATE SET count = count + excluded.count",
                (params.sigma, params.q, params.k, count),
            )
        self._advance_watermark()
        return Charge(params, count, sum(after.values()))

    def can_afford(self, params: MechanismParams | None = None, count: int = 1) -> bool:
        count = accounting.check_queries(count)
        with self._connect() as conn:
            pinned, _, filtered = self._pinned(conn)
            params = pinned if params is None else params
            if params != pinned:
                return False
            if not filtered:
                self._capacity(conn, params)
            after = self._totals(conn)
        after[params] = after.get(params, 0) + count
        if filtered:
            return self._filter.spent(after) <= self._filter.bound
        return self._policy.fits(after)

    def remaining_queries(self, params: MechanismParams | None = None) -> int:
        """How many more releases with the pinned mechanism fit (0 for any other parameters)."""
        with self._connect() as conn:
            pinned, _, filtered = self._pinned(conn)
            params = pinned if params is None else params
            if params != pinned:
                return 0
            if not filtered:
                self._capacity(conn, params)
            totals = self._totals(conn)
        if filtered:
            return self._filter.remaining(totals, params)
        return _remaining_queries(self._policy, self._policy.summary(totals), params)

    def summary(self) -> LedgerSummary:
        with self._connect() as conn:
            totals = self._totals(conn)
            pinned, lam, filtered = self._pinned(conn)
        if not filtered:
            return replace(self._policy.summary(totals), mechanism=pinned, lam=lam)
        groups = tuple(sorted((p, c) for p, c in totals.items() if c > 0))
        return LedgerSummary(
            epsilon_budget=self.epsilon_budget,
            delta=self.delta,
            epsilon_spent=self._filter.epsilon_spent(totals),
            epsilon_spent_rdp=accounting.epsilon_rdp(groups, self.delta)[0] if groups else 0.0,
            queries=sum(c for _, c in groups),
            releases=groups,
            accountant=RDP_FILTER,
            mechanism=pinned,
            lam=lam,
            rdp_filter=dict(self._filter.describe(), rdp_spent=self._filter.spent(totals)),
        )

    def release_count(self) -> int:
        """Number of release rows (one per charge call); for audits and tests."""
        with self._connect() as conn:
            return int(conn.execute("SELECT COALESCE(SUM(count), 0) FROM releases").fetchone()[0])


def read_watermark(path: Path) -> dict:
    """The watermark {"ledger_id": str, "queries": int}, or a clear error."""
    try:
        data = json.loads(Path(path).read_text())
        return {"ledger_id": str(data["ledger_id"]), "queries": int(data["queries"])}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DprdmError(f"{path} is not a readable release watermark: {error}") from None


def _write_watermark(path: Path, ledger_id: str, queries: int) -> None:
    data = json.dumps({"ledger_id": ledger_id, "queries": queries, "time": _now()}) + "\n"
    write_bytes_atomically(path, data.encode())


def open_ledger(index_dir: str | os.PathLike) -> SqliteLedger:
    return SqliteLedger(Path(index_dir) / LEDGER_FILENAME)
