"""How close a DP release is to the aggregate it noises, raw and pooled (docs/privacy.md,
"Pooling a call's releases").

For each demo domain's held-out prompts (Fluent High Contrast and EmojiOne: validation; OpenMoji:
a report), the k-neighbour aggregates of the private index are computed as the mechanism computes
them (a Poisson(q) subsample, the k nearest kept records of the prompt's text embedding,
(1/k) * sum, zero-filled), then noised with N(0, sigma^2 I) at the demo's sigma for epsilon 10
and for epsilon 1 over 1,000 queries. Rows: the cosine of the release to its own aggregate, raw
and pooled in batches of P prompts (`dprdm.conditioning.pool_releases`, the batches `eval` (32)
and `synthesize` (8) use), the share b pooling keeps, and how alike the aggregates are (their
cosine to the domain's mean aggregate). The last columns shrink towards a stored style estimate
instead (`dprdm.conditioning.shrink_towards`): the mean of the releases of the demo operator's 64
prompts (public captions, `dprdm.demo.style_estimate_prompts`), each prompt released alone
(P = 1, a service request) and in batches of 32. The noise here is numpy's, seeded: this
measures the estimator on the mechanism's statistics, not the ledgered mechanism (whose noise comes from the
OS). Reading the aggregates reads the private index without privacy: a tool for the demo's
public stand-ins only.

    python bench/release_pooling.py --out bench/results/release-pooling.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from dprdm.conditioning import pool_releases, shrink_towards
from dprdm.demo import DEMO_K, DEMO_Q, DEMO_QUERIES, DELTA, style_estimate_prompts
from dprdm.demo_layout import validation_holdout_dir, validation_private_index_dir
from dprdm.encoders import load_encoder
from dprdm.privacy import accounting
from dprdm.retrieval import EmbeddingIndex
from results_file import write_results  # bench/results_file.py

console = Console()
BATCHES = (8, 32)
EPSILONS = (10.0, 1.0)


def domains(root: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (held-out folder with captions.jsonl, private index folder)."""
    return {"Fluent HC (validation)": (validation_holdout_dir(root, "fluent_hc"),
                                       validation_private_index_dir(root, "fluent_hc")),
            "EmojiOne (validation)": (validation_holdout_dir(root, "emojione"),
                                      validation_private_index_dir(root, "emojione")),
            "OpenMoji (report)": (root / "holdout", root / "private")}


def aggregates(private: np.ndarray, text: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mechanism's pre-noise aggregate for each query (its statistics; numpy's coins)."""
    out = np.zeros((len(text), private.shape[1]))
    for i, query in enumerate(text):
        kept = np.flatnonzero(rng.random(len(private)) < DEMO_Q)
        nearest = kept[np.argsort(-(private[kept] @ query), kind="stable")[:DEMO_K]]
        out[i] = private[nearest].sum(axis=0) / DEMO_K
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1)
                         / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(".dprdm-demo"))
    parser.add_argument("--encoder", default="demo")
    parser.add_argument("--trials", type=int, default=20, help="noise draws per domain")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    encoder = load_encoder(args.encoder)
    rng = np.random.default_rng(0)
    os.environ["DPRDM_DEMO_ROOT"] = str(args.data)
    operator = encoder.encode_text(style_estimate_prompts()).astype(np.float64)
    rows = []
    for name, (holdout, private_dir) in domains(args.data).items():
        captions = [json.loads(line)["caption"] for line in
                    (holdout / "captions.jsonl").read_text(encoding="utf-8").splitlines() if line]
        text = encoder.encode_text(captions).astype(np.float64)
        index = EmbeddingIndex.open(private_dir)
        private = index.rows_float32(np.arange(index.n)).astype(np.float64)
        true = aggregates(private, text, rng)
        operator_true = aggregates(private, operator, rng)
        alike = cosine(true, np.repeat(true.mean(axis=0, keepdims=True), len(true), axis=0))
        for epsilon in EPSILONS:
            sigma = accounting.calibrate_sigma(epsilon, DEMO_Q, DEMO_K, DEMO_QUERIES, DELTA)
            row = {"domain": name, "prompts": len(captions), "epsilon": epsilon,
                   "sigma": sigma, "aggregate_norm": float(np.linalg.norm(true, axis=1).mean()),
                   "aggregates_cosine_to_their_mean": alike, "raw": 0.0}
            for batch in BATCHES:
                row[f"pooled_{batch}"] = row[f"kept_{batch}"] = 0.0
            row["estimate_1"] = row["estimate_32"] = 0.0
            for _ in range(args.trials):
                released = true + rng.normal(0.0, sigma, true.shape)
                row["raw"] += cosine(released, true) / args.trials
                estimate = (operator_true + rng.normal(0.0, sigma, operator_true.shape)).mean(0)
                for batch in (1, 32):
                    shrunk = np.concatenate([shrink_towards(released[i:i + batch], estimate,
                                                            sigma)[0]
                                             for i in range(0, len(released), batch)])
                    row[f"estimate_{batch}"] += cosine(shrunk, true) / args.trials
                for batch in BATCHES:
                    parts = [pool_releases(released[i:i + batch], sigma)
                             for i in range(0, len(released), batch)]
                    pooled = np.concatenate([part for part, _ in parts])
                    row[f"pooled_{batch}"] += cosine(pooled, true) / args.trials
                    row[f"kept_{batch}"] += float(np.mean([b for _, b in parts])) / args.trials
            rows.append(row)
            console.print(f"{name}, epsilon {epsilon:g}: raw {row['raw']:.3f}, pooled "
                          + ", ".join(f"{row[f'pooled_{b}']:.3f} (P={b})" for b in BATCHES)
                          + f", towards the estimate {row['estimate_1']:.3f} (P=1)")
    table = Table(title=f"cosine of the release to its aggregate (k {DEMO_K}, q {DEMO_Q}, "
                        f"T {DEMO_QUERIES:,}; {args.trials} noise draws)")
    for column in ("domain", "eps", "sigma", "|agg|", "agg ~ mean", "raw",
                   *(f"pooled P={b} (b)" for b in BATCHES), "estimate P=1", "estimate P=32"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["domain"], f"{row['epsilon']:g}", f"{row['sigma']:.4f}",
                      f"{row['aggregate_norm']:.3f}",
                      f"{row['aggregates_cosine_to_their_mean']:.3f}", f"{row['raw']:.3f}",
                      *(f"{row[f'pooled_{b}']:.3f} ({row[f'kept_{b}']:.2f})" for b in BATCHES),
                      f"{row['estimate_1']:.3f}", f"{row['estimate_32']:.3f}")
    console.print(table)
    write_results(args.out, {"encoder": args.encoder, "k": DEMO_K, "q": DEMO_Q,
                             "queries": DEMO_QUERIES, "trials": args.trials,
                             "operator_prompts": len(operator), "rows": rows},
                  console)


if __name__ == "__main__":
    main()
