"""`dprdm retrieve`: private retrieval for a file of query embeddings, charged to the ledger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from dprdm.cli.output import (JSON_OPTION, LEDGER_OPTION, RAY_PRIVATE_NETWORK, err_console,
                              run_command)
from dprdm.conditioning import check_lam, interpolate
from dprdm.errors import InvalidParameterError
from dprdm.files import check_writable_destination, save_npy_atomically
from dprdm.privacy import PrivateRetrieval, open_private_index
from dprdm.privacy.mechanism import normalise_queries
from dprdm.privacy.receipts import call_figures, preview
from dprdm.privacy.sharded import ShardedPrivateRetrieval, shard_backend
from dprdm.retrieval import DEFAULT_NPROBE, IVFPartition, make_searcher
from dprdm.retrieval.search import PublicQuantizer
from dprdm.retrieval.shards import ShardedIndex

STRATEGIES = ("subsample", "ivf-subsample", "exact", "faiss", "ivf")
SHARDED_STRATEGIES = ("subsample", "ivf-subsample")


def retrieve(
    index_dir: Path = typer.Argument(..., help="The private index directory (with a ledger)."),
    query_emb: Path = typer.Option(..., "--query-emb", help=".npy of (B, d) query embeddings."),
    lam: float = typer.Option(1.0, "--lam", help="c = lam * released + (1 - lam) * query "
                                                 "(post-processing, free)."),
    out: Path = typer.Option(..., "--out", help="Where to write the (B, d) float64 .npy."),
    strategy: str = typer.Option(
        "subsample", "--strategy",
        help="subsample: draw the subsample in O(qN), search it; ivf-subsample: the same "
             "inside the lists a public quantizer probes (fastest); exact/faiss/ivf: walk a "
             "ranked candidate list from that searcher (ivf* need `dprdm index quantize`).",
    ),
    nprobe: int = typer.Option(
        DEFAULT_NPROBE, "--nprobe", help="Lists probed per query (ivf and ivf-subsample)."),
    ray_address: str | None = typer.Option(
        None, "--ray-address",
        help="A sharded index (`dprdm index shard`) only: run its shards as Ray actors -- 'local' "
             "(an in-process Ray), or 'auto' / host:port for the actors `dprdm index "
             "serve-shards` started on a cluster. Without it a sharded index runs in this "
             "process. " + RAY_PRIVATE_NETWORK,
    ),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Print what the call would charge (epsilon before/after, "
                                      "queries left); charge and write nothing."),
    ledger_url: str = LEDGER_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Release one noised aggregate per query row; every row costs one query of the budget.

    The mechanism (k, q, sigma) is the one pinned in the index's ledger (`dprdm budget init`);
    the ledger is charged for all rows first; then the (interpolated) aggregates are written to
    OUT atomically as float64 (with --lam 1 every value is an exact multiple of the noise grid,
    reported as noise.grid). Nothing else about the private records is printed.

    Example: dprdm retrieve private-index/ --query-emb q.npy --out r.npy
    """

    def compute() -> dict:
        # Everything that can fail on bad input is checked BEFORE the ledger is charged.
        if strategy not in STRATEGIES:
            raise InvalidParameterError(f"--strategy must be one of {', '.join(STRATEGIES)}")
        lam_ = check_lam(lam)
        destination = check_writable_destination(out)
        index, ledger = open_private_index(index_dir, ledger_url)  # sharded: one ledger
        params = ledger.mechanism
        sharded = isinstance(index, ShardedIndex)
        if sharded and strategy not in SHARDED_STRATEGIES:
            raise InvalidParameterError("a sharded index supports --strategy "
                                        f"{' or '.join(SHARDED_STRATEGIES)}")
        if ray_address is not None and not sharded:
            raise InvalidParameterError("--ray-address needs a sharded index (dprdm index shard)")
        try:
            raw = np.load(query_emb, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InvalidParameterError(f"cannot read {query_emb} as .npy: {error}") from None
        queries = normalise_queries(raw, index.dim)
        if sharded:  # the single-node mechanism, its neighbour step spread over the shards
            mechanism = ShardedPrivateRetrieval(
                shard_backend(index, ray_address), params, ledger,
                strategy="probed" if strategy == "ivf-subsample" else "subsample", nprobe=nprobe)
        elif strategy == "subsample":
            mechanism = PrivateRetrieval(index, params, ledger)
        elif strategy == "ivf-subsample":
            # the partition saved by `index quantize` (memory-mapped), recomputed only if stale
            partition = IVFPartition.open(index, nprobe=nprobe, notice=err_console.print)
            mechanism = PrivateRetrieval(index, params, ledger, strategy="probed",
                                         searcher=partition)
        else:
            mechanism = PrivateRetrieval(index, params, ledger, strategy="ranked",
                                         searcher=make_searcher(index, strategy, nprobe=nprobe))
        if dry_run:  # what the call would charge; nothing is charged or written
            return dict(preview(ledger, int(queries.shape[0])), out=None,
                        noise=mechanism.noise_description())
        receipts: list = []
        released = mechanism.release(queries, caller="cli:retrieve", receipts=receipts)
        save_npy_atomically(destination, interpolate(released, queries, lam_, dtype=np.float64))
        figures = call_figures(receipts, ledger)
        return {
            "queries": int(queries.shape[0]),
            "out": str(destination),
            "sigma": params.sigma, "q": params.q, "k": params.k, "lam": lam_,
            "noise": mechanism.noise_description(),
            "epsilon_this_call": figures["epsilon_spent_by_call"],
            "epsilon_after_own_commit": figures["epsilon_after_own_commit"],
            "epsilon_spent": figures["ledger_now"]["epsilon_spent"],
            "epsilon_remaining": figures["ledger_now"]["epsilon_remaining"],
            "queries_remaining": ledger.remaining_queries(params),
        }

    run_command(as_json, "private retrieval", compute)
