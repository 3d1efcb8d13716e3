"""A real `dprdm serve` under concurrent load, and under SIGKILL in the middle of it.

The budget is small (15 queries of sigma=2, q=0.5, k=5 fit in epsilon 1.6), so each test spends
all of it and then keeps asking: the ledger must count exactly what clients received (load), and
never less than they received (SIGKILL).
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import threading
import time

import httpx2 as httpx
import pytest

from _service_support import (ID_PREFIX, PARAMS, ServerProcess, free_port, make_index,
                              release_times)
from dprdm.privacy import SqliteLedger
from dprdm.service.keys import KeyStore

EPSILON = 1.6
CLIENTS = 8
REQUESTS = 25  # per client: 200 in all


def post(client: httpx.Client, url: str, token: str, prompt: str) -> httpx.Response:
    return client.post(url + "/v1/generate", json={"prompt": prompt, "n": 1, "steps": 2},
                       headers={"Authorization": f"Bearer {token}"}, timeout=120)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture()
def index(tmp_path):
    path = make_index(tmp_path / "private", EPSILON)
    capacity = SqliteLedger(path).remaining_queries(PARAMS)
    assert 10 <= capacity <= 40
    return path


def test_concurrent_clients_get_exactly_what_the_ledger_counts(index, tmp_path):
    capacity = SqliteLedger(index).remaining_queries(PARAMS)
    tokens = [KeyStore(index).create(f"client{i}")[0] for i in range(CLIENTS)]
    server = ServerProcess(index, free_port(), tmp_path, "--workers", "2")
    server.start()
    results: list[tuple[int, str, dict, float]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client() as http:
            for j in range(REQUESTS):
                response = post(http, server.url, tokens[i], f"client {i} request {j}")
                body = response.json()
                with lock:
                    results.append((response.status_code, f"client{i}", body, time.time()))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        scrape = httpx.get(server.url + "/metrics", timeout=30,
                           headers={"Authorization": f"Bearer {tokens[0]}"}).text
    finally:
        server.stop()

    assert len(results) == CLIENTS * REQUESTS
    successes = [r for r in results if r[0] == 200]
    refusals = [r for r in results if r[0] != 200]
    summary = SqliteLedger(index).summary()
    # Exactly the ledger's count: every generation was charged, nothing charged was lost.
    assert len(successes) == summary.queries == capacity
    assert all(len(body["images"]) == 1 and body["mode"] == "dp" for _, _, body, _ in successes)
    conn = sqlite3.connect(index / "ledger.sqlite")
    per_caller = dict(conn.execute("SELECT caller, SUM(count) FROM releases GROUP BY caller"))
    for i in range(CLIENTS):
        received = sum(1 for r in successes if r[1] == f"client{i}")
        assert per_caller.get(f"key:client{i}", 0) == received
        assert KeyStore(index).get(f"client{i}").used == received
    # Every refusal is the budget's, and came after the budget ran out.
    full_at = dt.datetime.fromisoformat(release_times(index)[-1]).timestamp()
    assert len(refusals) == CLIENTS * REQUESTS - capacity
    for status, _, body, received_at in refusals:
        assert status == 429 and body["error"] == "budget_exhausted"
        assert body["queries_remaining"] == 0 and body["queries_spent"] == capacity
        assert received_at >= full_at - 0.01  # ISO times are rounded to the millisecond
    # Both workers' counts are in one scrape (prometheus multi-process mode).
    assert metric(scrape, 'dprdm_generations_total{mode="dp"}') == capacity
    assert metric(scrape, 'dprdm_refusals_total{reason="budget_exhausted"}') == len(refusals)
    assert metric(scrape, "dprdm_budget_queries_spent") == capacity
    assert metric(scrape, "dprdm_budget_queries_remaining") == 0
    # charge() ran for every success, and also refused the requests that lost the race
    # between workers (can_afford said yes, the ledger itself said no).
    assert metric(scrape, "dprdm_ledger_charge_seconds_count") >= capacity
    assert ID_PREFIX not in server.logs() and ID_PREFIX not in scrape


def test_sigkill_mid_load_never_undercounts_and_the_service_comes_back(index, tmp_path):
    capacity = SqliteLedger(index).remaining_queries(PARAMS)
    token, _ = KeyStore(index).create("loader")
    server = ServerProcess(index, free_port(), tmp_path)
    server.start()
    received: list[str] = []  # "before" / "after" the restart, one per image-bearing answer
    refusals: list[dict] = []
    errors: list[str] = []
    phase, lock = ["before"], threading.Lock()
    deadline = time.monotonic() + 150

    def client(i: int) -> None:
        with httpx.Client() as http:
            while time.monotonic() < deadline:
                try:
                    response = post(http, server.url, token, f"client {i}")
                except httpx.HTTPError as error:  # killed, or not back yet
                    with lock:
                        errors.append(type(error).__name__)
                    time.sleep(0.25)
                    continue
                with lock:
                    if response.status_code == 200 and response.json()["images"]:
                        received.append(phase[0])
                    elif response.status_code == 429:
                        refusals.append(response.json())
                        return
                    else:
                        raise AssertionError(response.text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    try:
        for thread in threads:
            thread.start()
        while len(received) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill()  # SIGKILL, with requests in flight
        with lock:
            received_before_kill = len(received)
            phase[0] = "after"
        after_kill = SqliteLedger(index)  # opens cleanly after kill -9
        conn = sqlite3.connect(index / "ledger.sqlite")
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()
        assert after_kill.summary().queries >= received_before_kill >= 4
        server.start()  # the same port: clients simply retry
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        server.stop()
    assert not any(thread.is_alive() for thread in threads), "clients did not finish"
    summary = SqliteLedger(index).summary()
    assert errors, "the kill should have cut requests in flight"
    assert "after" in received  # it came back and served again
    assert len(received) <= summary.queries == capacity  # and kept enforcing the budget
    assert len(refusals) == 6
    assert all(r["error"] == "budget_exhausted" and r["queries_remaining"] == 0
               for r in refusals)
    assert KeyStore(index).get("loader").used >= summary.queries  # quota charged first
