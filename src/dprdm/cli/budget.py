"""`dprdm budget ...`: create, inspect and re-pin the privacy ledger of a private index."""

from __future__ import annotations

from pathlib import Path

import typer

from dprdm.cli.generator_options import GENERATOR_CHOICE, generator_options
from dprdm.cli.output import (JSON_OPTION, LEDGER_OPTION, err_console, progress_callback,
                              run_command)
from dprdm.errors import InvalidParameterError
from dprdm.files import check_writable_destination
from dprdm.privacy import MechanismParams, accounting, init_budget, open_private_index
from dprdm.privacy.binding import (NEW_BUDGET_FLAG, VOIDS_THE_GUARANTEE, binding_of,
                                   embeddings_bytes)
from dprdm.privacy.ledger import PLD, StoredLedger

app = typer.Typer(help="The privacy budget (ledger) of a private index.", no_args_is_help=True)

# Below this size the embeddings are hashed in well under a second; no progress bar.
PROGRESS_MIN_BYTES = 256 * 1024 * 1024
# set-mechanism warns when the filter then admits fewer queries than this.
FEW_QUERIES = 10


def mechanism_figures(ledger: StoredLedger) -> dict:
    """What `budget show`/`init` print about the pinned mechanism and its accountant."""
    summary = ledger.summary()
    params = summary.mechanism
    if summary.accountant == PLD:
        why = ("one mechanism, pinned before any release: PLD composition of identical "
               "Poisson-subsampled Gaussian releases")
    else:
        why = ("the mechanism was changed (`budget set-mechanism`), so later mechanisms may "
               "depend on earlier outputs: an RDP filter at an order fixed at `budget init` "
               "(Feldman & Zrnic 2021) accounts every release")
    return {
        "mechanism": {"sigma": round(params.sigma, 6), "q": params.q, "k": params.k,
                      "lam": summary.lam, "noise_multiplier": round(params.noise_multiplier, 4)},
        "accountant": summary.accountant,
        "accountant_reason": why,
        "rdp_filter": summary.rdp_filter,
        "queries_remaining": ledger.remaining_queries(),
    }


def _mechanism(sigma: float | None, q: float | None, k: int | None, calibrate: bool,
               queries: int | None, epsilon: float, delta: float) -> MechanismParams:
    if k is None or q is None:
        raise InvalidParameterError("give --k and --q, and --sigma or --calibrate --queries T")
    if calibrate:
        if sigma is not None or queries is None:
            raise InvalidParameterError("--calibrate takes --queries T and no --sigma")
        sigma = accounting.calibrate_sigma(epsilon, q, k, queries, delta)
    elif sigma is None:
        raise InvalidParameterError("give --sigma, or --calibrate --queries T")
    return MechanismParams(sigma, q, k)


@app.command()
def init(
    index_dir: Path = typer.Argument(..., help="The private index directory."),
    epsilon: float = typer.Option(..., "--epsilon", help="Total epsilon budget (> 0)."),
    delta: float = typer.Option(..., "--delta", help="Delta in (0, 1); should be below 1/N."),
    k: int = typer.Option(None, "--k", help="Neighbours averaged per query (pinned)."),
    q: float = typer.Option(None, "--q", help="Poisson sampling rate in (0, 1] (pinned)."),
    sigma: float = typer.Option(None, "--sigma", help="Noise std of the aggregate (pinned)."),
    calibrate: bool = typer.Option(False, "--calibrate",
                                   help="Choose the smallest sigma that lets --queries T fit."),
    queries: int = typer.Option(None, "--queries", help="With --calibrate: queries T to fit."),
    lam: float = typer.Option(1.0, "--lam", help="Default mix c = lam*released + (1-lam)*text "
                                                 "(post-processing, free; callers may change it)."),
    new_budget: bool = typer.Option(
        False, NEW_BUDGET_FLAG,
        help="Re-create the ledger of an index whose ledger was lost. Voids the guarantee for "
             "every record already queried (recorded in the ledger and the index manifest)."),
    ledger_url: str = typer.Option(
        None, "--ledger", help="Create the ledger in this postgresql:// database (shared by "
                               "several replicas) instead of ledger.sqlite in the index "
                               "directory. The manifest records it without a password."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create the ledger of an index: a fixed (epsilon, delta) budget and the pinned mechanism.

    The mechanism (k, q, sigma) is stored in the ledger and every request must use it; only
    `dprdm budget set-mechanism` changes it. The ledger is bound to the index (a random ledger
    id and the SHA-256 of the embeddings, in both): a deleted, replaced or rolled-back ledger,
    or changed embeddings, are refused. An index that ever had a ledger gets a new one only
    with the new-budget flag.

    Not detectable: restoring the ledger together with its ledger-watermark.json, or copying the
    whole index directory, forks the budget (each copy spends it again); so does building a new
    index from the same data. Keep private indexes where only the operator can copy them.

    Example: dprdm budget init private-index/ --epsilon 10 --delta 1e-5 --k 40 --q 0.1
    --calibrate --queries 1000 --lam 0.5
    """

    def compute() -> dict:
        params = _mechanism(sigma, q, k, calibrate, queries, epsilon, delta)
        size = embeddings_bytes(index_dir)  # every shard's, for a sharded index (one ledger)
        with progress_callback("hashing embeddings",
                               enabled=not as_json and size >= PROGRESS_MIN_BYTES) as progress:
            index, ledger = init_budget(index_dir, epsilon, delta, params, lam,
                                        new_budget=new_budget, progress=progress,
                                        ledger=ledger_url)
        result = {"index": str(index_dir), "records": index.n, "ledger_id": ledger.ledger_id,
                  "ledger": ledger.location}
        result.update(ledger.summary().as_dict())
        result.update(mechanism_figures(ledger))
        if binding_of(index_dir)["ledger_history"][-1]["voids_guarantee"]:
            result["voids_guarantee"] = VOIDS_THE_GUARANTEE
            err_console.print(f"[bold red]new budget:[/] {VOIDS_THE_GUARANTEE}")
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
    ledger_url: str = LEDGER_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """What the ledger holds: budget, epsilon spent, queries, releases, the pinned mechanism,
    which accountant applies and why, the queries remaining for the pinned mechanism, and the
    index's stored style estimate (how many releases it averages; `budget style-estimate`).

    Example: dprdm budget show private-index/ --json
    """

    def compute() -> dict:
        from dprdm.style_estimate import load_style_estimate

        index, ledger = open_private_index(index_dir, ledger_url, read_only=True)
        result = {"ledger_id": ledger.ledger_id, "ledger": ledger.location}
        result.update(ledger.summary().as_dict())
        result.update(mechanism_figures(ledger))
        estimate = load_style_estimate(index_dir, ledger.ledger_id, index.dim)
        result["style_estimate"] = None if estimate is None else estimate.describe()
        result["mechanism_history"] = ledger.mechanisms()
        result["events"] = ledger.events()
        return result

    run_command(as_json, "privacy budget", compute)


@app.command("set-mechanism")
def set_mechanism(
    index_dir: Path = typer.Argument(..., help="The private index directory."),
    k: int = typer.Option(..., "--k", help="Neighbours averaged per query."),
    q: float = typer.Option(..., "--q", help="Poisson sampling rate in (0, 1]."),
    sigma: float = typer.Option(..., "--sigma", help="Noise std of the aggregate."),
    lam: float = typer.Option(1.0, "--lam", help="Default mix weight (post-processing)."),
    ledger_url: str = LEDGER_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Pin another mechanism (operator only; recorded with its time).

    From then on the whole ledger is accounted by an RDP filter at the order fixed at `budget
    init` (past releases count with their RDP at that order), which is looser than the PLD of
    a single mechanism: after many releases it may leave little or nothing. Running services
    must be restarted (they refuse to charge a mechanism that is no longer pinned).

    Example: dprdm budget set-mechanism private-index/ --k 40 --q 0.05 --sigma 0.06
    """

    def compute() -> dict:
        params = MechanismParams(sigma, q, k)
        _, ledger = open_private_index(index_dir, ledger_url)
        ledger.set_mechanism(params, lam)
        result = {"ledger_id": ledger.ledger_id}
        result.update(ledger.summary().as_dict())
        result.update(mechanism_figures(ledger))
        if result["queries_remaining"] < FEW_QUERIES:
            spent = result["rdp_filter"]
            warning = (f"the RDP filter now admits only {result['queries_remaining']} more "
                       f"queries with this mechanism (RDP spent {spent['rdp_spent']:.4g} of "
                       f"{spent['rdp_bound']:.4g} at order {spent['order']:g}, releases under "
                       "earlier mechanisms included)")
            result["warning"] = warning
            err_console.print(f"[bold yellow]warning:[/] {warning}")
        return result

    run_command(as_json, "mechanism pinned", compute)


@app.command("style-estimate")
@generator_options(exclude=("batch_size", "image_size", "attention_slicing", "cpu_offload"))
def style_estimate(
    index_dir: Path = typer.Argument(None, help="The private index directory."),
    prompts_file: Path = typer.Option(
        None, "--prompts",
        help="Operator prompts in a file as `synthesize` reads them (.txt one per line, .csv, "
             ".jsonl); each costs one query. Prompts that describe what the collection holds; "
             "never clients' queries."),
    replace: bool = typer.Option(False, "--replace",
                                 help="Replace the index's existing estimate (its budget stays "
                                      "spent)."),
    demo: bool = typer.Option(False, "--demo",
                              help="The demo's private index, with 64 captions of its PUBLIC "
                                   "index as prompts (unless --prompts is given)."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Print what it would charge; charge and write nothing."),
    ledger_url: str = LEDGER_OPTION,
    choice=GENERATOR_CHOICE,
    as_json: bool = JSON_OPTION,
) -> None:
    """Spend one query per operator prompt on a stored style estimate (operator only).

    The prompts' releases are charged like any other (all at once, or none when the budget
    cannot take them) and their mean is written to style-estimate.safetensors in the index
    directory (atomically), bound to this ledger. From then on `dprdm generate`, `serve` and
    `synthesize` shrink every call's releases towards it, one-prompt calls included (free
    post-processing; docs/privacy.md "A stored style estimate"). The service cannot make one.

    Example: dprdm budget style-estimate private-index/ --prompts operator-prompts.txt
    """

    def compute() -> dict:
        from dprdm import demo_layout
        from dprdm.privacy.receipts import call_figures, preview
        from dprdm.rdm import MechanismSettings, RetrievalAugmentedGenerator
        from dprdm.style_estimate import (estimate_style, load_style_estimate, path_of,
                                          read_operator_prompts, save_style_estimate)

        index_path = index_dir
        if demo:
            index_path = index_path or demo_layout.require(demo_layout.private_index_dir())
        if index_path is None:
            raise InvalidParameterError("give the private index directory (or --demo)")
        if prompts_file is not None:
            prompts = read_operator_prompts(prompts_file)
        elif demo:
            from dprdm.demo import style_estimate_prompts

            prompts = style_estimate_prompts()
        else:
            raise InvalidParameterError("give --prompts FILE (operator prompts, e.g. one per line)")
        index, ledger = open_private_index(index_path, ledger_url)
        existing = path_of(index_path).exists()
        if existing and not replace:
            # a readable one is described; a broken or foreign one is refused with its reason
            found = load_style_estimate(index_path, ledger.ledger_id, index.dim)
            raise InvalidParameterError(
                f"{path_of(index_path)} already holds a style estimate of "
                f"{found.releases} releases ({found.created}); pass --replace to spend "
                "more budget on a new one")
        check_writable_destination(path_of(index_path))  # before anything is charged
        if dry_run:
            return dict(preview(ledger, len(prompts)), prompts=len(prompts),
                        out=str(path_of(index_path)))
        rag = RetrievalAugmentedGenerator(backend=choice.load_backend(), private_index=index,
                                          ledger=ledger,
                                          settings=MechanismSettings.from_ledger(ledger))
        receipts: list = []
        estimate = estimate_style(rag, prompts, receipts=receipts)  # charged first
        path = save_style_estimate(index_path, estimate)
        figures = call_figures(receipts, ledger)
        return {"out": str(path), "style_estimate": estimate.describe(),
                "replaced": existing,
                "epsilon_this_call": figures["epsilon_spent_by_call"],
                "epsilon_spent": figures["ledger_now"]["epsilon_spent"],
                "epsilon_remaining": figures["ledger_now"]["epsilon_remaining"],
                "queries_remaining": ledger.remaining_queries()}

    run_command(as_json, "style estimate stored", compute)
