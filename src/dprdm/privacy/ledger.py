"""The privacy ledger's POLICY: one budget per private index, every release recorded before it is
returned. Written once here; the stores beside it differ only in storage.

Owns the budget rule (:class:`_BudgetPolicy`: admit / fits / refusal / summary), the ledger
interface every store implements (:class:`StoredLedger`), :class:`InMemoryLedger` (experiments),
the release watermark (rollback detection), the precomputed epsilon table, and
:func:`open_ledger` (a directory or a ``postgresql://`` URL). The stores:

* :mod:`dprdm.privacy.ledger_sqlite` -- :class:`SqliteLedger`, ``<index>/ledger.sqlite`` (default);
* :mod:`dprdm.privacy.ledger_postgres` -- :class:`PostgresLedger`, one PostgreSQL database
  shared by several service replicas.

A store provides connections, a WRITE transaction that holds the ledger's exclusive lock from
before the budget is read until the commit (SQLite ``BEGIN IMMEDIATE``; PostgreSQL
``SELECT ... FROM budget FOR UPDATE``), its DDL, and durability (SQLite ``synchronous=FULL``;
PostgreSQL ``synchronous_commit=on``). The SQL below is shared (``?`` placeholders).

The production ledger also holds the POLICY, written once by the operator (``dprdm budget init``):
the pinned mechanism (sigma, q, k) with its mix lam, every later change of it (``dprdm budget
set-mechanism``, recorded with its time), the RDP filter's order, the ledger's random id and the
SHA-256 of the index's embeddings it was created for (see :mod:`dprdm.privacy.binding`).
``charge`` refuses any other parameters. With one mechanism the ledger is accounted by PLD; once
the mechanism was changed, by the RDP filter of :mod:`dprdm.privacy.filter`.

``charge(params, count, caller, request_id)`` is the only way to obtain permission to release.
In ONE transaction, under the lock, it reads what was spent, checks that epsilon(all releases +
this one) <= budget, and records the release. Only after the commit may the caller compute and
return the aggregate, so a crash can waste budget but never under-count it. A request id (unique
per charge) makes a retried charge idempotent: if that id was already committed, the ORIGINAL
receipt is returned (``replayed=True``) and nothing is charged again. A replayed receipt is not a
second permission: the caller that got the first acknowledgement has already released.

Rollback detection: after each committed charge the committed query total and the ledger id are
written to ``ledger-watermark.json`` (beside the SQLite file; in the index directory for a
PostgreSQL ledger), atomically, and it only grows. A ledger whose total is below the watermark (a
restored backup) is refused on open and at every charge. A crash between commit and watermark
leaves watermark <= ledger: never a false alarm. Restoring the ledger AND the watermark together
is not detectable here (it forks the budget).

Fast paths (the check runs on every request):
* For a fixed (sigma, q, k) the check reduces to a counter: queries_so_far + count <= T_max, where
  T_max = max_queries(params, budget) is computed once and cached in the database.
* With heterogeneous parameters, the RDP bound is tried first (cheap); only when it does not already
  prove the charge fits is the PLD computed. Accountant results are memoised per ledger state.
* REPORTED figures (``summary``) of a ledger with one pinned mechanism come from the epsilon
  table: epsilon at a geometric grid of query counts (ratio EPSILON_GRID_RATIO), the count rounded
  UP to the next grid point (epsilon grows with the count, so the reported figure never
  under-states), each point computed once per mechanism and budget and cached in the ledger (all
  processes and replicas share it). The capacity T_max is a grid point, so a ledger at capacity
  reports its exact epsilon. Admission never uses the table: it is the exact counter above.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import math
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from dprdm.conditioning import check_lam
from dprdm.errors import BudgetExceededError, DprdmError, InvalidParameterError
from dprdm.files import write_bytes_atomically
from dprdm.privacy import accounting
from dprdm.privacy.accounting import MechanismParams
from dprdm.privacy.filter import RdpFilter

LEDGER_FILENAME = "ledger.sqlite"
WATERMARK_FILENAME = "ledger-watermark.json"
SCHEMA_VERSION = 2
PLD, RDP_FILTER = "pld", "rdp-filter"
# The epsilon table's grid: counts ceil(r**i); a reported epsilon over-states by at most the
# growth of epsilon over a factor r of queries (epsilon grows sub-linearly: < 5 %).
EPSILON_GRID_RATIO = 1.05


@dataclass(frozen=True)
class Charge:
    """Receipt of a recorded release."""

    params: MechanismParams
    count: int
    queries_total: int
    request_id: str | None = None
    replayed: bool = False  # the request id was already committed: nothing was charged now


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
    # Reported from the epsilon table: the grid count the figures were computed at (>= queries).
    epsilon_at_count: int | None = None

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
            "epsilon_at_count": self.epsilon_at_count,
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


# -- the epsilon table -----------------------------------------------------------------------------
def epsilon_grid_point(count: int, capacity: int, ratio: float = EPSILON_GRID_RATIO) -> int:
    """The smallest grid count ceil(ratio**i) >= `count`, capped at `capacity` (itself a grid
    point); counts at or above the capacity are their own point. Never below `count`."""
    if count <= 1 or count >= capacity:
        return max(count, 0)
    i = max(0, math.ceil(math.log(count) / math.log(ratio)) - 1)
    while math.ceil(ratio**i) < count:  # settle the float logarithm against the grid itself
        i += 1
    return min(math.ceil(ratio**i), capacity)


# -- the interface every store implements ----------------------------------------------------------
class Cursor(Protocol):
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list: ...


class Transaction(Protocol):
    """One open transaction of a store; SQL with ``?`` placeholders."""

    def sql(self, statement: str, args: tuple = ()) -> Cursor: ...


class StoredLedger(_Ledger):
    """The production ledger's rule over a store. A store subclass provides ``_read`` (a
    transaction for reading), ``_write`` (a transaction holding the ledger's exclusive lock from
    before the budget is read until the commit), and may override ``_advance_watermark``.
    Subclasses call :meth:`_load` once connected."""

    location: str  # where the ledger is, for messages (never a password)
    read_only: bool = False
    watermark_path: Path | None = None

    def _read(self) -> AbstractContextManager[Transaction]:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Transaction]:
        raise NotImplementedError

    # -- opening ---------------------------------------------------------------------------------
    def _load(self, watermark: dict | None) -> None:
        """Read the budget row and check the watermark (read BEFORE the total by the caller: both
        only grow and watermark <= committed total at every instant, so no false alarm)."""
        with self._read() as tx:
            row = tx.sql("SELECT epsilon, delta, ledger_id, embeddings_sha256, filter_order "
                         "FROM budget WHERE id = 1").fetchone()
            total = self._queries(tx)
        self._policy = _BudgetPolicy(float(row[0]), float(row[1]))
        self.ledger_id, self.embeddings_sha256 = str(row[2]), str(row[3])
        self._filter = RdpFilter.for_budget(float(row[4]), self.epsilon_budget, self.delta)
        self._epsilon_table: dict[tuple[MechanismParams, int], tuple[float, float]] = {}
        self._check_watermark(watermark, total)

    # -- shared SQL ------------------------------------------------------------------------------
    @staticmethod
    def _totals(tx: Transaction) -> dict[MechanismParams, int]:
        rows = tx.sql("SELECT sigma, q, k, count FROM totals").fetchall()
        return {MechanismParams(s, q, k): int(c) for s, q, k, c in rows}

    @staticmethod
    def _queries(tx: Transaction) -> int:
        return int(tx.sql("SELECT COALESCE(SUM(count), 0) FROM totals").fetchone()[0])

    @staticmethod
    def _mechanisms(tx: Transaction) -> list[tuple[int, MechanismParams, float, str]]:
        rows = tx.sql("SELECT id, sigma, q, k, lam, time FROM mechanisms ORDER BY id").fetchall()
        return [(int(i), MechanismParams(s, q, k), float(lam), t) for i, s, q, k, lam, t in rows]

    def _capacity(self, tx: Transaction, params: MechanismParams) -> int:
        """T_max for `params`: computed once, then read from the database by every process."""
        if params not in self._policy.capacities:
            row = tx.sql("SELECT max_queries FROM capacity WHERE sigma=? AND q=? AND k=?",
                         (params.sigma, params.q, params.k)).fetchone()
            if row is not None:
                self._policy.capacities[params] = int(row[0])
        return self._policy.capacity(params)

    def _pinned(self, tx: Transaction) -> tuple[MechanismParams, float, bool]:
        """(pinned mechanism, its lam, whether the RDP filter applies)."""
        mechanisms = self._mechanisms(tx)
        _, params, lam, _ = mechanisms[-1]
        return params, lam, len(mechanisms) > 1

    # -- rollback detection ----------------------------------------------------------------------
    def _read_watermark(self) -> dict | None:
        # Whether it must exist is the binding's check (the index manifest names a ledger).
        path = self.watermark_path
        return read_watermark(path) if path is not None and path.is_file() else None

    def _check_watermark(self, watermark: dict | None, total: int) -> None:
        if watermark is None:
            return
        if watermark["ledger_id"] != self.ledger_id:
            raise DprdmError(
                f"{self.location} (ledger id {self.ledger_id}) does not match the release "
                f"watermark {self.watermark_path} (ledger id {watermark['ledger_id']}): the "
                "ledger was replaced. Refused: nothing is charged or released."
            )
        if total < watermark["queries"]:
            raise DprdmError(
                f"{self.location} records {total} queries but {WATERMARK_FILENAME} shows that "
                f"{watermark['queries']} were released: this ledger was rolled back (a restored "
                "backup?). Refused: nothing is charged or released. Restore the newest ledger."
            )

    def _advance_watermark(self, committed_total: int) -> None:
        """Raise the watermark to a committed total (never lower it): writers are serialised by a
        lock file beside it, so it only grows; after the commit, so it never exceeds it."""
        if self.watermark_path is None:
            return
        with open(self.watermark_path.with_name(self.watermark_path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self._read_watermark()
            if current is None or current["queries"] < committed_total:
                _write_watermark(self.watermark_path, self.ledger_id, committed_total)

    # -- the policy ------------------------------------------------------------------------------
    @property
    def mechanism(self) -> MechanismParams:
        """The pinned mechanism: the only parameters `charge` accepts."""
        with self._read() as tx:
            return self._pinned(tx)[0]

    @property
    def lam(self) -> float:
        """The operator's mix weight stored beside the mechanism (post-processing, free)."""
        with self._read() as tx:
            return self._pinned(tx)[1]

    def mechanisms(self) -> list[dict]:
        with self._read() as tx:
            return [{"id": i, "sigma": p.sigma, "q": p.q, "k": p.k, "lam": lam, "time": t}
                    for i, p, lam, t in self._mechanisms(tx)]

    def events(self) -> list[dict]:
        with self._read() as tx:
            rows = tx.sql("SELECT time, kind, detail FROM events ORDER BY id").fetchall()
        return [{"time": t, "kind": kind, "detail": detail} for t, kind, detail in rows]

    @property
    def rdp_filter(self) -> RdpFilter:
        return self._filter

    def _check_writable(self) -> None:
        if self.read_only:
            raise DprdmError(f"{self.location} was opened read-only: nothing is charged")

    def set_mechanism(self, params: MechanismParams, lam: float = 1.0, note: str = "") -> None:
        """Pin a new mechanism (operator only). From now on the ledger is accounted by the RDP
        filter: the new mechanism may have been chosen after seeing earlier outputs."""
        self._check_writable()
        lam = check_lam(lam)
        with self._write() as tx:
            pinned, _, _ = self._pinned(tx)
            if params == pinned:
                raise InvalidParameterError("that is already the pinned mechanism")
            now = _now()
            tx.sql("INSERT INTO mechanisms (sigma, q, k, lam, time) VALUES (?, ?, ?, ?, ?)",
                   (params.sigma, params.q, params.k, lam, now))
            detail = f"sigma={params.sigma!r} q={params.q!r} k={params.k} lam={lam!r}"
            tx.sql("INSERT INTO events (time, kind, detail) VALUES (?, 'set-mechanism', ?)",
                   (now, detail + (f"; {note}" if note else "")))

    # -- the interface ---------------------------------------------------------------------------
    def charge(self, params: MechanismParams, count: int = 1, caller: str = "",
               request_id: str | None = None) -> Charge:
        """Record `count` releases with `params` if `params` is the pinned mechanism and they fit
        the budget; else refuse, recording nothing. Returns only after the record is durably
        committed (and the watermark advanced). A `request_id` already committed returns the
        original receipt (``replayed=True``) and charges nothing."""
        self._check_writable()
        count = accounting.check_queries(count)
        if not isinstance(caller, str) or len(caller) > 200:
            raise InvalidParameterError("caller must be a string of at most 200 characters")
        if request_id is not None and (not isinstance(request_id, str)
                                       or not 1 <= len(request_id) <= 200):
            raise InvalidParameterError("request_id must be a string of 1 to 200 characters")
        # T_max is looked up (or computed: seconds, the first time) OUTSIDE the write lock.
        with self._read() as tx:
            pinned, _, filtered = self._pinned(tx)
            if params != pinned:
                raise _pinned_error(pinned, params)
            capacity = None if filtered else self._capacity(tx, params)
        return self._charge_once(params, count, caller, request_id, capacity)

    def _charge_once(self, params: MechanismParams, count: int, caller: str,
                     request_id: str | None, capacity: int | None) -> Charge:
        with self._write() as tx:
            if request_id is not None:
                replay = self._receipt(tx, request_id, params, count)
                if replay is not None:
                    return replay
            pinned, _, filtered = self._pinned(tx)  # re-read under the lock: the decision's
            if params != pinned:
                raise _pinned_error(pinned, params)
            mechanism_id = self._mechanisms(tx)[-1][0]
            totals = self._totals(tx)
            # A ledger rolled back while this process holds it open.
            self._check_watermark(self._read_watermark(), sum(totals.values()))
            if filtered:
                after = self._filter.admit(totals, params, count)
            else:
                after = self._policy.admit(totals, params, count)
                capacity = self._capacity(tx, params) if capacity is None else capacity
                tx.sql("INSERT INTO capacity VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                       (params.sigma, params.q, params.k, capacity))
            now = _now()
            release_id = tx.sql(
                "INSERT INTO releases (sigma, q, k, count, time, caller, mechanism_id) "
                "VALUES (?,?,?,?,?,?,?) RETURNING id",
                (params.sigma, params.q, params.k, count, now, caller, mechanism_id),
            ).fetchone()[0]
            tx.sql("INSERT INTO totals VALUES (?, ?, ?, ?) ON CONFLICT (sigma, q, k) "
                   "DO UPDATE SET count = totals.count + excluded.count",
                   (params.sigma, params.q, params.k, count))
            total = sum(after.values())
            if request_id is not None:
                tx.sql("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (request_id, int(release_id), params.sigma, params.q, params.k, count,
                        total, now))
        self._advance_watermark(total)
        return Charge(params, count, total, request_id=request_id)

    def _receipt(self, tx: Transaction, request_id: str, params: MechanismParams,
                 count: int) -> Charge | None:
        """The original receipt of a committed request id, or None."""
        row = tx.sql("SELECT sigma, q, k, count, queries_total FROM requests "
                     "WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        original = MechanismParams(row[0], row[1], int(row[2]))
        if (original, int(row[3])) != (params, count):
            raise InvalidParameterError(
                "this request id was already used for another charge (other parameters or "
                "count); nothing was charged or released")
        return Charge(original, int(row[3]), int(row[4]), request_id=request_id, replayed=True)

    def charged(self, request_id: str) -> Charge | None:
        """The receipt of a committed request id, or None (nothing was charged under it)."""
        with self._read() as tx:
            row = tx.sql("SELECT sigma, q, k, count, queries_total FROM requests "
                         "WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        return Charge(MechanismParams(row[0], row[1], int(row[2])), int(row[3]), int(row[4]),
                      request_id=request_id, replayed=True)

    def can_afford(self, params: MechanismParams | None = None, count: int = 1) -> bool:
        count = accounting.check_queries(count)
        with self._read() as tx:
            pinned, _, filtered = self._pinned(tx)
            params = pinned if params is None else params
            if params != pinned:
                return False
            if not filtered:
                self._capacity(tx, params)
            after = self._totals(tx)
        after[params] = after.get(params, 0) + count
        if filtered:
            return self._filter.spent(after) <= self._filter.bound
        return self._policy.fits(after)

    def remaining_queries(self, params: MechanismParams | None = None) -> int:
        """How many more releases with the pinned mechanism fit (0 for any other parameters)."""
        with self._read() as tx:
            pinned, _, filtered = self._pinned(tx)
            params = pinned if params is None else params
            if params != pinned:
                return 0
            if not filtered:
                self._capacity(tx, params)
            totals = self._totals(tx)
        if filtered:
            return self._filter.remaining(totals, params)
        return _remaining_queries(self._policy, self._policy.summary(totals), params)

    def summary(self) -> LedgerSummary:
        with self._read() as tx:
            totals = self._totals(tx)
            pinned, lam, filtered = self._pinned(tx)
            capacity = None if filtered else self._capacity(tx, pinned)
        if not filtered:
            groups = tuple(sorted((p, c) for p, c in totals.items() if c > 0))
            if set(totals) <= {pinned}:  # one mechanism: the epsilon table
                queries = totals.get(pinned, 0)
                point = epsilon_grid_point(queries, capacity)
                spent, spent_rdp = self._tabulated_epsilon(pinned, point) if queries else (0, 0)
                return LedgerSummary(
                    epsilon_budget=self.epsilon_budget, delta=self.delta,
                    epsilon_spent=spent, epsilon_spent_rdp=spent_rdp, queries=queries,
                    releases=groups, mechanism=pinned, lam=lam,
                    epsilon_at_count=point if queries else None)
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

    def _tabulated_epsilon(self, params: MechanismParams, count: int) -> tuple[float, float]:
        """(PLD epsilon, RDP epsilon) of `count` releases with `params`: from this process's
        memo, else from the ledger's table, else computed once and stored there."""
        key = (params, count)
        if key not in self._epsilon_table:
            with self._read() as tx:
                row = tx.sql("SELECT epsilon, epsilon_rdp FROM epsilon_table WHERE sigma=? "
                             "AND q=? AND k=? AND count=?",
                             (params.sigma, params.q, params.k, count)).fetchone()
            if row is None:
                groups = [(params, count)]
                row = (accounting.epsilon(groups, self.delta),
                       accounting.epsilon_rdp(groups, self.delta)[0])
                if not self.read_only:  # a cache of public figures: not a budget write
                    with self._write() as tx:
                        tx.sql("INSERT INTO epsilon_table VALUES (?, ?, ?, ?, ?, ?) "
                               "ON CONFLICT DO NOTHING",
                               (params.sigma, params.q, params.k, count, row[0], row[1]))
            self._epsilon_table[key] = (float(row[0]), float(row[1]))
        return self._epsilon_table[key]

    def reported_epsilon(self, count: int) -> float:
        """The epsilon this ledger reports after `count` releases of its pinned mechanism: the
        table's figure at the next grid point (never below the exact one). For per-call figures."""
        if count <= 0:
            return 0.0
        with self._read() as tx:
            pinned, _, _ = self._pinned(tx)
            capacity = self._capacity(tx, pinned)
        return self._tabulated_epsilon(pinned, epsilon_grid_point(count, capacity))[0]

    def warm_epsilon_table(self, up_to: int | None = None) -> int:
        """Compute every grid point of the pinned mechanism's epsilon table from the current
        count up to `up_to` (default: the capacity) that the ledger does not hold yet; returns
        how many points there are. The service runs it once in a background thread at start."""
        with self._read() as tx:
            pinned, _, filtered = self._pinned(tx)
            if filtered:
                return 0
            capacity = self._capacity(tx, pinned)
            count = max(1, self._totals(tx).get(pinned, 0))
        points = 0
        while True:
            point = epsilon_grid_point(count, capacity)
            if point > min(capacity, up_to or capacity):
                return points
            self._tabulated_epsilon(pinned, point)
            points += 1
            if point >= capacity:
                return points
            count = point + 1

    def release_count(self) -> int:
        """Number of queries in the release rows; for audits and tests."""
        with self._read() as tx:
            return int(tx.sql("SELECT COALESCE(SUM(count), 0) FROM releases").fetchone()[0])


def new_request_id() -> str:
    return uuid.uuid4().hex


# Tables every schema-2 store holds beyond the budget (shared DDL; the stores add their own
# types for ids). epsilon_table and requests are caches/idempotency keys, added to older
# schema-2 ledgers on open.
EPSILON_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS epsilon_table (sigma {real} NOT NULL, q {real} NOT NULL, "
    "k INTEGER NOT NULL, count BIGINT NOT NULL, epsilon {real} NOT NULL, "
    "epsilon_rdp {real} NOT NULL, PRIMARY KEY (sigma, q, k, count))")
REQUESTS_DDL = (
    "CREATE TABLE IF NOT EXISTS requests (request_id TEXT PRIMARY KEY, release_id BIGINT NOT "
    "NULL, sigma {real} NOT NULL, q {real} NOT NULL, k INTEGER NOT NULL, count BIGINT NOT NULL, "
    "queries_total BIGINT NOT NULL, time TEXT NOT NULL)")


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




def is_postgres_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_ledger(location: str | os.PathLike, *, read_only: bool = False,
                watermark_dir: str | os.PathLike | None = None) -> StoredLedger:
    """The ledger at `location`: an index directory (its ``ledger.sqlite``) or a
    ``postgresql://`` URL (then `watermark_dir`, the index directory, holds the watermark).
    Prefer :func:`dprdm.privacy.binding.open_private_index`, which also verifies the binding."""
    if is_postgres_url(location):
        from dprdm.privacy.ledger_postgres import PostgresLedger

        return PostgresLedger(str(location), read_only=read_only, watermark_dir=watermark_dir)
    from dprdm.privacy.ledger_sqlite import SqliteLedger

    return SqliteLedger(Path(location) / LEDGER_FILENAME, read_only=read_only)


def __getattr__(name: str):
    # `from dprdm.privacy.ledger import SqliteLedger` keeps working (the store lives beside).
    if name == "SqliteLedger":
        from dprdm.privacy.ledger_sqlite import SqliteLedger

        return SqliteLedger
    raise AttributeError(name)
