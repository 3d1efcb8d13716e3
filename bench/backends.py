"""dprdm's overhead over calling the diffusers pipeline directly, per generator backend.

    python bench/backends.py --out bench/results/backends.json
    python bench/backends.py --steps 25 --size 64 --rows 20000 --repeats 5

For each tiny random backend of tests/tiny_backends.py (Kandinsky 2.2, Stable unCLIP, IP-Adapter:
the same pipelines as the real models, with tiny widths), one prompt is generated at ``--steps``
(default 25) by

* dprdm: ``RetrievalAugmentedGenerator.generate`` -- the prompt's public query, the DP release
  from a ``--rows`` private index (exact search, subsampling, the OpenDP discrete Gaussian, the
  in-memory ledger's charge), the mix, the rescale to the model's scale, the pipeline, uint8;
* direct: the same pipeline called with the same keyword arguments (image embeddings already
  computed, on the device), as a user of diffusers alone would call it.

Both use the same seed, interleaved, ``--repeats`` times; medians are compared. The public query
(the Kandinsky prior, or the CLIP text tower) is timed on its own: a direct user computes it too,
so ``overhead`` = (dprdm - query - direct) / direct is what dprdm adds; ``overhead_with_query``
counts the query against dprdm as well. Numbers on a shared CPU move with its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_backends as tb  # noqa: E402

from dprdm.generation.backends import RuntimeOptions, load_backend  # noqa: E402
from dprdm.privacy import InMemoryLedger  # noqa: E402
from dprdm.rdm import MechanismSettings, RetrievalAugmentedGenerator  # noqa: E402
from dprdm.retrieval import build_index  # noqa: E402
from results_file import write_results  # noqa: E402  (bench/results_file.py)

console = Console()
PROMPT = ["the cat"]


def folders(root: Path, size: int) -> dict:
    clip = tb.clip_dir(root / "clip")
    decoder, prior = tb.kandinsky_dirs(root / "kandinsky")
    sd, adapter = tb.ip_adapter_dirs(root / "ip")
    common = {"height": size, "width": size}
    return {"kandinsky-2.2": {"model": decoder, "prior": prior, "prior_steps": 25, **common},
            "stable-unclip": {"model": tb.unclip_dir(root / "unclip", clip), "encoder": clip,
                              **common},
            "ip-adapter": {"model": sd, "adapter": adapter, "encoder": clip, **common}}


def private_index(backend, directory: Path, rows: int):
    vectors = np.random.default_rng(0).standard_normal((rows, backend.dim)).astype(np.float32)
    index = build_index(vectors, directory)
    backend.space.save(directory)
    return index


def measure(name: str, backend, index, steps: int, guidance: float, repeats: int) -> dict:
    settings = MechanismSettings(sigma=0.5, q=0.5, k=10, lam=0.7)
    ledger = InMemoryLedger(epsilon=1e6, delta=1e-6)
    rag = RetrievalAugmentedGenerator(backend=backend, private_index=index, ledger=ledger,
                                      settings=settings)
    conditions = rag.conditions(PROMPT, public_only=False)  # the embeddings both paths use
    kwargs = backend.model_inputs(conditions, PROMPT, 1, guidance, steps)
    pipe = backend.pipeline

    def direct():
        with torch.no_grad():
            return pipe(**kwargs, generator=torch.Generator().manual_seed(0),
                        output_type="np").images

    def dprdm():
        return rag.generate(PROMPT, n=1, guidance=guidance, steps=steps, seed=0).images

    def query():
        return backend.embed_prompts(PROMPT)

    for run in (direct, dprdm, query):  # warm-up
        run()
    times = {"direct": [], "dprdm": [], "query": []}
    for _ in range(repeats):
        for label, run in (("direct", direct), ("dprdm", dprdm), ("query", query)):
            started = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - started)
    med = {label: statistics.median(values) for label, values in times.items()}
    return {"backend": name, "space_dim": backend.dim, "index_rows": index.n, "steps": steps,
            "image_side": int(kwargs.get("height") or 0), "repeats": repeats,
            "direct_s": med["direct"], "dprdm_s": med["dprdm"], "query_s": med["query"],
            "overhead": (med["dprdm"] - med["query"] - med["direct"]) / med["direct"],
            "overhead_with_query": (med["dprdm"] - med["direct"]) / med["direct"],
            "queries_charged": ledger.summary().queries, "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--rows", type=int, default=20000, help="private index rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = RuntimeOptions(device=args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, given in folders(root, args.size).items():
            backend = load_backend(name, options, **given)
            index = private_index(backend, root / f"index-{name}", args.rows)
            rows.append(measure(name, backend, index, args.steps, args.guidance, args.repeats))
    table = Table(title=f"dprdm vs the diffusers pipeline called directly ({args.steps} steps, "
                        f"{args.size}px, {args.rows:,}-row private index, {options.device}, "
                        f"median of {args.repeats})")
    for column in ("backend", "direct s", "query s", "dprdm s", "overhead", "overhead incl. query"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["backend"], f"{row['direct_s']:.3f}", f"{row['query_s']:.3f}",
                      f"{row['dprdm_s']:.3f}", f"{100 * row['overhead']:+.1f} %",
                      f"{100 * row['overhead_with_query']:+.1f} %")
    console.print(table)
    console.print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    write_results(args.out, {"settings": vars(args) | {"out": str(args.out)}, "rows": rows,
                             "load_average": os.getloadavg()[0]}, console)


if __name__ == "__main__":
    main()
