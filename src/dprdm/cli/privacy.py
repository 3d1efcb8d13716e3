"""`dprdm privacy ...`: the privacy calculator (epsilon, calibrate, max-queries)."""

from __future__ import annotations

import typer

from dprdm.cli.output import JSON_OPTION, run_command
from dprdm.privacy import accounting

app = typer.Typer(help="Privacy calculator for the DP retrieval mechanism.", no_args_is_help=True)

SIGMA = typer.Option(..., "--sigma", help="Noise std added to the aggregate.")
Q = typer.Option(..., "--q", help="Poisson sampling rate in (0, 1]; 1 = no subsampling.")
K = typer.Option(..., "--k", help="Neighbours averaged per query.")
QUERIES = typer.Option(..., "--queries", help="Number of queries (releases).")
DELTA = typer.Option(..., "--delta", help="Target delta in (0, 1).")
EPSILON = typer.Option(..., "--epsilon", help="Target epsilon (> 0).")


def _describe(params: accounting.MechanismParams, queries: int, delta: float) -> dict:
    eps_rdp, order = accounting.epsilon_rdp([(params, queries)], delta)
    return {
        "epsilon": accounting.epsilon_for(params, queries, delta),
        "epsilon_rdp": eps_rdp,
        "rdp_order": order,
        "noise_multiplier": params.noise_multiplier,
        "sensitivity": params.sensitivity,
        "sigma": params.sigma,
        "q": params.q,
        "k": params.k,
        "queries": queries,
        "delta": delta,
        "accountant": "PLD (dp_accounting, pessimistic, add/remove-one)",
    }


@app.command()
def epsilon(
    sigma: float = SIGMA,
    q: float = Q,
    k: int = K,
    queries: int = QUERIES,
    delta: float = DELTA,
    as_json: bool = JSON_OPTION,
) -> None:
    """Epsilon spent by QUERIES releases with (sigma, q, k).

    Example: dprdm privacy epsilon --sigma 0.2 --q 0.01 --k 18 --queries 1000 --delta 1e-7
    """

    def compute() -> dict:
        params = accounting.MechanismParams(sigma, q, k)
        return _describe(params, accounting.check_queries(queries), accounting.check_delta(delta))

    run_command(as_json, "privacy spent", compute)


@app.command()
def calibrate(
    epsilon: float = EPSILON,
    q: float = Q,
    k: int = K,
    queries: int = QUERIES,
    delta: float = DELTA,
    as_json: bool = JSON_OPTION,
) -> None:
    """Smallest sigma so that QUERIES releases stay within EPSILON (to a relative 1e-4).

    Example: dprdm privacy calibrate --epsilon 10 --q 0.01 --k 20 --queries 1000 --delta 1e-5
    """

    def compute() -> dict:
        sigma = accounting.calibrate_sigma(epsilon, q, k, queries, delta)
        result = {"sigma": sigma}
        result.update(_describe(accounting.MechanismParams(sigma, q, k), queries, delta))
        result["epsilon_target"] = epsilon
        # sigma fits; sigma * (1 - relative_tolerance) does not (both on the enforced epsilon)
        result["relative_tolerance"] = accounting.CALIBRATION_REL_TOL
        return result

    run_command(as_json, "calibrated mechanism", compute)


@app.command("max-queries")
def max_queries(
    sigma: float = SIGMA,
    q: float = Q,
    k: int = K,
    epsilon: float = EPSILON,
    delta: float = DELTA,
    as_json: bool = JSON_OPTION,
) -> None:
    """Largest number of queries with (sigma, q, k) that stays within EPSILON.

    Example: dprdm privacy max-queries --sigma 0.2 --q 0.01 --k 18 --epsilon 1 --delta 1e-7
    """

    def compute() -> dict:
        params = accounting.MechanismParams(sigma, q, k)
        queries = accounting.max_queries(params, epsilon, delta)
        result = {"queries": queries, "epsilon_target": epsilon}
        if queries > 0:
            result["epsilon_at_max"] = accounting.epsilon_for(params, queries, delta)
        result.update(
            {"sigma": params.sigma, "q": params.q, "k": params.k, "delta": delta,
             "noise_multiplier": params.noise_multiplier}
        )
        return result

    run_command(as_json, "query budget", compute)


@app.command("noise-ratio")
def noise_ratio(
    sigma: float = SIGMA,
    k: int = K,
    dim: int = typer.Option(..., "--dim", help="Embedding dimension d of the backend's space."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Expected noise-to-signal ratio of one release: noise norm sigma*sqrt(d) vs the
    aggregate's norm (at most 1).

    Example: dprdm privacy noise-ratio --sigma 0.02 --k 20 --dim 1280
    """
    from dprdm.conditioning import noise_ratio as compute_ratio

    run_command(as_json, "noise-to-signal", lambda: compute_ratio(sigma, k, dim))
