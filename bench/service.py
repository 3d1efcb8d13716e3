"""Throughput and latency of `dprdm serve` on this machine, public-only vs DP; the ledger's cost.

    python bench/service.py --out bench/results/service.json
    python bench/service.py --requests 80 --concurrency 8 --workers 2 --steps 25
    python bench/service.py --table-before-after --requests 16 --steps 10

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

The ledger starts at ``--start`` queries (default 100) already charged. With
``--table-before-after`` the whole server bench runs twice in this process, side by side, on
two fresh indexes with the same settings: "before" = a server whose ledger has NO epsilon table
(the bench-only switch ``bench/no_epsilon_table/sitecustomize.py``: every figure a fresh PLD + RDP
for the exact count), "after" = the shipped server, its epsilon table filled before the load (what
``serve`` does in a background thread at start; filled here first so that the background fill does
not compete with the load for the CPU).

    python bench/service.py --figures-only --states 60 --out bench/results/service-figures.json

measures only the budget figures of a response, before/after the epsilon table, side by side in
one process on one scratch ledger: for each of --states consecutive ledger states (one charge
each, from --start queries), the old figure (a fresh PLD + RDP for the new state, what every DP
response paid) and the new one (``ledger.summary()``: the epsilon table, the count rounded up to
its grid point, each point computed once per mechanism and budget and cached in the ledger).
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


NO_TABLE_DIR = Path(__file__).resolve().parent / "no_epsilon_table"


def start_server(index: Path, flags: list[str], log: Path, port: int | None = None,
                 epsilon_table: bool = True) -> tuple[subprocess.Popen, str]:
    """`python -m dprdm serve --index INDEX FLAGS` in its own process group; (process, url).
    `epsilon_table` False: the bench-only "before" server (see NO_TABLE_DIR)."""
    port = port or free_port()
    command = [sys.executable, "-m", "dprdm", "serve", "--index", str(index),
               "--port", str(port), "--json", *flags]
    env = dict(os.environ)
    if not epsilon_table:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NO_TABLE_DIR),
                                                          env.get("PYTHONPATH")]))
        env["DPRDM_BENCH_NO_EPSILON_TABLE"] = "1"
    with open(log, "ab") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=env)
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


def figures_before_after(params: MechanismParams, start: int, states: int,
                         warm: bool = False) -> dict:
    """Budget figures per new ledger state: a fresh PLD (before) vs the epsilon table (after)."""
    from dprdm.privacy.ledger import EPSILON_GRID_RATIO

    with tempfile.TemporaryDirectory() as tmp:
        ledger = SqliteLedger.create(tmp, epsilon=EPSILON, delta=DELTA, mechanism=params)
        ledger.charge(params, start)
        if warm:
            ledger.warm_epsilon_table()
        before_s, after_s, over = [], [], []
        for i in range(states):
            ledger.charge(params, 1)
            tic = time.perf_counter()
            table = ledger.summary()
            after_s.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            groups = [(params, table.queries)]
            exact = accounting.epsilon(groups, DELTA)
            accounting.epsilon_rdp(groups, DELTA)
            before_s.append(time.perf_counter() - tic)
            assert table.epsilon_spent >= exact and table.queries == start + i + 1
            over.append(table.epsilon_spent / exact - 1.0)
    before, after = float(np.mean(before_s)), float(np.mean(after_s))
    return {"start": start, "states": states, "grid_ratio": EPSILON_GRID_RATIO, "warmed": warm,
            "before_mean_ms": round(1000 * before, 2), "after_mean_ms": round(1000 * after, 3),
            "after_p50_ms": round(1000 * float(np.median(after_s)), 3),
            "speedup": round(before / after, 1),
            "overstatement_max_pct": round(100 * max(over), 2)}


def serve_run(args, params: MechanismParams, epsilon_table: bool = True) -> dict:
    """Start a server on a fresh index, load it per mode, read the ledger's cost from /metrics.
    `epsilon_table` False: the "before" server (bench-only switch, see NO_TABLE_DIR); True: the
    shipped one, its table filled before the load (as ``serve`` fills it at start)."""
    result: dict = {"epsilon_table": epsilon_table}
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "private"
        rng = np.random.default_rng(0)
        build_index(rng.standard_normal((args.records, 64)).astype(np.float32), index)
        init_budget(index, EPSILON, DELTA, params, LAM)
        token, _ = KeyStore(index).create("bench")
        if args.start:  # a ledger that has already served --start queries (a fresh PLD per new
            SqliteLedger(index).charge(params, args.start, caller="bench")  # state costs more)
        if epsilon_table:  # what serve's background thread does at start, done before the load
            tic = time.perf_counter()
            result["table_points"] = SqliteLedger(index).warm_epsilon_table()
            result["table_fill_s"] = round(time.perf_counter() - tic, 1)
        console.print(f"starting the server ({args.workers} worker(s)) ...")
        tic = time.perf_counter()
        flags = ["--k", str(K), "--q", str(Q), "--sigma", repr(params.sigma), "--lam", str(LAM),
                 "--workers", str(args.workers), "--allow-public-only"]
        process, url = start_server(index, flags, Path(tmp) / "server.log",
                                    epsilon_table=epsilon_table)
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
    return result


def print_before_after(result: dict, args) -> None:
    table = Table(title=f"dprdm serve before/after the epsilon table: {args.workers} worker(s), "
                        f"{args.concurrency} clients, {args.requests} requests per mode, "
                        f"steps={args.steps}, n={args.n}")
    # The PLD of the "before" server is paid inside the generation call (the report's figures),
    # so its /v1/budget-figures metric sees cached values: DP minus public-only p50 is the cost.
    for column in ("server", "mode", "requests/s", "p50 ms", "p95 ms", "ok",
                   "DP - public p50 ms", "charge ms"):
        table.add_column(column, justify="left" if column in ("server", "mode") else "right")
    for key, name in (("before_no_table", "before: no table"), ("after_table", "after: table")):
        run = result[key]
        for mode, row in run["modes"].items():
            served = run["ledger_in_server"]
            table.add_row(name, mode, f"{row['requests_per_s']:.2f}", f"{row['p50_ms']:.0f}",
                          f"{row['p95_ms']:.0f}", f"{row['ok']}/{row['requests']}",
                          f"{served['dp_minus_public_p50_ms']:.0f}" if mode == "dp" else "",
                          f"{served['charge_mean_ms']:.1f}" if mode == "dp" else "")
    console.print(table)
    after = result["after_table"]
    console.print(f"table filled before the load: {after['table_points']} points in "
                  f"{after['table_fill_s']} s; load average (1 min) before/after: "
                  f"{result['machine']['load_average_1m']:.2f} / "
                  f"{result['machine']['load_average_1m_after']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="per mode")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("-n", type=int, default=1, help="images per request")
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--figures-only", action="store_true",
                        help="only the budget figures, before/after the epsilon table")
    parser.add_argument("--start", type=int, default=100,
                        help="queries charged before the load (the server bench's ledger state; "
                             "--figures-only: the first state)")
    parser.add_argument("--states", type=int, default=60)
    parser.add_argument("--table-before-after", action="store_true",
                        help="the server bench twice, side by side: without the epsilon table "
                             "(bench-only switch) and with it")
    parser.add_argument("--warm", action="store_true",
                        help="fill the epsilon table first (as the service does at start)")
    args = parser.parse_args()

    sigma = accounting.calibrate_sigma(EPSILON, Q, K, QUERIES, DELTA)
    params = MechanismParams(sigma, Q, K)
    if args.figures_only:
        figures = figures_before_after(params, args.start, args.states, args.warm)
        table = Table(title=f"budget figures per new ledger state ({args.states} states from "
                            f"{args.start} queries; k={K}, q={Q}, 1,000 queries in eps {EPSILON})")
        for column in ("before: PLD+RDP ms", "after: table ms (mean / p50)", "ratio",
                       "max over-statement"):
            table.add_column(column, justify="right")
        table.add_row(f"{figures['before_mean_ms']:.1f}",
                      f"{figures['after_mean_ms']:.2f} / {figures['after_p50_ms']:.2f}",
                      f"{figures['speedup']:.0f}x", f"{figures['overstatement_max_pct']:.2f} %")
        console.print(table)
        write_results(args.out, {"figures": figures, "settings": {"k": K, "q": Q,
                                                                  "sigma": sigma}}, console)
        return
    result = {"machine": {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
              "settings": {"records": args.records, "k": K, "q": Q, "sigma": sigma, "lam": LAM,
                           "epsilon": EPSILON, "delta": DELTA, "steps": args.steps, "n": args.n,
                           "workers": args.workers, "concurrency": args.concurrency,
                           "requests_per_mode": args.requests, "queries_before_load": args.start}}
    if args.table_before_after:
        result["before_no_table"] = serve_run(args, params, epsilon_table=False)
        result["after_table"] = serve_run(args, params, epsilon_table=True)
        result["machine"]["load_average_1m_after"] = os.getloadavg()[0]
        print_before_after(result, args)
        write_results(args.out, result, console)
        return
    result.update(serve_run(args, params))
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
