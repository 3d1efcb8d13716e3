"""`dprdm audit`: test the released mechanism itself -- an empirical lower bound on epsilon.

Runs :func:`dprdm.audit.run_audit` (two neighbouring private sets differing in one worst-case
canary, many trials through the real mechanism, Clopper-Pearson bounds on the best of several
whole-vector statistics, and a check that the noise is N(0, sigma^2 I)) and prints the
accountant's epsilon beside the lower bound, and the noise check. Exit status 1 when either check
fails (``failed_checks`` in the JSON: "lower_bound", "noise"): the implementation (or the
accounting) is broken, or an event of probability at most (1 - confidence) + noise alpha happened.
"""

from __future__ import annotations

from typing import cast

import typer

from dprdm.audit import AuditResult, run_audit
from dprdm.audit.experiment import (
    AUDIT_DIM,
    AUDIT_DTYPES,
    AUDIT_STRATEGIES,
    AuditDtype,
    AuditStrategy,
    DEFAULT_CONFIDENCE,
    DEFAULT_DELTA,
    DEFAULT_TRIALS,
)
from dprdm.audit.noise import DEFAULT_NOISE_ALPHA
from dprdm.cli.output import JSON_OPTION, console, progress_callback, run_command
from dprdm.errors import InvalidParameterError
from dprdm.privacy import MechanismParams

DEFAULT_K = 10
DEFAULT_SIGMA = 0.3  # noise multiplier sigma * k / 2 = 1.5 at k = 10: epsilon ~2.75 per query


def _verdict(result: AuditResult) -> str:
    lines = []
    if result.exceeds_claim:
        lines.append(
            f"[bold red]FAIL (lower_bound)[/]: the lower bound {result.epsilon_lower_bound:.4g} "
            f"({result.bound.statistic} statistic) exceeds the claimed epsilon "
            f"{result.epsilon_claimed:.4g}: the mechanism or its accounting is broken (or a "
            f"{1 - result.bound.confidence:.0%}-probability event happened)")
    if not result.noise.passed:
        lines.append(
            "[bold red]FAIL (noise)[/]: the released noise is not N(0, sigma^2 I): "
            + "; ".join(result.noise.failures)
            + f" (a correct mechanism fails this with probability <= {result.noise.alpha:.2g})")
    if lines:
        return "\n".join(lines)
    return (f"[bold green]PASS[/]: lower bound {result.epsilon_lower_bound:.4g} "
            f"({result.bound.statistic} statistic) <= claimed epsilon "
            f"{result.epsilon_claimed:.4g}; noise consistent with N(0, sigma^2 I) "
            f"(variance ratios {result.noise.variance_ratio_min:.3f}.."
            f"{result.noise.variance_ratio_max:.3f}, max |correlation| "
            f"{result.noise.max_abs_correlation:.3f})")


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
        help=f"Mechanism path to audit: {', '.join(AUDIT_STRATEGIES)} (as in dprdm retrieve; "
             "ivf-subsample probes every list of a fixed public axis quantizer).",
    ),
    dtype: str = typer.Option(
        "float32", "--dtype",
        help=f"Storage of the audit's temporary indexes: {' or '.join(AUDIT_DTYPES)}.",
    ),
    dim: int = typer.Option(AUDIT_DIM, "--dim", help="Dimension of the canary design."),
    noise_alpha: float = typer.Option(
        DEFAULT_NOISE_ALPHA, "--noise-alpha",
        help="False-alarm probability of the noise check for a correct mechanism.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Audit the DP retrieval mechanism: claimed epsilon beside an empirical lower bound.

    Two private sets that differ in one canary record, placed so that it moves the aggregate by
    the full sensitivity 2/k, are built as temporary indexes; TRIALS trials on each release the
    canary query QUERIES times through the real mechanism (fresh subsample, OS-entropy noise),
    charged to an in-memory experiment ledger. Half the trials choose a statistic of the whole
    released vector (projection on the canary, a linear discriminant or a Gaussian likelihood
    ratio fitted to them) and a threshold; a Clopper-Pearson bound on its error rates on the
    other half gives epsilon_lower_bound. With q = 1 it should reach about half the claim at
    100k trials; with q < 1 it is much weaker (subsampling dilutes the canary). Separately, the
    noise is tested against N(0, sigma^2 I) (per-direction variances, pairwise correlations).
    Exit status 1 when the bound exceeds the claim or the noise check fails; for records above
    512 per subsample the mechanism's blocked scoring is exercised (pass --records).

    Example: dprdm audit --k 10 --sigma 0.3 --q 1 --trials 20000 --delta 1e-5 --json
    """
    outcome: list[AuditResult] = []

    def compute() -> dict:
        if strategy not in AUDIT_STRATEGIES:
            raise InvalidParameterError(f"--strategy must be one of {', '.join(AUDIT_STRATEGIES)}")
        if dtype not in AUDIT_DTYPES:
            raise InvalidParameterError(f"--dtype must be one of {', '.join(AUDIT_DTYPES)}")
        params = MechanismParams(sigma, q, k)
        with progress_callback("auditing: releases", enabled=not as_json) as progress:
            result = run_audit(
                params, trials=trials, queries=queries, delta=delta, confidence=confidence,
                records=records, strategy=cast(AuditStrategy, strategy),
                dtype=cast(AuditDtype, dtype), dim=dim, noise_alpha=noise_alpha,
                progress=progress,
            )
        outcome.append(result)
        return result.as_dict()

    run_command(as_json, "privacy audit", compute)
    if not as_json:
        console.print(_verdict(outcome[0]))
    if not outcome[0].passed:
        raise typer.Exit(code=1)
