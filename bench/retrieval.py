"""Per-query latency of the private step, side by side with the reference's way, in one process.

Methods (all release one noised aggregate per query, single-query calls):
* reference   -- a fresh Bernoulli mask over all N records (numpy), then search among the kept
                 rows (gather + matvec + top-k): the reference code's way, without a ledger;
* subsample   -- dprdm strategy (a): geometric gaps draw the subsample in O(qN), canonical top-k
                 among those rows, in-memory ledger charged;
* ranked-ivf  -- dprdm strategy (b): coins flipped lazily down a ranked candidate list from an IVF
                 index whose coarse quantizer was trained on separate PUBLIC vectors;
* probed-ivf  -- dprdm strategy (a) inside the same IVF candidate set (the lists the public
                 quantizer probes): the candidate set's subsample is drawn directly, O(q x
                 candidates), and only the kept rows are read and scored. Same nprobe as
                 ranked-ivf, so the two release the same distribution;
* ranked-flat -- strategy (b) over faiss IndexFlatIP (exact, O(N d) per query; N <= 1e6 only).

With --cli, each N also gets the command-line rows for the issue's setting (k=10, q=0.01, 100
queries in ONE call): the wall time of the real `python -m dprdm retrieve ... --strategy
ivf-subsample` subprocess with the partition saved by `index quantize` (memory-mapped), the same
with the saved partition deleted before every call (the old behaviour: every call re-assigns all
N records to lists), the interpreter's own start-up (`python -m dprdm --help`), and in this
process the open (IVFPartition.open) and the release of the same 100 queries.

    python bench/retrieval.py --ns 100000 --cli --out bench/results/retrieval-cli.json

    python bench/retrieval.py --quick --out bench/results/retrieval.json
    python bench/retrieval.py --out bench/results/retrieval-full.json   # N up to 5e6: ~40 min
    python bench/retrieval.py --ns 5000000 --out bench/results/retrieval-5e6.json

--noise-only times the release's noise alone (no retrieval), side by side in one process: the old
float path (float32(a + sigma * Box-Muller from os.urandom); not private, the floor), the grid
release with OpenDP's exact discrete Gaussian (the batch split over the noise thread pool: the
release before dprdm's own sampler), and with dprdm's exact sampler (privacy/discrete_gaussian.py)
on one thread and as released now, for one query and for a 100-query batch.
The full runs time whole releases (retrieval + noise) with the grid path.

    python bench/retrieval.py --noise-only --out bench/results/release-noise.json

Indexes above --float16-above records (default 2e6) are stored as float16, so that the memmap
(5 GB at 5e6 x 512) and faiss's float32 IVF copy (10 GB) both stay in RAM on a 24 GB machine:
with float32 the page cache thrashes and every method measures the disk instead.

Random unit vectors stand in for embeddings (timing does not depend on their content).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from dprdm.privacy import InMemoryLedger, MechanismParams, PrivateRetrieval
from dprdm.privacy.noise import (DiscreteGaussian, OpenDPDiscreteGaussian, noise_grid,
                                 release_on_grid)
from dprdm.privacy.randomness import SystemRandomness
from dprdm.retrieval import (EmbeddingIndex, FaissFlatSearcher, FaissIVFSearcher, IVFPartition,
                             build_index, train_public_quantizer)
from dprdm.retrieval.store import PARTITION_MANIFEST_FILE
from results_file import write_results  # bench/results_file.py

console = Console()
SIGMA = 0.05


def random_unit(n: int, d: int, rng: np.random.Generator, chunk: int = 250_000) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), d), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def reference_release(vectors: np.ndarray, query: np.ndarray, params: MechanismParams,
                      rng: np.random.Generator) -> np.ndarray:
    """The reference's way: Bernoulli mask over all N, search the kept rows, add noise."""
    kept = np.flatnonzero(rng.random(vectors.shape[0]) < params.q)
    aggregate = np.zeros(vectors.shape[1])
    if kept.size:
        scores = vectors[kept] @ query
        top = kept[np.argpartition(-scores, min(params.k, kept.size) - 1)[: params.k]]
        aggregate = vectors[top].sum(axis=0) / params.k
    return aggregate + rng.normal(0.0, params.sigma, size=aggregate.shape)


def time_calls(call, queries: np.ndarray) -> tuple[float, float]:
    call(queries[0])  # warm-up (caches, T_max of the ledger)
    times = []
    for query in queries:
        start = time.perf_counter()
        call(query)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 95))


# --------------------------------------------------------------------------------------------
# --cli: the real `dprdm retrieve` command, timed from outside
# --------------------------------------------------------------------------------------------

CLI_K, CLI_Q = 10, 0.01
SRC = Path(__file__).resolve().parents[1] / "src"


def cli_environment() -> dict[str, str]:
    """The environment of the timed commands: this checkout's dprdm first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def cli_prepare_ledger(index_dir: Path) -> None:
    """A ledger with room for every timed call and the timed mechanism pinned (the CLI refuses
    to release without one), made by the real `dprdm budget init`."""
    run_timed([sys.executable, "-m", "dprdm", "budget", "init", str(index_dir),
               "--epsilon", "1000", "--delta", "1e-6", "--k", str(CLI_K), "--q", str(CLI_Q),
               "--sigma", str(SIGMA), "--json"])


def cli_retrieve_command(index_dir: Path, queries: Path, out: Path, nprobe: int) -> list[str]:
    """The `dprdm retrieve` command line timed by --cli (the one place to adapt its options);
    the mechanism is the one pinned by cli_prepare_ledger."""
    return [sys.executable, "-m", "dprdm", "retrieve", str(index_dir), "--query-emb", str(queries),
            "--out", str(out), "--strategy", "ivf-subsample", "--nprobe", str(nprobe), "--json"]


def run_timed(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=cli_environment(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return seconds


def bench_cli(index: EmbeddingIndex, quantizer, nprobe: int, queries: np.ndarray, workdir: Path,
              repeats: int) -> list[dict]:
    """Seconds for one `dprdm retrieve` call of len(queries) queries, saved partition vs old."""
    n = index.n
    quantizer.save(index.path)
    start = time.perf_counter()
    IVFPartition(index, quantizer).save()  # what `dprdm index quantize` now does
    assign_s = time.perf_counter() - start
    cli_prepare_ledger(index.path)
    query_file, out = workdir / "cli-queries.npy", workdir / "cli-out.npy"
    np.save(query_file, queries)
    command = cli_retrieve_command(index.path, query_file, out, nprobe)
    startup = min(run_timed([sys.executable, "-m", "dprdm", "--help"]) for _ in range(repeats))
    run_timed(command)  # untimed: the ledger computes its T_max once and stores it
    saved = [run_timed(command) for _ in range(repeats)]

    def old_call() -> float:  # no saved partition: the call assigns every record, as before
        (index.path / PARTITION_MANIFEST_FILE).unlink()
        return run_timed(command)

    old = [old_call() for _ in range(repeats)]
    IVFPartition(index, quantizer).save()
    # in this process: open the index and its saved partition, release the same queries
    start = time.perf_counter()
    reopened = EmbeddingIndex.open(index.path)
    partition = IVFPartition.open(reopened, nprobe=nprobe)
    open_s = time.perf_counter() - start
    assert partition.loaded
    mechanism = PrivateRetrieval(reopened, MechanismParams(SIGMA, CLI_Q, CLI_K),
                                 InMemoryLedger(epsilon=1e6, delta=1e-6), strategy="probed",
                                 searcher=partition)
    mechanism.release(queries[:1])  # warm-up, as time_calls does
    start = time.perf_counter()
    mechanism.release(queries)
    release_s = time.perf_counter() - start
    common = {"n": n, "d": index.dim, "k": CLI_K, "q": CLI_Q, "dtype": index.dtype.name,
              "nprobe": nprobe, "queries_per_call": len(queries)}
    rows = [
        {**common, "method": "cli ivf-subsample (saved partition)",
         "median_s": round(float(np.median(saved)), 3), "min_s": round(min(saved), 3)},
        {**common, "method": "cli ivf-subsample (old: re-assign per call)",
         "median_s": round(float(np.median(old)), 3), "min_s": round(min(old), 3)},
        {**common, "method": "cli start-up only (python -m dprdm --help)",
         "median_s": round(startup, 3), "min_s": round(startup, 3)},
        {**common, "method": "in-process open (index + saved partition)",
         "median_s": round(open_s, 4), "min_s": round(open_s, 4)},
        {**common, "method": "in-process release of the same queries",
         "median_s": round(release_s, 4), "min_s": round(release_s, 4)},
        {**common, "method": "assignment (once, in index quantize)",
         "median_s": round(assign_s, 3), "min_s": round(assign_s, 3)},
    ]
    for row in rows:
        console.print(f"  {row['method']}: {row['median_s']} s")
    return rows


def bench_one_n(n: int, d: int, ks: list[int], qs: list[float], n_queries: int,
                workdir: Path, rng: np.random.Generator, dtype: str,
                cli_repeats: int = 0) -> list[dict]:
    console.print(f"[bold]N = {n:,}[/] ({dtype}): building the index ...")
    vectors = random_unit(n, d, rng)
    index = build_index(vectors, workdir / f"index-{n}", dtype=dtype)
    del vectors
    index = EmbeddingIndex.open(index.path)
    in_memory = np.asarray(index.vectors)  # page-cached memmap, what every method reads
    for start in range(0, n, 262_144):  # fault every page in once: RAM speed, as a warm service
        float(in_memory[start : start + 262_144, 0].sum())
    # sqrt(N) lists: the ranked walk reads ~3 k/q candidates whatever nlist is, so fewer, longer
    # lists cost less to probe (N=1e6, k=10, q=0.01, loaded machine: nlist 1000 / nprobe 3
    # 15.4 ms vs nlist 4000 / nprobe 12 25.4 ms per query, reference 48 ms in the same run).
    nlist = int(math.sqrt(n))
    public = random_unit(max(40 * nlist, 20_000), d, rng)  # stands in for PUBLIC vectors
    quantizer = train_public_quantizer(public, nlist, index)
    queries = random_unit(n_queries, d, rng)
    flat = FaissFlatSearcher(index) if n <= 1_000_000 else None
    start = time.perf_counter()
    ivf = FaissIVFSearcher(index, quantizer)  # one assignment of the rows, shared below
    partition: IVFPartition = ivf.partition
    console.print(f"  IVF lists built in {time.perf_counter() - start:.0f} s")
    rows = []
    for k in ks:
        for q in qs:
            params = MechanismParams(SIGMA, q, k)
            ledger = InMemoryLedger(epsilon=1e4, delta=1e-6)
            # Probe enough lists to hold ~3 k/q candidates (the ranked walk's depth); both IVF
            # methods use the same nprobe (ivf.nprobe sets the partition's too), so they release
            # the same distribution.
            nprobe = min(nlist, max(1, math.ceil(3 * k / q / (n / nlist))))
            ivf.nprobe = nprobe
            methods = {
                "reference": lambda x, p=params: reference_release(in_memory, x, p, rng),
                "subsample": PrivateRetrieval(index, params, ledger).release,
                "ranked-ivf": PrivateRetrieval(
                    index, params, ledger, strategy="ranked", searcher=ivf).release,
                "probed-ivf": PrivateRetrieval(
                    index, params, ledger, strategy="probed", searcher=partition).release,
            }
            if flat is not None:
                methods["ranked-flat"] = PrivateRetrieval(
                    index, params, ledger, strategy="ranked", searcher=flat).release
            results = {name: time_calls(call, queries) for name, call in methods.items()}
            reference_median = results["reference"][0]
            for name, (median, p95) in results.items():
                rows.append({
                    "n": n, "d": d, "k": k, "q": q, "method": name, "dtype": dtype,
                    "median_ms": round(median, 3), "p95_ms": round(p95, 3),
                    "speedup_vs_reference": round(reference_median / median, 2),
                    "nprobe": nprobe if name.endswith("-ivf") else None,
                })
            console.print(f"  k={k} q={q}: " + ", ".join(
                f"{name} {median:.2f} ms" for name, (median, _) in results.items()))
    if cli_repeats:
        nprobe = min(nlist, max(1, math.ceil(3 * CLI_K / CLI_Q / (n / nlist))))
        rows += bench_cli(index, quantizer, nprobe, queries, workdir, cli_repeats)
    return rows


def float_noise_release(aggregates: np.ndarray, sigma: float) -> np.ndarray:
    """The release before the grid: float32(a + sigma * N(0, 1)), normals by Box-Muller from
    os.urandom (what PrivateRetrieval did until the discrete Gaussian replaced it)."""
    noise = SystemRandomness().standard_normal(aggregates.shape) * sigma
    return np.ascontiguousarray(aggregates + noise, dtype=np.float32)


def bench_noise(dims: list[int], batches: list[int], k: int, repeats: int) -> list[dict]:
    """Noise-only latency per call (one call per batch): the old float path, the grid release
    with OpenDP's sampler (before), and with dprdm's exact sampler on one thread and as released
    now. Methods alternate within each repeat, so load from other jobs hits them alike."""
    rows = []
    opendp, one_thread, now = OpenDPDiscreteGaussian(), DiscreteGaussian(threads=1), \
        DiscreteGaussian()
    console.print(f"  noise threads: {now.threads}")
    for d in dims:
        gamma = noise_grid(SIGMA, k, d)
        for batch in batches:
            aggregates = np.random.default_rng(0).uniform(-0.1, 0.1, size=(batch, d))
            methods = {
                "float-noise (old, off-grid)": lambda a=aggregates: float_noise_release(a, SIGMA),
                "grid, OpenDP sampler, threads (before)": lambda a=aggregates: release_on_grid(
                    a, SIGMA, gamma, opendp),
                "grid, dprdm sampler, 1 thread": lambda a=aggregates: release_on_grid(
                    a, SIGMA, gamma, one_thread),
                "grid, dprdm sampler, threads (now)": lambda a=aggregates: release_on_grid(
                    a, SIGMA, gamma, now),
            }
            times: dict[str, list[float]] = {name: [] for name in methods}
            cpu: dict[str, list[float]] = {name: [] for name in methods}
            for call in methods.values():
                call()  # warm-up (OpenDP builds its measurements for these sizes once)
            for _ in range(repeats if batch > 1 else 10 * repeats):
                for name, call in methods.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    call()
                    times[name].append((time.perf_counter() - start) * 1e3)
                    cpu[name].append((time.process_time() - start_cpu) * 1e3)  # all threads
            before = float(np.median(times["grid, OpenDP sampler, threads (before)"]))
            for name in methods:
                median, median_cpu = float(np.median(times[name])), float(np.median(cpu[name]))
                rows.append({"d": d, "k": k, "sigma": SIGMA, "grid": gamma, "batch": batch,
                             "method": name, "median_ms_per_call": round(median, 3),
                             "median_ms_per_query": round(median / batch, 3),
                             "cpu_us_per_coordinate": round(1e3 * median_cpu / (batch * d), 2),
                             "speedup_vs_before": round(before / median, 2),
                             "threads": 1 if name.endswith("1 thread") or name.startswith(
                                 "float") else now.threads,
                             "load_average_1min": round(os.getloadavg()[0], 2)})
                console.print(f"  d={d} batch={batch} {name}: {median:.2f} ms per call, "
                              f"{rows[-1]['cpu_us_per_coordinate']} us CPU per coordinate")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=1e6, k=10, q=0.01 only")
    parser.add_argument("--out", type=Path, default=Path("bench/results/retrieval.json"))
    parser.add_argument("--queries", type=int, default=100, help="timed queries per setting")
    parser.add_argument("--workdir", type=Path, default=None, help="where indexes are built")
    parser.add_argument("--ns", default=None, help="comma-separated N (default 1e5,1e6,5e6)")
    parser.add_argument("--float16-above", type=float, default=2e6,
                        help="store indexes with more records than this as float16")
    parser.add_argument("--cli", action="store_true",
                        help="also time the real `dprdm retrieve --strategy ivf-subsample` "
                             "command (k=10, q=0.01, --queries queries in one call)")
    parser.add_argument("--cli-repeats", type=int, default=3, help="timed calls per CLI row")
    parser.add_argument("--ks", default=None, help="comma-separated k (default 10,20)")
    parser.add_argument("--qs", default=None, help="comma-separated q (default 0.01,0.001)")
    parser.add_argument("--noise-only", action="store_true",
                        help="time only the noise: old float path vs grid + discrete Gaussian")
    parser.add_argument("--noise-dims", default="64,256,512",
                        help="comma-separated d for --noise-only")
    args = parser.parse_args()
    if args.noise_only:
        rows = bench_noise([int(d) for d in args.noise_dims.split(",")], [1, 100], k=10,
                           repeats=max(3, args.queries // 20))
        table = Table(title="release noise only, ms (median per call)")
        for column in ("d", "batch", "method", "ms/call", "ms/query", "CPU us/coord",
                       "vs before", "load"):
            table.add_column(column, justify="right", no_wrap=column == "method")
        for row in rows:
            table.add_row(str(row["d"]), str(row["batch"]), row["method"],
                          f"{row['median_ms_per_call']:.2f}", f"{row['median_ms_per_query']:.3f}",
                          f"{row['cpu_us_per_coordinate']:.1f}",
                          f"{row['speedup_vs_before']:.2f}x", f"{row['load_average_1min']:.1f}")
        Console(width=max(console.width, 120)).print(table)  # too wide to wrap legibly
        write_results(args.out, rows, console)
        return
    ns, ks, qs = ([1_000_000], [10], [0.01]) if args.quick else (
        [100_000, 1_000_000, 5_000_000], [10, 20], [0.01, 0.001])
    if args.ns:
        ns = [int(float(n)) for n in args.ns.split(",")]
    if args.ks:
        ks = [int(k) for k in args.ks.split(",")]
    if args.qs:
        qs = [float(q) for q in args.qs.split(",")]
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for n in ns:
            dtype = "float16" if n > args.float16_above else "float32"
            rows += bench_one_n(n, 512, ks, qs, args.queries, Path(workdir), rng, dtype,
                                cli_repeats=args.cli_repeats if args.cli else 0)
            write_results(args.out, rows, console)  # after every N: long runs keep their rows
    table = Table(title="private step, ms per query (single-query calls)")
    for column in ("n", "k", "q", "method", "median_ms", "p95_ms", "speedup_vs_reference"):
        table.add_column(column, justify="right")
    for row in rows:
        if "median_s" in row:
            continue
        table.add_row(f"{row['n']:,}", str(row["k"]), str(row["q"]), row["method"],
                      f"{row['median_ms']:.2f}", f"{row['p95_ms']:.2f}",
                      f"{row['speedup_vs_reference']:.1f}x")
    console.print(table)
    cli_rows = [row for row in rows if "median_s" in row]
    if cli_rows:
        table = Table(title="one call of --queries queries, seconds (k=10, q=0.01)")
        for column in ("n", "dtype", "nprobe", "method", "median_s", "min_s"):
            table.add_column(column, justify="right")
        for row in cli_rows:
            table.add_row(f"{row['n']:,}", row["dtype"], str(row["nprobe"]), row["method"],
                          f"{row['median_s']:.3f}", f"{row['min_s']:.3f}")
        console.print(table)
    write_results(args.out, rows, console)


if __name__ == "__main__":
    main()
