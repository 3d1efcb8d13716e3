"""Reliability figures of `dprdm serve`: bad inputs, concurrent load, SIGKILL mid-load.

    python bench/service_reliability.py --out bench/results/service-reliability.json

The same three checks as tests/test_service_*.py, against real server processes on a synthetic
private index with a small budget (sigma=2, q=0.5, k=5; ``--epsilon`` 1.6 fits 15 queries),
printed as figures:

1. bad inputs: a table of malformed requests, each with its status, error code and the queries
   the ledger gained (must be 0);
2. load: ``--clients`` threads (one key each) send ``--requests`` generation requests each to a
   server with ``--workers`` workers; successful generations vs the ledger's count (must be
   equal), refusals, and refusals received before the ledger's last release (must be 0);
3. faults: 6 clients load a 1-worker server, which is SIGKILLed after 4 answers and restarted on
   the same port; what clients received before the kill vs what the ledger holds right after it
   (ledger >= received), charges lost with the killed requests, and that the restarted server
   served again and refused once the budget was gone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import start_server  # noqa: E402  (bench/service.py)

from dprdm.privacy import MechanismParams, SqliteLedger, init_budget  # noqa: E402
from dprdm.retrieval import build_index  # noqa: E402
from dprdm.service.keys import KeyStore  # noqa: E402
from results_file import write_results  # noqa: E402  (bench/results_file.py)

console = Console()
SIGMA, Q, K, LAM = 2.0, 0.5, 5, 0.8
PARAMS = MechanismParams(SIGMA, Q, K)
FLAGS = ["--k", str(K), "--q", str(Q), "--sigma", str(SIGMA), "--lam", str(LAM)]
BODY = {"n": 1, "steps": 2}
BAD = [  # name, raw body, content type
    ("empty prompt", b'{"prompt": ""}', "application/json"),
    ("over-long prompt", json.dumps({"prompt": "a" * 501}).encode(), "application/json"),
    ("n = 0", b'{"prompt": "x", "n": 0}', "application/json"),
    ("n = 100", b'{"prompt": "x", "n": 100}', "application/json"),
    ("n as a string", b'{"prompt": "x", "n": "2"}', "application/json"),
    ("steps = 5000", b'{"prompt": "x", "steps": 5000}', "application/json"),
    ("negative guidance", b'{"prompt": "x", "guidance": -1}', "application/json"),
    ("client-chosen sigma", b'{"prompt": "x", "sigma": 0.001}', "application/json"),
    ("unknown field", b'{"prompt": "x", "colour": "red"}', "application/json"),
    ("public-only, not enabled", b'{"prompt": "x", "public_only": true}', "application/json"),
    ("bad JSON", b'{"prompt": ', "application/json"),
    ("JSON array", b'["x"]', "application/json"),
    ("empty body", b"", "application/json"),
    ("form body", b"prompt=x", "application/x-www-form-urlencoded"),
    ("oversized body", b'{"prompt": "' + b"a" * 50_000 + b'"}', "application/json"),
    ("no key", b'{"prompt": "x"}', "application/json"),
]


def make_index(path: Path, epsilon: float) -> Path:
    vectors = np.random.default_rng(0).normal(size=(200, 64)).astype(np.float32)
    build_index(vectors, path)
    init_budget(path, epsilon, 1e-5, PARAMS, LAM)
    return path


def queries(index: Path) -> int:
    return SqliteLedger(index).summary().queries


def bad_inputs(url: str, token: str, index: Path) -> list[dict]:
    rows = []
    for name, raw, kind in BAD:
        headers = {"Content-Type": kind}
        if name != "no key":
            headers["Authorization"] = f"Bearer {token}"
        before = queries(index)
        response = httpx.post(url + "/v1/generate", content=raw, headers=headers, timeout=60)
        rows.append({"request": name, "status": response.status_code,
                     "error": response.json().get("error"), "charged": queries(index) - before})
    return rows


def load(url: str, tokens: list[str], requests: int, index: Path) -> dict:
    results, lock = [], threading.Lock()

    def client(token: str) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=300) as http:
            for j in range(requests):
                response = http.post(url + "/v1/generate", json=dict(BODY, prompt=f"p{j}"))
                with lock:
                    results.append((response.status_code, response.json(), time.time()))

    threads = [threading.Thread(target=client, args=(t,)) for t in tokens]
    tic = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - tic
    conn = sqlite3.connect(f"file:{index / 'ledger.sqlite'}?mode=ro", uri=True)
    last = conn.execute("SELECT time FROM releases ORDER BY id DESC LIMIT 1").fetchone()[0]
    conn.close()
    full_at = dt.datetime.fromisoformat(last).timestamp()
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    return {"clients": len(tokens), "requests": len(results), "wall_s": round(wall, 1),
            "generations_received": len(ok), "ledger_queries": queries(index),
            "capacity": SqliteLedger(index).remaining_queries(PARAMS) + queries(index),
            "refusals": len(refused),
            "refusals_budget_exhausted": sum(1 for r in refused
                                             if r[1].get("error") == "budget_exhausted"),
            "refusals_before_budget_ran_out": sum(1 for r in refused if r[2] < full_at - 0.01)}


def faults(index: Path, token: str, log: Path) -> dict:
    process, url = start_server(index, FLAGS, log)
    port = url.rsplit(":", 1)[1]
    received, refusals, errors = [], [], []
    phase, lock = ["before"], threading.Lock()
    deadline = time.monotonic() + 240

    def client() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=300) as http:
            while time.monotonic() < deadline:
                try:
                    response = http.post(url + "/v1/generate", json=dict(BODY, prompt="x"))
                except httpx.HTTPError as error:
                    with lock:  # ConnectError: the server is down; else: cut mid-request
                        errors.append("down" if isinstance(error, httpx.ConnectError)
                                      else "cut")
                    time.sleep(0.25)
                    continue
                with lock:
                    if response.status_code == 200:
                        received.append(phase[0])
                    else:
                        refusals.append(response.json().get("error"))
                        return

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    while len(received) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with lock:
        before_kill = len(received)
        phase[0] = "after"
    at_kill = queries(index)
    tic = time.perf_counter()
    process, _ = start_server(index, FLAGS, log, port=int(port))
    restart_s = time.perf_counter() - tic
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic()))
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    final = queries(index)
    return {"received_before_kill": before_kill, "ledger_right_after_kill": at_kill,
            "requests_cut_by_the_kill": errors.count("cut"),
            "connections_refused_while_down": errors.count("down"),
            "restart_s": round(restart_s, 1),
            "received_after_restart": received.count("after"),
            "received_total": len(received), "ledger_final": final,
            "charged_but_never_received": final - len(received),
            "capacity": final + SqliteLedger(index).remaining_queries(PARAMS),
            "final_refusals": sorted(set(refusals))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epsilon", type=float, default=1.6)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = {"load_average_1m": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index = make_index(tmp / "load", args.epsilon)
        tokens = [KeyStore(index).create(f"client{i}")[0] for i in range(args.clients)]
        process, url = start_server(index, [*FLAGS, "--workers", str(args.workers)],
                                    tmp / "load.log")
        try:
            result["bad_inputs"] = bad_inputs(url, tokens[0], index)
            result["load"] = load(url, tokens, args.requests, index)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
        index = make_index(tmp / "faults", args.epsilon)
        result["faults"] = faults(index, KeyStore(index).create("loader")[0], tmp / "faults.log")

    table = Table(title="bad inputs (charged: queries the ledger gained)")
    for column in ("request", "status", "error", "charged"):
        table.add_column(column)
    for row in result["bad_inputs"]:
        table.add_row(row["request"], str(row["status"]), row["error"], str(row["charged"]))
    console.print(table)
    for name, title in (("load", f"load: {args.clients} clients, {args.workers} worker(s)"),
                        ("faults", "SIGKILL mid-load, restart")):
        figures = Table(title=title, show_header=False)
        figures.add_column(style="bold cyan")
        figures.add_column(justify="right")
        for key, value in result[name].items():
            figures.add_row(key.replace("_", " "), str(value))
        console.print(figures)
    write_results(args.out, result, console)


if __name__ == "__main__":
    main()
