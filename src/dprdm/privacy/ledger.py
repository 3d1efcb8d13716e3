"""The privacy ledger: one budget per private index, every release recorded before it is returned.

Owns :class:`SqliteLedger` (the production ledger, ``<index>/ledger.sqlite``) and
:class:`InMemoryLedger` (experiments), which share one budget policy (:class:`_BudgetPolicy`).

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
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dprdm.errors import BudgetExceededError, DprdmError, InvalidParameterError
from dprdm.files import fsync_directory
from dprdm.privacy import accounting
from dprdm.privacy.accounting import MechanismParams

LEDGER_FILENAME = "ledger.sqlite"
SCHEMA_VERSION = 1


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


class SqliteLedger(_Ledger):
    """The production ledger of one private index, in ``<index_dir>/ledger.sqlite``."""

    def __init__(self, path: str | os.PathLike, *, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / LEDGER_FILENAME
        if not self.path.is_file():
            raise DprdmError(
                f"no privacy ledger at {self.path}; create one with "
                f"`dprdm budget init {self.path.parent} --epsilon E --delta D`"
            )
        self._busy_timeout_s = busy_timeout_s
        with self._connect() as conn:
            row = conn.execute("SELECT epsilon, delta, schema_version FROM budget").fetchone()
        if row is None or row[2] != SCHEMA_VERSION:
            raise DprdmError(f"{self.path} is not a dprdm ledger (schema {SCHEMA_VERSION})")
        self._policy = _BudgetPolicy(float(row[0]), float(row[1]))

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    def create(cls, index_dir: str | os.PathLike, epsilon: float, delta: float) -> "SqliteLedger":
        """Create the ledger of an index. Refuses to replace an existing one (that would reset the
        budget). Atomic: the file appears complete or not at all."""
        epsilon, delta = _check_budget(epsilon, delta)
        index_dir = Path(index_dir)
        if not index_dir.is_dir():
            raise DprdmError(f"{index_dir} is not a directory")
        path = index_dir / LEDGER_FILENAME
        if path.exists():
            raise DprdmError(
                f"{path} already exists; a privacy budget is never reset or replaced"
            )
        tmp = index_dir / f".{LEDGER_FILENAME}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.executescript(
                f"""
                PRAGMA journal_mode=DELETE;
                CREATE TABLE budget (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    epsilon REAL NOT NULL, delta REAL NOT NULL,
                    created TEXT NOT NULL, schema_version INTEGER NOT NULL);
                CREATE TABLE releases (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    sigma REAL NOT NULL, q REAL NOT NULL, k INTEGER NOT NULL,
                    count INTEGER NOT NULL CHECK (count >= 1),
                    time TEXT NOT NULL, caller TEXT NOT NULL);
                CREATE TABLE totals (
                    sigma REAL NOT NULL, q REAL NOT NULL, k INTEGER NOT NULL,
                    count INTEGER NOT NULL, PRIMARY KEY (sigma, q, k));
                CREATE TABLE capacity (
                    sigma REAL NOT NULL, q REAL NOT NULL, k INTEGER NOT NULL,
                    max_queries INTEGER NOT NULL, PRIMARY KEY (sigma, q, k));
                INSERT INTO budget VALUES (1, {epsilon!r}, {delta!r}, '{_now()}', {SCHEMA_VERSION});
                """
            )
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

    # -- the interface ---------------------------------------------------------------------------
    def charge(self, params: MechanismParams, count: int = 1, caller: str = "") -> Charge:
        """Record `count` releases with `params` if they fit the budget; else refuse, recording
        nothing. Returns only after the record is durably committed."""
        count = accounting.check_queries(count)
        if not isinstance(caller, str) or len(caller) > 200:
            raise InvalidParameterError("caller must be a string of at most 200 characters")
        # T_max is looked up (or computed: seconds, the first time) OUTSIDE the write lock.
        with self._connect() as conn:
            capacity = self._capacity(conn, params)
        with self._write_transaction() as conn:
            after = self._policy.admit(self._totals(conn), params, count)
            conn.execute(
                "INSERT OR IGNORE INTO capacity VALUES (?, ?, ?, ?)",
                (params.sigma, params.q, params.k, capacity),
            )
            conn.execute(
                "INSERT INTO releases (sigma, q, k, count, time, caller) VALUES (?,?,?,?,?,?)",
                (params.sigma, params.q, params.k, count, _now(), caller),
            )
            conn.execute(
                "INSERT INTO totals VALUES (?, ?, ?, ?) ON CONFLICT (sigma, q, k) "
                "DO UPDATE SET count = count + excluded.count",
                (params.sigma, params.q, params.k, count),
            )
        return Charge(params, count, sum(after.values()))

    def can_afford(self, params: MechanismParams, count: int = 1) -> bool:
        with self._connect() as conn:
            self._capacity(conn, params)
            after = self._totals(conn)
        after[params] = after.get(params, 0) + accounting.check_queries(count)
        return self._policy.fits(after)

    def remaining_queries(self, params: MechanismParams) -> int:
        with self._connect() as conn:
            self._capacity(conn, params)
        return _remaining_queries(self._policy, self.summary(), params)

    def summary(self) -> LedgerSummary:
        with self._connect() as conn:
            totals = self._totals(conn)
        return self._policy.summary(totals)

    def release_count(self) -> int:
        """Number of release rows (one per charge call); for audits and tests."""
        with self._connect() as conn:
            return int(conn.execute("SELECT COALESCE(SUM(count), 0) FROM releases").fetchone()[0])


def open_ledger(index_dir: str | os.PathLike) -> SqliteLedger:
    return SqliteLedger(Path(index_dir) / LEDGER_FILENAME)

