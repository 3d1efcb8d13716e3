"""`dprdm synthesize` vs `dprdm generate` in batches: end-to-end throughput and journal overhead.

    python bench/synthesize.py --out bench/results/synthesize.json              # small, minutes
    python bench/synthesize.py --prompts 1000 -n 4 --steps 25 --out ...         # the issue's size

Both sides run the demo encoder and generator in this process, through the CLI commands
themselves (typer's CliRunner), on a throwaway SYNTHETIC private index (random unit vectors of
the demo private index's size and dimension, its own fresh ledger in a temporary folder: the
demo's real ledger is never charged). Prompts are demo-like captions, all distinct, so both sides
charge one query per prompt.

* synthesize: one job, ``--batch-size`` prompts a batch (journal, resumable);
* generate: ``dprdm generate`` called once per ``--generate-batch`` prompts (what a user without
  synthesize scripts; every call loads the weights again, as a real call would).

Each side runs ``--rounds`` times in alternating order (the machine's load moves); the fastest
run of each is reported, all walls are kept in the JSON. Reported: wall seconds, images/s and queries/s end to end; for synthesize its own breakdown
(release, accounting, journal, generation, writing) and the journal's share of the job's time
(the issue asks < 2 %), and the time outside the batches (weights, the plan's accounting, the
outputs). Numbers on a shared machine move with its load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from results_file import write_results  # bench/results_file.py

console = Console()
WORDS = ["red", "blue", "green", "yellow", "smiling", "sad", "small", "big", "flat", "round"]
THINGS = ["apple", "cat face", "car", "star", "tree", "moon", "house", "fish", "flag", "heart"]


def prompts(count: int) -> list[str]:
    return [f"{WORDS[i % 10]} {THINGS[(i // 10) % 10]} number {i}" for i in range(count)]


def make_index(root: Path, n: int, dim: int, queries: int):
    from dprdm.privacy import SqliteLedger, accounting
    from dprdm.rdm import MechanismSettings
    from dprdm.retrieval import build_index

    vectors = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    build_index(vectors, root)
    settings = MechanismSettings(sigma=0.5, q=0.1, k=40, lam=0.5)
    epsilon = 10.0
    while accounting.max_queries(settings.params, epsilon, 1e-5) < 2 * queries + 16:
        epsilon *= 2
    SqliteLedger.create(root, epsilon=epsilon, delta=1e-5)
    settings.save(root)
    return settings, epsilon


def invoke(runner, app, args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    if result.exit_code != 0:
        raise SystemExit(f"{args[0]} failed: {result.output[-2000:]}")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("-n", type=int, default=2, help="images per prompt")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--generate-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each side, in alternating order; the fastest is reported")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from dprdm.cli import app
    from dprdm.encoders import load_encoder
    from dprdm.retrieval import EmbeddingIndex

    demo_private = Path(".dprdm-demo/private")
    size = EmbeddingIndex.open(demo_private).n if demo_private.exists() else 1374
    runner = CliRunner()
    texts = prompts(args.prompts)
    with tempfile.TemporaryDirectory(prefix="dprdm-bench-synth-") as tmp:
        tmp = Path(tmp)
        settings, epsilon = make_index(tmp / "private", size, load_encoder("demo").dim,
                                       args.prompts * args.rounds)
        (tmp / "prompts.txt").write_text("\n".join(texts) + "\n")
        common = ["-n", str(args.n), "--steps", str(args.steps), "--seed", "0"]

        def run_synthesize(r: int) -> tuple[float, dict]:
            tic = time.perf_counter()
            job = invoke(runner, app, ["synthesize", "--prompts", str(tmp / "prompts.txt"),
                                       "--index", str(tmp / "private"),
                                       "--out", str(tmp / f"job{r}"),
                                       "--batch-size", str(args.batch_size), *common])
            return time.perf_counter() - tic, job["this_run"]

        def run_generate(r: int) -> tuple[float, int]:
            tic, charged = time.perf_counter(), 0
            for start in range(0, len(texts), args.generate_batch):
                report = invoke(runner, app, [
                    "generate", *texts[start:start + args.generate_batch], "--index",
                    str(tmp / "private"), "--out", str(tmp / f"generate{r}-{start}"), *common])
                charged += report["ledger"]["queries_by_call"]
            return time.perf_counter() - tic, charged

        synth_runs, generate_runs = [], []
        for r in range(args.rounds):  # alternating order: A B, B A, ... (the load moves)
            for side in ((0, 1) if r % 2 == 0 else (1, 0)):
                if side == 0:
                    synth_runs.append(run_synthesize(r))
                else:
                    generate_runs.append(run_generate(r))
        synth_wall, run = min(synth_runs, key=lambda x: x[0])
        generate_wall, charged = min(generate_runs, key=lambda x: x[0])

    images = args.prompts * args.n
    rows = [
        {"command": "synthesize", "wall_s": round(synth_wall, 2),
         "images_per_s": round(images / synth_wall, 3),
         "queries_per_s": round(run["queries_charged"] / synth_wall, 3),
         "job_s": run["seconds"], "outside_batches_s": round(synth_wall - run["seconds"], 2),
         "journal_s": run["timings_s"]["journal"],
         "journal_share_of_job": run["journal_share"], "breakdown_s": run["timings_s"],
         "queries": run["queries_charged"]},
        {"command": "generate (batches)", "wall_s": round(generate_wall, 2),
         "images_per_s": round(images / generate_wall, 3),
         "queries_per_s": round(charged / generate_wall, 3), "queries": charged},
    ]
    table = Table(title=f"{args.prompts} prompts x {args.n} images, {args.steps} steps "
                        f"(load average {os.getloadavg()[0]:.1f})")
    for column in ("command", "wall s", "images/s", "queries/s", "journal share"):
        table.add_column(column, justify="right")
    for row in rows:
        share = row.get("journal_share_of_job")
        table.add_row(row["command"], f"{row['wall_s']:.1f}", f"{row['images_per_s']:.3f}",
                      f"{row['queries_per_s']:.3f}", "-" if share is None else f"{share:.3%}")
    console.print(table)
    console.print(f"synthesize breakdown (s): {run['timings_s']}")
    result = {"prompts": args.prompts, "images_per_prompt": args.n, "steps": args.steps,
              "batch_size": args.batch_size, "generate_batch": args.generate_batch,
              "mechanism": {"sigma": settings.sigma, "q": settings.q, "k": settings.k},
              "ledger_epsilon": epsilon, "private_rows": size,
              "load_average": os.getloadavg()[0], "rows": rows, "rounds": args.rounds,
              "all_wall_s": {"synthesize": [round(w, 2) for w, _ in synth_runs],
                             "generate": [round(w, 2) for w, _ in generate_runs]},
              "journal_under_2_percent": run["journal_share"] < 0.02}
    write_results(args.out, result, console)


if __name__ == "__main__":
    main()
