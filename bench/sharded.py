"""Sharded retrieval vs the single node, side by side in one process.

Layouts (every one releases the same distribution; sigma, q, k as the issue: k=10, q=0.01):
* single     -- PrivateRetrieval on the unsharded index (the default path);
* local-S    -- ShardedPrivateRetrieval with the S shards in this process (what single-node
                commands do on a sharded index): the cost of the split and the merge alone;
* ray-S      -- ShardedPrivateRetrieval over S Ray actors (an in-process Ray with --ray-cpus).
Strategies: subsample (draw the subsample in O(qN), score it) and probed (= --strategy
ivf-subsample: the same inside the lists a PUBLIC quantizer probes).
For batches of 1 and 64 queries: per-call latency (median, p95), per query, and queries/s.
Also measured: the Ray round trip of an empty actor call (``describe``), the fixed cost every
sharded release pays on top of the slowest shard.

    python bench/sharded.py --n 1000000 --out bench/results/sharded-1e6.json
    python bench/sharded.py --quick                                      # N = 1e5, seconds

Random unit vectors stand in for embeddings (timing does not depend on their content); the
public quantizer is trained on separate random vectors. The index is float16 (d = 256 by
default), as the issue's 1e7 x 256 float16 layout.
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

from dprdm.privacy import InMemoryLedger, MechanismParams, PrivateRetrieval
from dprdm.privacy.sharded import LocalShards, ShardedPrivateRetrieval
from dprdm.retrieval import IVFPartition, build_index, train_public_quantizer
from dprdm.retrieval.shards import shard_index
from results_file import write_results  # bench/results_file.py

console = Console()
SIGMA = 0.05


def make_index(root: Path, n: int, dim: int, nlist: int) -> Path:
    """A float16 index of n random unit rows with a public quantizer and its saved partition."""
    rng = np.random.default_rng(0)
    raw = np.lib.format.open_memmap(root / "raw.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, 1 << 18):
        stop = min(n, start + (1 << 18))
        raw[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    raw.flush()
    index = build_index(np.load(root / "raw.npy", mmap_mode="r"), root / "idx", dtype="float16")
    os.unlink(root / "raw.npy")
    quantizer = train_public_quantizer(rng.standard_normal((max(40 * nlist, 10_000), dim)),
                                       nlist, None)
    quantizer.save(index.path)
    IVFPartition(index, quantizer).save()
    return index.path


def time_calls(mechanism, queries: np.ndarray, batch: int, seconds: float) -> dict:
    """Release batches of `batch` queries for about `seconds` (at least 3 calls)."""
    mechanism.release(queries[:batch])  # warm: ledger capacity, page cache, actor start
    latencies = []
    start = time.perf_counter()
    i = 0
    while len(latencies) < 3 or time.perf_counter() - start < seconds:
        chunk = queries[(i * batch) % (len(queries) - batch + 1):][:batch]
        t = time.perf_counter()
        mechanism.release(chunk)
        latencies.append(time.perf_counter() - t)
        i += 1
    total = sum(latencies)
    latencies_ms = np.array(latencies) * 1e3
    return {
        "calls": len(latencies),
        "median_ms": float(np.median(latencies_ms)),
        "p95_ms": float(np.percentile(latencies_ms, 95)),
        "per_query_ms": float(np.median(latencies_ms) / batch),
        "queries_per_s": batch * len(latencies) / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--q", type=float, default=0.01)
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per cell")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--quick", action="store_true", help="N = 1e5, nlist 256, 1.5 s a cell")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.n, args.nlist, args.seconds = 100_000, 256, 1.5

    params = MechanismParams(SIGMA, args.q, args.k)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((256, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    result = {"n": args.n, "dim": args.dim, "dtype": "float16", "k": args.k, "q": args.q,
              "sigma": SIGMA, "nlist": args.nlist, "nprobe": args.nprobe,
              "cpus": os.cpu_count(), "ray_cpus": args.ray_cpus, "rows": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        index_path = make_index(root, args.n, args.dim, args.nlist)
        result["build_s"] = time.perf_counter() - t
        splits = {}
        for s in args.shards:
            t = time.perf_counter()
            splits[s] = shard_index(index_path, root / f"sharded-{s}", s)
            result[f"shard_{s}_s"] = time.perf_counter() - t
        from dprdm.retrieval import EmbeddingIndex

        index = EmbeddingIndex.open(index_path)
        partition = IVFPartition.open(index, nprobe=args.nprobe)
        layouts = [("single", None)] + [(f"local-{s}", ("local", s)) for s in args.shards]
        if not args.no_ray:
            from dprdm.privacy import sharded_ray

            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            sharded_ray.init_ray("local", num_cpus=args.ray_cpus)
            layouts += [(f"ray-{s}", ("ray", s)) for s in args.shards]
        backends = {}
        for name, how in layouts:
            if how is None:
                continue
            kind, s = how
            if kind == "local":
                backends[name] = LocalShards(splits[s])
            else:
                backends[name] = sharded_ray.RayShards.start(splits[s], timeout_s=600)
                shards = backends[name]
                round_trips = []
                for _ in range(50):
                    t = time.perf_counter()
                    sharded_ray.ray.get([a.describe.remote() for a in shards.actors])
                    round_trips.append((time.perf_counter() - t) * 1e3)
                result[f"{name}_round_trip_ms"] = statistics.median(round_trips)

        table = Table(title=f"sharded retrieval, N={args.n:,} x {args.dim} float16, k={args.k}, "
                            f"q={args.q}, nprobe={args.nprobe}/{args.nlist}, "
                            f"{os.cpu_count()} CPUs")
        for column in ("layout", "strategy", "batch", "median ms", "p95 ms", "ms/query",
                       "queries/s"):
            table.add_column(column, justify="right")
        for strategy in ("subsample", "probed"):
            for name, how in layouts:
                ledger = InMemoryLedger(epsilon=1e6, delta=1e-9)
                if how is None:
                    mechanism = PrivateRetrieval(
                        index, params, ledger, strategy=strategy,
                        searcher=partition if strategy == "probed" else None)
                else:
                    mechanism = ShardedPrivateRetrieval(backends[name], params, ledger,
                                                        strategy=strategy, nprobe=args.nprobe)
                for batch in args.batches:
                    row = {"layout": name, "strategy": strategy, "batch": batch,
                           **time_calls(mechanism, queries, batch, args.seconds)}
                    result["rows"].append(row)
                    table.add_row(name, strategy, str(batch), f"{row['median_ms']:.1f}",
                                  f"{row['p95_ms']:.1f}", f"{row['per_query_ms']:.2f}",
                                  f"{row['queries_per_s']:.0f}")
                    console.print(row)
        console.print(table)
        for key, value in result.items():
            if key.endswith("_round_trip_ms") or key.endswith("_s"):
                console.print(f"{key}: {value:.2f}")
    write_results(args.out, result, console)


if __name__ == "__main__":
    main()
