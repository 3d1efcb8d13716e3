"""Throughput and latency of `dprdm serve` on this machine, public-only vs DP; the ledger's cost.

    python bench/service.py --out bench/results/service.json
    python bench/service.py --requests 80 --concurrency 8 --workers 2 --steps 25

It builds a synthetic private index (random unit vectors, ``--records``) with a fresh ledger in
a temporary directory, the demo's mechanism (k=40, q=0.1, sigma calibrated so that 1,000 queries
fit in epsilon 10 at delta 1e-5), starts a real server (``python -m dprdm serve``, the shipped
demo encoder and generator, public-only mode enabled), creates a key, and then, per mode,
sends ``--requests`` generation requests from ``--concurrency`` client threads (after a
warm-up). Reported per mode: requests/s, p50/p95 latency at the client.

The ledger's cost per DP request, read from the server's own /metrics: the time inside
``SqliteLedger.charge`` (one ``BEGIN IMMEDIATE`` transaction, ``synchronous=FULL``), and the
time computing the budget figures a response carries. Beside it, in this process on a scratch
ledger: ``charge()`` alone, and the accountant (PLD) for a new ledger state, which every DP
request pays (the RetrievalAugmentedGenerator's report and the response's figures).
Numbers on a shared machine move with its load; the table prints the load average too.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from dprdm.privacy import MechanismParams, SqliteLedger, accounting, init_budget
from dprdm.retrieval import build_index
from dprdm.service.keys import KeyStore
from results_file import write_results  # bench/results_file.py

console = Console()
EPSILON, DELTA, QUERIES, K, Q, LAM = 10.0, 1e-5, 1000, 40, 0.1, 0.8
PROMPTS = ["red apple", "smiling cat face", "blue car", "green tree", "yellow star",
           "grinning face", "pizza slice", "rocket"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def start_server(index: Path, flags: list[str], log: Path,
                 port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m dprdm serve --index INDEX FLAGS` in its own process group; (process, url)."""
    port = port or free_port()
    command = [sys.executable, "-m", "dprdm", "serve", "--index", str(index),
               "--port", str(port), "--json", *flags]
    with open(log, "ab") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit("server did not come up")


def load(url: str, token: str, body: dict, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                tic = time.perf_counter()
                response = http.post(url + "/v1/generate",
                                     json=dict(body, prompt=PROMPTS[i % len(PROMPTS)]))
                seconds = time.perf_counter() - tic
                with lock:
                    latencies.append(seconds)
                    statuses.append(response.status_code)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    tic = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - tic
    ok = sum(1 for s in statuses if s == 200)
    return {"requests": requests, "ok": ok, "concurrency": concurrency,
            "wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 3),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1)}


def ledger_alone(params: MechanismParams, charges: int) -> dict:
    """charge() and the accountant for a new state, in this process, on a scratch ledger."""
    with tempfile.TemporaryDirectory() as tmp:
        SqliteLedger.create(tmp, epsilon=EPSILON, delta=DELTA, mechanism=params)
        ledger = SqliteLedger(tmp)
        ledger.charge(params, 1)  # T_max computed once, outside the timings
        charge_s, summary_s = [], []
        for _ in range(charges):
            tic = time.perf_counter()
            ledger.charge(params, 1)
            charge_s.append(time.perf_counter() - tic)
        for _ in range(5):
            ledger.charge(params, 1)
            tic = time.perf_counter()
            ledger.summary()  # a new ledger state: one PLD (and one RDP) computation
            summary_s.append(time.perf_counter() - tic)
    return {"charges": charges,
            "charge_p50_ms": round(1000 * float(np.median(charge_s)), 2),
            "charge_p95_ms": round(1000 * float(np.percentile(charge_s, 95)), 2),
            "accountant_new_state_ms": round(1000 * float(np.median(summary_s)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="per mode")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("-n", type=int, default=1, help="images per request")
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    sigma = accounting.calibrate_sigma(EPSILON, Q, K, QUERIES, DELTA)
    params = MechanismParams(sigma, Q, K)
    result = {"machine": {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
              "settings": {"records": args.records, "k": K, "q": Q, "sigma": sigma, "lam": LAM,
                           "epsilon": EPSILON, "delta": DELTA, "steps": args.steps, "n": args.n,
                           "workers": args.workers, "concurrency": args.concurrency}}
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "private"
        rng = np.random.default_rng(0)
        build_index(rng.standard_normal((args.records, 64)).astype(np.float32), index)
        init_budget(index, EPSILON, DELTA, params, LAM)
        token, _ = KeyStore(index).create("bench")
        console.print(f"starting the server ({args.workers} worker(s)) ...")
        tic = time.perf_counter()
        flags = ["--k", str(K), "--q", str(Q), "--sigma", repr(sigma), "--lam", str(LAM),
                 "--workers", str(args.workers), "--allow-public-only"]
        process, url = start_server(index, flags, Path(tmp) / "server.log")
        result["startup_s"] = round(time.perf_counter() - tic, 1)
        try:
            body = {"n": args.n, "steps": args.steps, "seed": 0}
            auth = {"Authorization": f"Bearer {token}"}  # /metrics needs a key, like /v1/budget
            load(url, token, dict(body, public_only=True), 2, 1)  # warm-up
            load(url, token, body, 2, 1)
            modes = {}
            for mode, extra in (("public-only", {"public_only": True}), ("dp", {})):
                before = httpx.get(url + "/metrics", timeout=60, headers=auth).text
                modes[mode] = load(url, token, dict(body, **extra), args.requests,
                                   args.concurrency)
                after = httpx.get(url + "/metrics", timeout=60, headers=auth).text
            result["modes"] = modes
            served = {}
            for name in ("dprdm_ledger_charge_seconds", "dprdm_budget_figures_seconds"):
                count = metric(after, name + "_count") - metric(before, name + "_count")
                total = metric(after, name + "_sum") - metric(before, name + "_sum")
                served[name] = round(1000 * total / max(count, 1), 2)
            result["ledger_in_server"] = {
                "charge_mean_ms": served["dprdm_ledger_charge_seconds"],
                "budget_figures_mean_ms": served["dprdm_budget_figures_seconds"],
                "dp_minus_public_p50_ms": round(modes["dp"]["p50_ms"]
                                                - modes["public-only"]["p50_ms"], 1)}
            result["queries_spent"] = SqliteLedger(index).summary().queries
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    result["ledger_alone"] = ledger_alone(params, 100)
    result["machine"]["load_average_1m_after"] = os.getloadavg()[0]

    table = Table(title=f"dprdm serve: {args.workers} worker(s), {args.concurrency} clients, "
                        f"steps={args.steps}, n={args.n} (startup {result['startup_s']} s)")
    for column in ("mode", "requests", "ok", "requests/s", "p50 ms", "p95 ms"):
        table.add_column(column, justify="right" if column != "mode" else "left")
    for mode, row in result["modes"].items():
        table.add_row(mode, str(row["requests"]), str(row["ok"]), f"{row['requests_per_s']:.2f}",
                      f"{row['p50_ms']:.0f}", f"{row['p95_ms']:.0f}")
    console.print(table)
    ledger = Table(title="ledger cost per DP request", show_header=False)
    ledger.add_column(style="bold cyan")
    ledger.add_column(justify="right")
    served, alone = result["ledger_in_server"], result["ledger_alone"]
    ledger.add_row("charge() in the server, mean", f"{served['charge_mean_ms']:.1f} ms")
    ledger.add_row("budget figures of a response, mean",
                   f"{served['budget_figures_mean_ms']:.1f} ms")
    ledger.add_row("DP minus public-only, p50", f"{served['dp_minus_public_p50_ms']:.0f} ms")
    ledger.add_row("charge() alone, p50 / p95", f"{alone['charge_p50_ms']:.1f} / "
                                                f"{alone['charge_p95_ms']:.1f} ms")
    ledger.add_row("accountant (PLD + RDP) for a new ledger state",
                   f"{alone['accountant_new_state_ms']:.0f} ms")
    console.print(ledger)
    console.print(f"load average (1 min) before/after: {result['machine']['load_average_1m']:.2f}"
                  f" / {result['machine']['load_average_1m_after']:.2f}")
    write_results(args.out, result, console)


if __name__ == "__main__":
    main()
