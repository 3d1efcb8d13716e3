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

DELTA = 1e-5
# One query of these parameters costs a lot: the whole budget holds only a few dozen.
PARAMS = MechanismParams(sigma=1.0, q=0.2, k=4)
BUDGET = 3.0


@pytest.fixture()
def ledger_dir(tmp_path):
    SqliteLedger.create(tmp_path, epsilon=BUDGET, delta=DELTA)
    return tmp_path


def t_max():
    return accounting.max_queries(PARAMS, BUDGET, DELTA)


@pytest.mark.parametrize("make", ["sqlite", "memory"])
def test_charges_until_the_budget_is_gone_then_refuses(make, tmp_path):
    if make == "sqlite":
        ledger = SqliteLedger.create(tmp_path, epsilon=BUDGET, delta=DELTA)
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


def test_heterogeneous_releases_are_accounted_together(ledger_dir):
    ledger = SqliteLedger(ledger_dir)
    other = MechanismParams(sigma=1.0, q=0.2, k=10)
    ledger.charge(PARAMS, 3)
    ledger.charge(other, 5)
    ledger.charge(PARAMS, 2)
    summary = ledger.summary()
    assert summary.queries == 10
    assert summary.epsilon_spent == pytest.approx(
        accounting.epsilon([(PARAMS, 5), (other, 5)], DELTA)
    )
    # A refusal with mixed parameters is decided on the composition of everything.
    remaining = ledger.remaining_queries(other)
    ledger.charge(other, remaining)
    with pytest.raises(BudgetExceededError):
        ledger.charge(other, 1)


def test_the_ledger_persists_and_is_never_reset(ledger_dir):
    SqliteLedger(ledger_dir).charge(PARAMS, 4, caller="alice")
    reopened = SqliteLedger(ledger_dir / "ledger.sqlite")
    assert reopened.summary().queries == 4
    assert reopened.epsilon_budget == BUDGET and reopened.delta == DELTA
    with pytest.raises(DprdmError, match="never reset"):
        SqliteLedger.create(ledger_dir, epsilon=100.0, delta=DELTA)
    rows = sqlite3.connect(ledger_dir / "ledger.sqlite").execute(
        "SELECT sigma, q, k, count, caller FROM releases"
    ).fetchall()
    assert rows == [(PARAMS.sigma, PARAMS.q, PARAMS.k, 4, "alice")]


@pytest.mark.parametrize(
    "epsilon,delta", [(0.0, 1e-5), (-1.0, 1e-5), (float("inf"), 1e-5), (1.0, 0.0), (1.0, 1.0)]
)
def test_invalid_budgets_are_refused_and_write_nothing(tmp_path, epsilon, delta):
    with pytest.raises(InvalidParameterError):
        SqliteLedger.create(tmp_path, epsilon=epsilon, delta=delta)
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
    SqliteLedger.create(tmp_path, epsilon=50.0, delta=DELTA).charge(params, 1)
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
