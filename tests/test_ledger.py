"""The privacy ledger: budget checks, persistence, concurrency across processes, and kill -9."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from dprdm.errors import BudgetExceededError, DprdmError, InvalidParameterError
from dprdm.privacy import InMemoryLedger, MechanismParams, SqliteLedger, accounting
from dprdm.privacy.filter import epsilon_at, rdp_bound, rdp_per_release

DELTA = 1e-5
# One query of these parameters costs a lot: the whole budget holds only a few dozen.
PARAMS = MechanismParams(sigma=1.0, q=0.2, k=4)
BUDGET = 3.0


@pytest.fixture()
def ledger_dir(tmp_path):
    SqliteLedger.create(tmp_path, epsilon=BUDGET, delta=DELTA, mechanism=PARAMS)
    return tmp_path


def t_max():
    return accounting.max_queries(PARAMS, BUDGET, DELTA)


@pytest.mark.parametrize("make", ["sqlite", "memory"])
def test_charges_until_the_budget_is_gone_then_refuses(make, tmp_path):
    if make == "sqlite":
        ledger = SqliteLedger.create(tmp_path, epsilon=BUDGET, delta=DELTA, mechanism=PARAMS)
    else:
        ledger = InMemoryLedger(epsilon=BUDGET, delta=DELTA)
    limit = t_max()
    assert 5 < limit < 500
    ledger.charge(PARAMS, count=limit - 1, caller="test")
    assert ledger.remaining_queries(PARAMS) == 1
    ledger.charge(PARAMS)
    with pytest.raises(BudgetExceededError) as refused:
        ledger.charge(PARAMS)
    message = str(refused.value)
    assert f"epsilon={BUDGET:g}" in message and "would bring it to" in message
    summary = ledger.summary()
    assert summary.queries == limit
    assert summary.epsilon_spent <= BUDGET
    assert summary.epsilon_spent == pytest.approx(accounting.epsilon_for(PARAMS, limit, DELTA))
    assert ledger.remaining_queries(PARAMS) == 0 and not ledger.can_afford(PARAMS)


def test_only_the_pinned_mechanism_is_charged(ledger_dir):
    ledger = SqliteLedger(ledger_dir)
    assert ledger.mechanism == PARAMS
    ledger.charge(PARAMS, 2)
    for other in (MechanismParams(1.0, 0.2, 10), MechanismParams(1.5, 0.2, 4),
                  MechanismParams(1.0, 0.3, 4)):
        with pytest.raises(InvalidParameterError, match="pinned"):
            ledger.charge(other, 1)
        assert not ledger.can_afford(other) and ledger.remaining_queries(other) == 0
    assert ledger.summary().queries == ledger.release_count() == 2


def test_set_mechanism_switches_to_the_rdp_filter_which_never_admits_beyond_its_bound(ledger_dir):
    ledger = SqliteLedger(ledger_dir)
    ledger.charge(PARAMS, 3)
    assert ledger.summary().accountant == "pld"
    other = MechanismParams(sigma=1.0, q=0.2, k=10)
    ledger.set_mechanism(other, lam=0.5)
    with pytest.raises(InvalidParameterError, match="pinned"):
        ledger.charge(PARAMS, 1)  # the old mechanism is no longer accepted
    summary = ledger.summary()
    assert summary.accountant == "rdp-filter" and summary.mechanism == other
    rdp_filter = ledger.rdp_filter
    assert summary.rdp_filter["rdp_spent"] == pytest.approx(3 * rdp_per_release(PARAMS,
                                                                              rdp_filter.order))
    remaining = ledger.remaining_queries()
    assert remaining > 0
    ledger.charge(other, remaining)
    with pytest.raises(BudgetExceededError, match="RDP filter"):
        ledger.charge(other, 1)
    totals = {PARAMS: 3, other: remaining}
    assert rdp_filter.spent(totals) <= rdp_filter.bound < rdp_filter.spent({**totals, other: remaining + 1})
    assert ledger.summary().queries == 3 + remaining and not ledger.can_afford()
    # The filter's statement: (order, B)-RDP converts to at most the epsilon budget.
    assert ledger.summary().epsilon_spent <= BUDGET
    assert [m["k"] for m in ledger.mechanisms()] == [4, 10]
    assert [e["kind"] for e in ledger.events()] == ["created", "set-mechanism"]


def test_the_filter_bound_is_the_largest_rdp_level_within_the_budget():
    order = 6.0
    bound = rdp_bound(order, BUDGET, DELTA)
    assert epsilon_at(order, bound, DELTA) <= BUDGET < epsilon_at(order, bound * (1 + 1e-9), DELTA)
    # rdp_per_release is dp_accounting's own figure: composing T releases gives T times it.
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(
        orders=[order], neighboring_relation=accounting.ADJACENCY).compose(PARAMS.event(7))
    assert accountant.get_epsilon(DELTA) == pytest.approx(
        epsilon_at(order, 7 * rdp_per_release(PARAMS, order), DELTA))


def test_a_rolled_back_ledger_is_refused_and_a_lagging_watermark_is_not(ledger_dir):
    ledger = SqliteLedger(ledger_dir)
    ledger.charge(PARAMS, 2)
    backup = {p.name: p.read_bytes() for p in ledger_dir.glob("ledger.sqlite*")}
    ledger.charge(PARAMS, 3)
    assert json.loads((ledger_dir / "ledger-watermark.json").read_text())["queries"] == 5
    for path in ledger_dir.glob("ledger.sqlite*"):
        path.unlink()
    for name, data in backup.items():
        (ledger_dir / name).write_bytes(data)
    with pytest.raises(DprdmError, match="rolled back"):
        SqliteLedger(ledger_dir)
    with pytest.raises(DprdmError, match="rolled back"):
        ledger.charge(PARAMS, 1)  # a process that opened it before the restore: refused too
    assert ledger.release_count() == 2
    # A crash between a commit and the watermark write leaves the watermark BELOW the ledger:
    # never a false alarm.
    (ledger_dir / "ledger-watermark.json").write_text(
        json.dumps({"ledger_id": ledger.ledger_id, "queries": 1}))
    assert SqliteLedger(ledger_dir).summary().queries == 2


def test_a_schema_1_ledger_is_refused_not_migrated(tmp_path):
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    conn.execute("CREATE TABLE budget (id INTEGER PRIMARY KEY, epsilon REAL, delta REAL, "
                 "created TEXT, schema_version INTEGER)")
    conn.execute("INSERT INTO budget VALUES (1, 10.0, 1e-5, 'then', 1)")
    conn.commit()
    conn.close()
    with pytest.raises(DprdmError, match="schema-1"):
        SqliteLedger(tmp_path)


def test_the_ledger_persists_and_is_never_reset(ledger_dir):
    SqliteLedger(ledger_dir).charge(PARAMS, 4, caller="alice")
    reopened = SqliteLedger(ledger_dir / "ledger.sqlite")
    assert reopened.summary().queries == 4
    assert reopened.epsilon_budget == BUDGET and reopened.delta == DELTA
    with pytest.raises(DprdmError, match="never reset"):
        SqliteLedger.create(ledger_dir, epsilon=100.0, delta=DELTA, mechanism=PARAMS)
    rows = sqlite3.connect(ledger_dir / "ledger.sqlite").execute(
        "SELECT sigma, q, k, count, caller FROM releases"
    ).fetchall()
    assert rows == [(PARAMS.sigma, PARAMS.q, PARAMS.k, 4, "alice")]


@pytest.mark.parametrize(
    "epsilon,delta", [(0.0, 1e-5), (-1.0, 1e-5), (float("inf"), 1e-5), (1.0, 0.0), (1.0, 1.0)]
)
def test_invalid_budgets_are_refused_and_write_nothing(tmp_path, epsilon, delta):
    with pytest.raises(InvalidParameterError):
        SqliteLedger.create(tmp_path, epsilon=epsilon, delta=delta, mechanism=PARAMS)
    assert list(tmp_path.iterdir()) == []


def test_missing_ledger_is_a_clear_error(tmp_path):
    with pytest.raises(DprdmError, match="dprdm budget init"):
        SqliteLedger(tmp_path)


def test_invalid_charges_record_nothing(ledger_dir):
    ledger = SqliteLedger(ledger_dir)
    for count in (0, -1, 2.5):
        with pytest.raises(InvalidParameterError):
            ledger.charge(PARAMS, count)
    assert ledger.summary().queries == 0


def _charge_until_refused(path: str) -> int:
    ledger = SqliteLedger(path)
    granted = 0
    while True:
        try:
            ledger.charge(PARAMS, 1, caller=f"pid{os.getpid()}")
        except BudgetExceededError:
            return granted
        granted += 1


def test_concurrent_processes_never_overspend(ledger_dir):
    SqliteLedger(ledger_dir).charge(PARAMS, 1)  # caches T_max in the database
    with ProcessPoolExecutor(max_workers=4) as pool:
        granted = list(pool.map(_charge_until_refused, [str(ledger_dir)] * 4))
    assert sum(granted) + 1 == t_max()
    assert SqliteLedger(ledger_dir).summary().queries == t_max()


WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from dprdm.errors import BudgetExceededError
    from dprdm.privacy import ArrayVectors, MechanismParams, PrivateRetrieval, SqliteLedger
    ledger_dir, received_path, sigma, q, k = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:6])
    vectors = np.eye(8, dtype=np.float32)
    mech = PrivateRetrieval(ArrayVectors(vectors), MechanismParams(sigma, q, int(k)),
                            SqliteLedger(ledger_dir))
    with open(received_path, "a") as received:
        print("ready", flush=True)
        while True:
            try:
                mech.release(vectors[:1])
            except BudgetExceededError:
                break
            received.write("1\\n")  # the client now holds one released aggregate
            received.flush()
            os.fsync(received.fileno())
    """
)


def test_kill_minus_nine_never_loses_a_charge(tmp_path):
    # Generous budget: the workers are killed long before it runs out.
    params = MechanismParams(sigma=2.0, q=0.5, k=4)
    SqliteLedger.create(tmp_path, epsilon=50.0, delta=DELTA, mechanism=params).charge(params, 1)
    received_files = []
    rng = np.random.default_rng()
    for round_ in range(3):
        workers = []
        for w in range(3):
            received = tmp_path / f"received-{round_}-{w}.txt"
            received_files.append(received)
            workers.append(subprocess.Popen(
                [sys.executable, "-c", WORKER, str(tmp_path), str(received),
                 str(params.sigma), str(params.q), str(params.k)],
                stdout=subprocess.PIPE, text=True,
            ))
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.3, 1.0))
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
        for worker in workers:
            worker.wait()
            assert worker.returncode == -signal.SIGKILL
    received_total = sum(len(f.read_text().splitlines()) for f in received_files)
    ledger = SqliteLedger(tmp_path)
    recorded = ledger.summary().queries - 1
    assert received_total > 0
    assert recorded >= received_total  # a crash may waste budget, never under-count it
    assert recorded - received_total <= 9  # at most one in-flight charge per killed worker
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ledger.charge(params, 1)  # and the ledger keeps working
    assert json.dumps(ledger.summary().as_dict())
