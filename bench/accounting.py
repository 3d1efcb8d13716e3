"""Time of the accountant's inverses and of one epsilon, old vs new, on a grid of (z, q).

For each noise multiplier z = sigma * k / 2 and sampling rate q (at one epsilon, delta, k):
* max_queries(params, epsilon, delta)          -> T_max   (also the ledger's first charge and the
                                                            service's start: _BudgetPolicy.capacity)
* calibrate_sigma(epsilon, q, k, T, delta)     -> sigma   (T = T_max clamped to [1, 1e12]: the
                                                            answer is then about the cell's z)
* calibrate_q(epsilon, sigma, k, T, delta)     -> q
* epsilon_for + epsilon_rdp (params, T, delta) -> what `dprdm privacy epsilon` computes
each with every cache cleared first (a cold process), new = dprdm.privacy.accounting, baseline =
bench/accounting_before_pld_fast.py, the module before pld_fast.py (commit b95ea24, verbatim: the
same searches, dp_accounting's own PLD code), side by side in one process. (The module before
issue 13 item 6 was the baseline until then; its figures are in docs/privacy.md, and
`git show fa3e404:src/dprdm/privacy/accounting.py` is the code.) A baseline call that runs past --baseline-limit seconds is stopped
and shown as ">N". The new answers are checked on the spot against epsilon_for itself:
max_queries T fits and T + 1 does not ("ok"); the calibrated sigma fits and sigma * (1 - 1e-4)
does not, the calibrated q fits and q * (1 + 1e-4) does not (or q = 1) ("cal ok"); "= base": the
answers that have exactly one right value, T_max (the boundary) and the epsilons (epsilon and
epsilon_rdp), == the baseline's (must be "yes" everywhere: pld_fast changes no bit). The
calibrations are not compared: any point that passes "cal ok" is right, and since the rescaled
proxy (_settle's re-aim) the searches may end on another such point than the baseline's.

    python bench/accounting.py --corner --baseline-limit 60   # the slowest corner only
    python bench/accounting.py --quick --out bench/results/accounting-quick.json
    python bench/accounting.py --out bench/results/accounting.json      # full grid + corners

Times exclude the CLI's start (python + imports), measured once and printed at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.table import Table

import accounting_before_pld_fast as before_pld_fast  # bench/accounting_before_pld_fast.py
from dprdm.errors import InvalidParameterError
from dprdm.privacy import accounting as new
from dprdm.privacy import pld_fast
from results_file import write_results  # bench/results_file.py

console = Console()

FULL_ZS = (0.3, 1.0, 10.0, 100.0, 1000.0)
FULL_QS = (1e-6, 1e-3, 0.1, 1.0)
QUICK_ZS = (0.3, 10.0, 1000.0)
QUICK_QS = (1e-6, 0.1, 1.0)
# Corners of the supported region: (epsilon, delta, k) at the extreme (z, q).
CORNER_SETTINGS = ((0.1, 1e-10, 1), (100.0, 1e-3, 100), (0.1, 1e-3, 100), (100.0, 1e-10, 1))
CORNER_ZS = (0.3, 1000.0)
CORNER_QS = (1e-6, 1.0)
SLOW_CORNER = (0.3, 1e-6, 0.1, 1e-3, 100)  # the slowest cell of the full run


class Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Timeout


def clear_caches(module: ModuleType) -> None:
    for value in vars(module).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()
    if module is new:  # pld_fast's memoised tail bounds and FFTs (not its numpy check)
        pld_fast._spectra.clear()
        pld_fast._log_mgfs.clear()


def timed(module: ModuleType, call: Callable[[], Any],
          limit: float | None) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process) of a cold call; result is "timeout" or
    "refused: ..." when it fails. On a shared, loaded machine the CPU time is the steadier
    figure (it is what an idle core would take, near enough)."""
    clear_caches(module)
    if limit:
        signal.setitimer(signal.ITIMER_REAL, limit)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        result = call()
    except Timeout:
        result = "timeout"
    except InvalidParameterError as error:
        result = f"refused: {error}"
    except ValueError as error:  # the baseline's brentq can fail to bracket
        result = f"refused: {type(error).__name__}: {error}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return result, time.perf_counter() - start, time.process_time() - cpu


def run_cell(z: float, q: float, epsilon: float, delta: float, k: int,
             baseline: ModuleType | None, limit: float | None) -> dict:
    sigma = 2.0 * z / k
    row: dict[str, Any] = {"z": z, "q": q, "epsilon": epsilon, "delta": delta, "k": k,
                           "sigma": sigma}
    for name, module, lim in (("new", new, None), ("baseline", baseline, limit)):
        if module is None:
            continue
        params = module.MechanismParams(sigma, q, k)
        t_max, seconds, cpu = timed(module, lambda: module.max_queries(params, epsilon, delta),
                                    lim)
        row[f"max_queries_{name}"], row[f"max_queries_s_{name}"] = t_max, seconds
        row[f"max_queries_cpu_{name}"] = cpu
        if name == "new":
            queries = min(max(int(t_max), 1), new.MAX_QUERIES_SEARCHED)
            row["queries"] = queries
            if 0 < t_max < new.MAX_QUERIES_SEARCHED:  # the exact boundary, on the ledger's figure
                row["boundary_ok"] = (new.epsilon_for(params, t_max, delta) <= epsilon
                                      < new.epsilon_for(params, t_max + 1, delta))
        queries = row["queries"]
        for label, call in (
            ("calibrate_sigma", lambda: module.calibrate_sigma(epsilon, q, k, queries, delta)),
            ("calibrate_q", lambda: module.calibrate_q(epsilon, sigma, k, queries, delta)),
            ("epsilon", lambda: (module.epsilon_for(params, queries, delta),
                                 module.epsilon_rdp([(params, queries)], delta)[0])),
        ):
            result, seconds, cpu = timed(module, call, lim)
            row[f"{label}_{name}"], row[f"{label}_s_{name}"] = result, seconds
            row[f"{label}_cpu_{name}"] = cpu
        if name == "new":
            row["calibration_ok"] = calibration_ok(row, queries)
    if baseline is not None:  # identical answers (bit for bit against before-pld-fast)?
        answers = ("max_queries", "epsilon")  # (the calibrations: "cal ok", see the docstring)
        if any(row[f"{label}_baseline"] == "timeout" for label in answers):
            row["same_as_baseline"] = None
        else:
            row["same_as_baseline"] = all(row[f"{label}_new"] == row[f"{label}_baseline"]
                                          for label in answers)
    return row


def calibration_ok(row: dict, queries: int) -> bool | None:
    """The new calibrations against epsilon_for itself: the answer fits, one tolerance step
    towards less privacy does not (None where a calibration was refused)."""
    tol = new.CALIBRATION_REL_TOL
    eps, delta, q, k, sigma = row["epsilon"], row["delta"], row["q"], row["k"], row["sigma"]

    def cost(s: float, qq: float) -> float:
        return new.epsilon_for(new.MechanismParams(s, qq, k), queries, delta)

    s_new, q_new = row["calibrate_sigma_new"], row["calibrate_q_new"]
    if isinstance(s_new, str) or isinstance(q_new, str):
        return None
    z_low = new.NOISE_MULTIPLIER_RANGE[0] * 2.0 / k
    sigma_ok = cost(s_new, q) <= eps and (s_new <= z_low * (1 + tol)
                                          or cost(s_new * (1 - tol), q) > eps)
    q_ok = cost(sigma, q_new) <= eps and (q_new == 1.0 or cost(sigma, q_new * (1 + tol)) > eps)
    return sigma_ok and q_ok


def cli_start_seconds() -> float:
    """Wall time of `dprdm privacy --help`: python start + imports (the floor of any command)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from dprdm.cli import app; app()", "privacy", "--help"],
                   check=True,
                   capture_output=True)
    return time.perf_counter() - start


def fmt(row: dict, label: str, name: str, limit: float | None) -> str:
    result = row.get(f"{label}_{name}")
    if result is None:
        return "-"
    if result == "timeout":
        return f">{limit:g}"
    if isinstance(result, str):
        return "refused"
    return f"{row[f'{label}_s_{name}']:.1f} ({row[f'{label}_cpu_{name}']:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 x 3 grid, no corners")
    parser.add_argument("--corner", action="store_true",
                        help=f"only the slowest corner, z, q, epsilon, delta, k = {SLOW_CORNER}")
    parser.add_argument("--out", type=Path, default=Path("bench/results/accounting.json"))
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--baseline-limit", type=float, default=30.0,
                        help="seconds before a baseline call is stopped")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    baseline = None if args.no_baseline else before_pld_fast
    limit = args.baseline_limit
    signal.signal(signal.SIGALRM, _alarm)

    cells = [(z, q, args.epsilon, args.delta, args.k)
             for z in (QUICK_ZS if args.quick else FULL_ZS)
             for q in (QUICK_QS if args.quick else FULL_QS)]
    if args.corner:
        cells = [SLOW_CORNER]
    elif not args.quick:
        cells += [(z, q, eps, delta, k) for eps, delta, k in CORNER_SETTINGS
                  for z in CORNER_ZS for q in CORNER_QS]
    rows = []
    for cell in cells:
        rows.append(run_cell(*cell, baseline=baseline, limit=limit))
        console.print(f"z={cell[0]:g} q={cell[1]:g} eps={cell[2]:g} delta={cell[3]:g} "
                      f"k={cell[4]}: T_max={rows[-1]['max_queries_new']}")
        write_results(args.out, {"rows": rows}, console)  # long runs keep their rows

    name = "none" if baseline is None else "before-pld-fast"
    table = Table(title=f"accountant, seconds per cold call, wall (CPU): {name} -> new")
    for column in ("z", "q", "eps", "delta", "k", "T_max", "ok", "cal ok", "= base", "max_queries",
                   "calibrate_sigma", "calibrate_q", "epsilon"):
        table.add_column(column, justify="right")
    for row in rows:
        cells_out = [f"{row['z']:g}", f"{row['q']:g}", f"{row['epsilon']:g}",
                     f"{row['delta']:g}", str(row["k"]), str(row["max_queries_new"]),
                     {True: "yes", False: "NO"}.get(row.get("boundary_ok"), "-"),
                     {True: "yes", False: "NO"}.get(row.get("calibration_ok"), "-"),
                     {True: "yes", False: "no"}.get(row.get("same_as_baseline"), "-")]
        for label in ("max_queries", "calibrate_sigma", "calibrate_q", "epsilon"):
            cells_out.append(f"{fmt(row, label, 'baseline', limit)} -> {fmt(row, label, 'new', limit)}")
        table.add_row(*cells_out)
    console.print(table)
    labels = ("max_queries", "calibrate_sigma", "calibrate_q", "epsilon")
    worst = max(row[f"{label}_s_new"] for row in rows for label in labels)
    worst_cpu = max(row[f"{label}_cpu_new"] for row in rows for label in labels)
    start = cli_start_seconds()
    load = os.getloadavg()[0]
    console.print(f"slowest new call: {worst:.2f} s wall, {worst_cpu:.2f} s CPU; CLI start "
                  f"(python + imports): {start:.2f} s; load average {load:.1f} on "
                  f"{os.cpu_count()} cores")
    write_results(args.out, {"rows": rows, "slowest_new_s": worst, "slowest_new_cpu_s": worst_cpu,
                             "load_average_1min": load, "cpus": os.cpu_count(),
                             "cli_start_s": start,
                             "baseline": name, "baseline_limit_s": limit}, console)


if __name__ == "__main__":
    main()
