"""`dprdm budget ...`: create and inspect the privacy ledger of a private index."""

from __future__ import annotations

from pathlib import Path

import typer

from dprdm.cli.output import JSON_OPTION, err_console, run_command
from dprdm.privacy import MechanismParams, SqliteLedger
from dprdm.retrieval.shards import open_private_index

app = typer.Typer(help="The privacy budget (ledger) of a private index.", no_args_is_help=True)


@app.command()
def init(
    index_dir: Path = typer.Argument(..., help="The private index directory."),
    epsilon: float = typer.Option(..., "--epsilon", help="Total epsilon budget (> 0)."),
    delta: float = typer.Option(..., "--delta", help="Delta in (0, 1); should be below 1/N."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create the ledger of an index with a fixed (epsilon, delta) budget. Never resets one.

    Example: dprdm budget init private-index/ --epsilon 10 --delta 1e-5
    """

    def compute() -> dict:
        index = open_private_index(index_dir)  # one ledger for a whole sharded index too
        ledger = SqliteLedger.create(index_dir, epsilon=epsilon, delta=delta)
        result = {"index": str(index_dir), "records": index.n}
        result.update(ledger.summary().as_dict())
        if delta >= 1.0 / index.n:
            warning = (
                f"delta={delta:g} >= 1/N = {1.0 / index.n:.3g}: a mechanism that publishes one "
                "random record outright would satisfy such a delta; prefer delta well below 1/N"
            )
            result["warning"] = warning
            err_console.print(f"[bold yellow]warning:[/] {warning}")
        return result

    run_command(as_json, "privacy budget created", compute)


@app.command()
def show(
    index_dir: Path = typer.Argument(..., help="The private index directory."),
    sigma: float = typer.Option(None, "--sigma", help="With --q and --k: queries remaining."),
    q: float = typer.Option(None, "--q"),
    k: int = typer.Option(None, "--k"),
    as_json: bool = JSON_OPTION,
) -> None:
    """What the ledger holds: budget, epsilon spent (PLD; RDP beside), queries, releases.

    Example: dprdm budget show private-index/ --sigma 0.05 --q 0.01 --k 20 --json
    """

    def compute() -> dict:
        ledger = SqliteLedger(index_dir)
        summary = ledger.summary()
        result = summary.as_dict()
        if sigma is not None or q is not None or k is not None:
            params = MechanismParams(sigma, q, k)
        elif len(summary.releases) == 1:
            params = summary.releases[0][0]
        else:
            params = None
        if params is not None:
            result["queries_remaining"] = ledger.remaining_queries(params)
            result["queries_remaining_for"] = {"sigma": params.sigma, "q": params.q, "k": params.k}
        return result

    run_command(as_json, "privacy budget", compute)
