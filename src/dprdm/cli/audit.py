"""`dprdm audit`: test the released mechanism itself -- an empirical lower bound on epsilon.

Runs :func:`dprdm.audit.run_audit` (two neighbouring private sets differing in one worst-case
canary, many trials through the real mechanism, Clopper-Pearson bounds) and prints the accountant's
epsilon beside the lower bound. Exit status 1 when the bound exceeds the claim: the implementation
(or the accounting) is broken, or a (1 - confidence) event happened.
"""

from __future__ import annotations

from typing import cast

import typer

from dprdm.audit import AuditResult, run_audit
from dprdm.audit.experiment import (
    AUDIT_STRATEGIES,
    AuditStrategy,
    DEFAULT_CONFIDENCE,
    DEFAULT_DELTA,
    DEFAULT_TRIALS,
)
from dprdm.cli.output import JSON_OPTION, console, progress_callback, run_command
from dprdm.errors import InvalidParameterError
from dprdm.privacy import MechanismParams

DEFAULT_K = 10
DEFAULT_SIGMA = 0.3  # noise multiplier sigma * k / 2 = 1.5 at k = 10: epsilon ~2.75 per query


def _verdict(result: AuditResult) -> str:
    if result.exceeds_claim:
        return (f"[bold red]FAIL[/]: the lower bound {result.epsilon_lower_bound:.4g} exceeds the "
                f"claimed epsilon {result.epsilon_claimed:.4g}: the mechanism or its accounting "
                f"is broken (or a {1 - result.bound.confidence:.0%}-probability event happened)")
    return (f"[bold green]PASS[/]: lower bound {result.epsilon_lower_bound:.4g} <= claimed "
            f"epsilon {result.epsilon_claimed:.4g}")


def audit(
    k: int = typer.Option(DEFAULT_K, "--k", help="Neighbours averaged per query."),
    sigma: float = typer.Option(DEFAULT_SIGMA, "--sigma", help="Noise std of the aggregate."),
    q: float = typer.Option(1.0, "--q", help="Poisson sampling rate in (0, 1]; 1 = none."),
    trials: int = typer.Option(DEFAULT_TRIALS, "--trials", help="Trials per neighbouring set."),
    queries: int = typer.Option(1, "--queries", help="Releases per trial (composed)."),
    delta: float = typer.Option(DEFAULT_DELTA, "--delta", help="Delta of the claim and bound."),
    confidence: float = typer.Option(
        DEFAULT_CONFIDENCE, "--confidence", help="Confidence of the lower bound."
    ),
    records: int | None = typer.Option(
        None, "--records",
        help="Antipodal records in the set without the canary (default: enough that a "
             "subsample nearly always holds k of them).",
    ),
    strategy: str = typer.Option(
        "subsample", "--strategy",
        help=f"Mechanism path to audit: {' or '.join(AUDIT_STRATEGIES)} (as in dprdm retrieve).",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Audit the DP retrieval mechanism: claimed epsilon beside an empirical lower bound.

    Two private sets that differ in one canary record, placed so that it moves the aggregate by
    the full sensitivity 2/k, are built as temporary indexes; TRIALS trials on each release the
    canary query QUERIES times through the real mechanism (fresh subsample, OS-entropy noise),
    charged to an in-memory experiment ledger. A Clopper-Pearson bound on the best test's error
    rates gives epsilon_lower_bound. With q = 1 it should reach about half the claim at 100k
    trials; with q < 1 it is much weaker (subsampling dilutes the canary). Exit status 1 when
    the bound exceeds the claim.

    Example: dprdm audit --k 10 --sigma 0.3 --q 1 --trials 20000 --delta 1e-5 --json
    """
    outcome: list[AuditResult] = []

    def compute() -> dict:
        if strategy not in AUDIT_STRATEGIES:
            raise InvalidParameterError(f"--strategy must be one of {', '.join(AUDIT_STRATEGIES)}")
        params = MechanismParams(sigma, q, k)
        with progress_callback("auditing: releases", enabled=not as_json) as progress:
            result = run_audit(
                params, trials=trials, queries=queries, delta=delta, confidence=confidence,
                records=records, strategy=cast(AuditStrategy, strategy), progress=progress,
            )
        outcome.append(result)
        return result.as_dict()

    run_command(as_json, "privacy audit", compute)
    if not as_json:
        console.print(_verdict(outcome[0]))
    if outcome[0].exceeds_claim:
        raise typer.Exit(code=1)
