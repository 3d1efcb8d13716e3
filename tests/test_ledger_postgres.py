"""The PostgreSQL ledger against a REAL PostgreSQL server (a throwaway cluster, see
_postgres_support): the same rule as the SQLite ledger, one budget shared by processes and
replicas, request ids, the index binding, kill -9 and an immediate server stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from _postgres_support import start_cluster
from dprdm.errors import BudgetExceededError, DprdmError, InvalidParameterError, LedgerBindingError
from dprdm.privacy import MechanismParams, accounting, init_budget, open_private_index
from dprdm.privacy.ledger_postgres import PostgresLedger, public_url
from dprdm.retrieval import build_index

DELTA = 1e-5
PARAMS = MechanismParams(sigma=1.0, q=0.2, k=4)  # a few dozen queries fit in BUDGET
BUDGET = 3.0


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster()
    yield cluster
    try:
        cluster.stop("immediate")
    except Exception:  # noqa: BLE001 - already stopped by a failed test
        pass


def make_index(path, url, epsilon=BUDGET, params=PARAMS, n=50):
    vectors = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    build_index(vectors, path)
    init_budget(path, epsilon, DELTA, params, ledger=url)
    return path


def t_max(params=PARAMS, budget=BUDGET):
    return accounting.max_queries(params, budget, DELTA)


def test_charges_until_the_budget_is_gone_replays_request_ids_and_binds_the_index(cluster,
                                                                                tmp_path):
    url = cluster.new_database()
    with_password = url.replace("postgres@", "postgres:s3cret-pw@")
    index = make_index(tmp_path / "index", with_password)
    manifest = (index / "index.json").read_text()
    assert "s3cret-pw" not in manifest
    assert json.loads(manifest)["privacy"]["ledger_url"] == url == public_url(with_password)
    assert not (index / "ledger.sqlite").exists()
    _, ledger = open_private_index(index)  # the manifest's URL (no password needed: trust)
    assert isinstance(ledger, PostgresLedger) and ledger.mechanism == PARAMS
    limit = t_max()
    first = ledger.charge(PARAMS, 2, caller="a", request_id="req-1")
    again = ledger.charge(PARAMS, 2, caller="a", request_id="req-1")  # a retried request
    assert (again.queries_total, again.replayed, first.replayed) == (2, True, False)
    with pytest.raises(InvalidParameterError, match="already used"):
        ledger.charge(PARAMS, 3, request_id="req-1")
    assert ledger.summary().queries == ledger.release_count() == 2
    ledger.charge(PARAMS, limit - 3)
    assert ledger.remaining_queries() == 1
    ledger.charge(PARAMS)
    with pytest.raises(BudgetExceededError, match="would bring it to"):
        ledger.charge(PARAMS)
    summary = ledger.summary()
    assert summary.queries == limit and summary.epsilon_spent <= BUDGET
    assert summary.epsilon_spent == pytest.approx(accounting.epsilon([(PARAMS, limit)], DELTA))
    with pytest.raises(InvalidParameterError, match="pinned"):
        ledger.charge(MechanismParams(1.0, 0.2, 10))
    # The watermark in the index directory follows the shared ledger.
    assert json.loads((index / "ledger-watermark.json").read_text())["queries"] == limit
    # Read only (eval): figures yes, charges no.
    _, reader = open_private_index(index, read_only=True)
    assert reader.summary().queries == limit
    with pytest.raises(DprdmError, match="read-only"):
        reader.charge(PARAMS)


def test_the_binding_refuses_another_ledger_a_dropped_one_and_a_rollback(cluster, tmp_path):
    url, other_url = cluster.new_database(), cluster.new_database()
    index = make_index(tmp_path / "index", url)
    make_index(tmp_path / "other", other_url)
    with pytest.raises(DprdmError, match="not the index's ledger|ledger was replaced"):
        open_private_index(index, other_url)  # refused by the watermark's id, then the manifest
    (tmp_path / "other" / "ledger-watermark.json").write_bytes(
        (index / "ledger-watermark.json").read_bytes())  # the watermark copied along too
    with pytest.raises(LedgerBindingError, match="not the index's ledger"):
        open_private_index(tmp_path / "other", url)
    with pytest.raises(LedgerBindingError, match="SQLite"):
        sqlite_index = tmp_path / "sqlite"
        build_index(np.eye(8, dtype=np.float32), sqlite_index)
        init_budget(sqlite_index, BUDGET, DELTA, PARAMS)
        open_private_index(sqlite_index, url)
    _, ledger = open_private_index(index)
    ledger.charge(PARAMS, 3)
    # A rolled-back database (a restored backup): below the index's watermark.
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE totals SET count = 1")
    with pytest.raises(DprdmError, match="rolled back"):
        open_private_index(index)
    with pytest.raises(DprdmError, match="rolled back"):
        ledger.charge(PARAMS, 1)
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("budget", "mechanisms", "releases", "totals", "capacity", "events",
                      "epsilon_table", "requests"):
            conn.execute(f"DROP TABLE {table}")
    with pytest.raises(LedgerBindingError, match="missing"):
        open_private_index(index)
    with pytest.raises(LedgerBindingError, match="(?s)missing.*new-budget"):
        init_budget(index, BUDGET, DELTA, PARAMS, ledger=url)


RACER = textwrap.dedent(
    """
    import sys, threading
    from dprdm.errors import BudgetExceededError
    from dprdm.privacy import MechanismParams
    from dprdm.privacy.ledger_postgres import PostgresLedger
    url, threads = sys.argv[1], int(sys.argv[2])
    params = MechanismParams(1.0, 0.2, 4)
    ledger = PostgresLedger(url)
    ledger.remaining_queries()  # T_max from the database before the race
    granted, start = [], threading.Barrier(threads)
    def race():
        start.wait()
        mine = 0
        while True:
            try:
                ledger.charge(params, 1, caller="racer")
            except BudgetExceededError:
                break
            mine += 1
        granted.append(mine)
    workers = [threading.Thread(target=race) for _ in range(threads)]
    for w in workers: w.start()
    for w in workers: w.join()
    print(sum(granted), flush=True)
    """
)


def test_16_threads_in_each_of_2_processes_race_for_the_last_queries(cluster, tmp_path):
    url = cluster.new_database()
    PostgresLedger.create(url, BUDGET, DELTA, mechanism=PARAMS).charge(PARAMS, t_max() - 20)
    processes = [subprocess.Popen([sys.executable, "-c", RACER, url, "16"],
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    granted = [int(p.communicate(timeout=300)[0].strip()) for p in processes]
    assert sum(granted) == 20  # granted == capacity, never more
    ledger = PostgresLedger(url)
    assert ledger.summary().queries == ledger.release_count() == t_max()


CHARGER = textwrap.dedent(
    """
    import os, sys
    from dprdm.privacy import MechanismParams
    from dprdm.privacy.ledger_postgres import PostgresLedger
    ledger = PostgresLedger(sys.argv[1])
    params = MechanismParams(2.0, 0.5, 4)
    with open(sys.argv[2], "a") as acknowledged:
        print("ready", flush=True)
        while True:
            ledger.charge(params, 1, caller="charger")
            acknowledged.write("1\\n")  # the charge was acknowledged: a release may follow
            acknowledged.flush()
            os.fsync(acknowledged.fileno())
            if len(sys.argv) > 3 and os.path.getsize(sys.argv[2]) >= 2 * int(sys.argv[3]):
                print("done", flush=True)
                break
    """
)
GENEROUS = MechanismParams(2.0, 0.5, 4)  # epsilon 50: far more than the tests charge


def wait_for_other_sessions_to_end(url: str, timeout_s: float = 30.0) -> None:
    """Until no other server session is connected to `url`'s database."""
    import psycopg

    deadline = time.monotonic() + timeout_s
    with psycopg.connect(url, autocommit=True) as connection:
        while True:
            (others,) = connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()").fetchone()
            if others == 0:
                return
            assert time.monotonic() < deadline, f"{others} server sessions still open"
            time.sleep(0.05)


def test_kill_minus_nine_of_charging_processes_never_loses_a_charge(cluster, tmp_path):
    url = cluster.new_database()
    PostgresLedger.create(url, 50.0, DELTA, mechanism=GENEROUS)
    files, workers = [], []
    for w in range(3):
        files.append(tmp_path / f"acknowledged-{w}.txt")
        workers.append(subprocess.Popen([sys.executable, "-c", CHARGER, url, str(files[-1])],
                                        stdout=subprocess.PIPE, text=True))
    for worker in workers:
        assert worker.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    for worker in workers:
        worker.wait()
        assert worker.returncode == -signal.SIGKILL
    # A killed client's COMMIT may already be on its way: the server finishes it after the
    # client is gone. Read the ledger once every killed client's server session has ended.
    wait_for_other_sessions_to_end(url)
    acknowledged = sum(len(f.read_text().splitlines()) for f in files)
    ledger = PostgresLedger(url)
    recorded = ledger.summary().queries
    assert acknowledged > 0
    assert acknowledged <= recorded <= acknowledged + 3  # one in-flight charge per worker
    assert ledger.release_count() == recorded  # releases and totals agree
    ledger.charge(GENEROUS, 1)  # and the ledger keeps working


def test_an_immediate_server_stop_after_acknowledged_charges_loses_nothing(cluster, tmp_path):
    url = cluster.new_database()
    PostgresLedger.create(url, 50.0, DELTA, mechanism=GENEROUS)
    acknowledged = tmp_path / "acknowledged.txt"
    worker = subprocess.Popen([sys.executable, "-c", CHARGER, url, str(acknowledged), "40"],
                              stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "ready"
    assert worker.stdout.readline().strip() == "done"
    worker.wait(timeout=60)
    count = len(acknowledged.read_text().splitlines())
    cluster.stop("immediate")  # no checkpoint, no clean shutdown: WAL recovery on restart
    cluster.start()
    ledger = PostgresLedger(url)
    assert ledger.summary().queries == ledger.release_count() == count == 40


def test_two_serve_replicas_share_one_postgres_ledger_under_load(cluster, tmp_path):
    import httpx2 as httpx

    from _service_support import ID_PREFIX, ServerProcess, free_port
    from _service_support import make_index as make_service_index
    from dprdm.service.keys import KeyStore

    url = cluster.new_database()
    index = make_service_index(tmp_path / "private", 1.6, ledger=url)
    _, ledger = open_private_index(index)
    capacity = ledger.remaining_queries()
    assert 10 <= capacity <= 40
    tokens = [KeyStore(index).create(f"client{i}")[0] for i in range(8)]
    replicas = [ServerProcess(index, free_port(), tmp_path, "--ledger", url) for _ in range(2)]
    for replica in replicas:
        assert replica.start()["ledger"] == url
    results, lock = [], threading.Lock()

    def client(i: int) -> None:
        with httpx.Client() as http:
            for j in range(8):
                replica = replicas[(i + j) % 2]
                sent = time.time()
                response = http.post(replica.url + "/v1/generate",
                                     json={"prompt": f"client {i} request {j}", "n": 1,
                                           "steps": 2},
                                     headers={"Authorization": f"Bearer {tokens[i]}"},
                                     timeout=120)
                with lock:
                    results.append((response.status_code, response.json(), sent, time.time()))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for replica in replicas:
            replica.stop()
    successes = [r for r in results if r[0] == 200]
    refusals = [r for r in results if r[0] != 200]
    assert len(successes) == ledger.summary().queries == ledger.release_count() == capacity
    assert len(refusals) == 64 - capacity
    assert all(status == 429 and body["error"] == "budget_exhausted"
               for status, body, _, _ in refusals)
    first_refusal = min(received for _, _, _, received in refusals)
    assert all(sent < first_refusal for _, _, sent, _ in successes)  # none after exhaustion
    assert all(ID_PREFIX not in replica.logs() for replica in replicas)
