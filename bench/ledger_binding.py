"""What the index <-> ledger binding costs: opening, charging, hashing.

    python bench/ledger_binding.py --rows 1000000 --dim 64 --out bench/results/ledger_binding.json

Side by side in one process, on a synthetic index of ``--rows`` x ``--dim`` float32 rows:

* open: ``EmbeddingIndex.open`` + ``SqliteLedger`` (unverified, the old way) vs
  ``open_private_index`` (manifest, ledger id, watermark, size, sampled blocks), and the same
  after the file's modification time changed (then the full SHA-256 is recomputed);
* charge: ``SqliteLedger.charge`` of one query, which since the binding also advances the release
  watermark (one more write lock, an atomic file write and two fsyncs), vs the commit alone
  (``_advance_watermark`` patched out: the old cost);
* ``budget init`` (full hash of the embeddings + the accountant's capacity) and ``index verify``.
Numbers on a shared machine move with its load; the table prints the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from dprdm.privacy import MechanismParams, SqliteLedger, init_budget, open_private_index
from dprdm.privacy.binding import verify_index
from dprdm.retrieval import EmbeddingIndex, build_index
from results_file import write_results  # bench/results_file.py

console = Console()
PARAMS = MechanismParams(2.0, 0.5, 5)


def timed(function, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        function()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--charges", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "index"
        vectors = np.random.default_rng(0).standard_normal((args.rows, args.dim), np.float32)
        build_index(vectors, index_dir)
        size_mb = os.path.getsize(index_dir / "embeddings.npy") / 1e6
        tic = time.perf_counter()
        init_budget(index_dir, 50.0, 1e-5, PARAMS)
        rows.append(("budget init (full hash + capacity)", None, time.perf_counter() - tic))
        tic = time.perf_counter()
        verify_index(index_dir)
        rows.append(("index verify (full hash)", None, time.perf_counter() - tic))

        def unverified() -> None:
            EmbeddingIndex.open(index_dir)
            SqliteLedger(index_dir)

        rows.append(("open", timed(unverified, 20), timed(lambda: open_private_index(index_dir),
                                                           20)))
        os.utime(index_dir / "embeddings.npy")  # a touched file: every open re-hashes it
        rows.append(("open after touch (full hash)", None,
                     timed(lambda: open_private_index(index_dir), 3)))
        verify_index(index_dir)  # re-records the mtime
        ledger = SqliteLedger(index_dir)
        ledger.charge(PARAMS)
        with_watermark = timed(lambda: ledger.charge(PARAMS), args.charges)
        ledger._advance_watermark = lambda: None  # the commit alone: the cost before binding
        commit_only = timed(lambda: ledger.charge(PARAMS), args.charges)
        rows.append(("charge one query", commit_only, with_watermark))
    table = Table(title=f"ledger binding, {args.rows:,} x {args.dim} float32 ({size_mb:.0f} MB), "
                        f"load {os.getloadavg()[0]:.1f}")
    for column in ("operation", "before (ms)", "with binding (ms)"):
        table.add_column(column, justify="right")
    for name, before, after in rows:
        table.add_row(name, *("-" if v is None else f"{1000 * v:.1f}" for v in (before, after)))
    console.print(table)
    write_results(args.out, {
        "rows": args.rows, "dim": args.dim, "embeddings_mb": round(size_mb, 1),
        "load_average_1m": os.getloadavg()[0],
        "results_ms": {name: {"before": None if b is None else round(1000 * b, 2),
                              "with_binding": None if a is None else round(1000 * a, 2)}
                       for name, b, a in rows}}, console)


if __name__ == "__main__":
    main()
