"""Accounting: reference values, an independent PRV bracket, calibration inverses, validation."""

import math

import pytest
from dp_accounting import dp_event

from dprdm.errors import InvalidParameterError
from dprdm.privacy import accounting
from dprdm.privacy.accounting import MechanismParams
from dprdm.privacy.noise import SENSITIVITY_SLACK

REFERENCE = dict(sigma=0.2, q=0.01, k=18, queries=1000, delta=1e-7)


def _paper_mechanism(sigma, q, k):
    """Parameters whose ACCOUNTED multiplier is the paper's sigma * k / 2 (no grid slack): the
    reference notebook accounts the continuous-noise mechanism."""
    return MechanismParams(sigma * (1 + SENSITIVITY_SLACK), q, k)


def test_rdp_matches_reference_notebook():
    params = _paper_mechanism(REFERENCE["sigma"], REFERENCE["q"], REFERENCE["k"])
    assert params.accounted_noise_multiplier == pytest.approx(1.8, rel=1e-12)
    eps, order = accounting.epsilon_rdp([(params, REFERENCE["queries"])], REFERENCE["delta"])
    assert abs(eps - 0.99688) / 0.99688 < 0.002
    assert order == 25


def test_the_enforced_figure_uses_the_grid_inflated_sensitivity():
    params = MechanismParams(REFERENCE["sigma"], REFERENCE["q"], REFERENCE["k"])
    assert params.noise_multiplier == pytest.approx(1.8)
    assert params.accounted_noise_multiplier == pytest.approx(1.8 / (1 + SENSITIVITY_SLACK))
    assert params.event(7) == dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(
        REFERENCE["q"], dp_event.GaussianDpEvent(params.accounted_noise_multiplier)), 7)
    args = (REFERENCE["queries"], REFERENCE["delta"])
    paper = _paper_mechanism(REFERENCE["sigma"], REFERENCE["q"], REFERENCE["k"])
    enforced = accounting.epsilon_for(params, *args)
    assert enforced > accounting.epsilon_for(paper, *args)
    # A 0.1 % smaller multiplier costs a little more, not a lot more.
    assert enforced < 1.01 * accounting.epsilon_for(paper, *args)
    # Unsampled releases too (they are folded into one Gaussian).
    unsampled = MechanismParams(0.5, 1.0, 2)
    folded = accounting.epsilon_for(unsampled, 4, 1e-5)
    assert folded > accounting.epsilon_for(_paper_mechanism(0.5, 1.0, 2), 4, 1e-5)


def test_pld_lies_inside_independent_prv_bracket():
    prv_accountant = pytest.importorskip("prv_accountant")
    params = MechanismParams(REFERENCE["sigma"], REFERENCE["q"], REFERENCE["k"])
    eps = accounting.epsilon_for(params, REFERENCE["queries"], REFERENCE["delta"])
    mechanism = prv_accountant.PoissonSubsampledGaussianMechanism(
        noise_multiplier=params.accounted_noise_multiplier, sampling_probability=params.q
    )
    prv = prv_accountant.PRVAccountant(
        prvs=[mechanism], max_self_compositions=[REFERENCE["queries"]],
        eps_error=0.01, delta_error=1e-10,
    )
    low, _, high = prv.compute_epsilon(
        delta=REFERENCE["delta"], num_self_compositions=[REFERENCE["queries"]]
    )
    assert low <= eps <= high
    # PLD is tighter than RDP here, as it should be.
    assert eps < accounting.epsilon_rdp([(params, REFERENCE["queries"])], REFERENCE["delta"])[0]


def test_noise_multiplier_is_sigma_k_over_two():
    params = MechanismParams(0.2, 0.01, 18)
    assert params.sensitivity == pytest.approx(2 / 18)
    assert params.noise_multiplier == pytest.approx(1.8)


def test_large_query_counts_compose_by_count():
    params = MechanismParams(0.2, 0.01, 18)
    eps_small = accounting.epsilon_for(params, 1000, 1e-7)
    eps_huge = accounting.epsilon_for(params, 10**6, 1e-7)
    assert math.isfinite(eps_huge) and eps_huge > eps_small


def test_epsilon_grows_with_queries_and_q_and_shrinks_with_sigma():
    base = accounting.epsilon_for(MechanismParams(0.2, 0.01, 18), 500, 1e-6)
    assert accounting.epsilon_for(MechanismParams(0.2, 0.01, 18), 1000, 1e-6) > base
    assert accounting.epsilon_for(MechanismParams(0.2, 0.02, 18), 500, 1e-6) > base
    assert accounting.epsilon_for(MechanismParams(0.3, 0.01, 18), 500, 1e-6) < base


def test_unsampled_gaussians_fold_exactly():
    # T unsampled Gaussian releases with multiplier z == one with multiplier z / sqrt(T).
    many = accounting.epsilon_for(MechanismParams(2.0, 1.0, 2), 16, 1e-5)
    one = accounting.epsilon_for(MechanismParams(0.5, 1.0, 2), 1, 1e-5)
    assert many == pytest.approx(one, rel=1e-9)


def test_heterogeneous_composition_counts_every_event():
    a = (MechanismParams(0.2, 0.01, 18), 700)
    b = (MechanismParams(0.1, 0.02, 10), 300)
    delta = 1e-6
    eps_a = accounting.epsilon([a], delta)
    eps_b = accounting.epsilon([b], delta)
    eps_ab = accounting.epsilon([a, b], delta)
    assert max(eps_a, eps_b) < eps_ab <= eps_a + eps_b
    # Order and splitting of identical events do not matter.
    half = (a[0], 350)
    assert accounting.epsilon([b, half, half], delta) == pytest.approx(eps_ab)


def test_calibrate_sigma_reaches_target_without_overshoot():
    sigma = accounting.calibrate_sigma(1.0, 0.01, 18, 1000, 1e-7)
    assert accounting.epsilon_for(MechanismParams(sigma, 0.01, 18), 1000, 1e-7) <= 1.0
    assert accounting.epsilon_for(MechanismParams(sigma * 0.99, 0.01, 18), 1000, 1e-7) > 1.0


def test_max_queries_is_the_exact_boundary():
    params = MechanismParams(0.2, 0.01, 18)
    t_max = accounting.max_queries(params, 1.0, 1e-7)
    assert accounting.epsilon_for(params, t_max, 1e-7) <= 1.0
    assert accounting.epsilon_for(params, t_max + 1, 1e-7) > 1.0
    assert accounting.max_queries(MechanismParams(1e-3, 1.0, 1), 1.0, 1e-7) == 0


def test_calibrate_q_reaches_target_without_overshoot():
    q = accounting.calibrate_q(1.0, 0.2, 18, 1000, 1e-7)
    assert 0 < q < 1
    assert accounting.epsilon_for(MechanismParams(0.2, q, 18), 1000, 1e-7) <= 1.0
    assert accounting.epsilon_for(MechanismParams(0.2, q * 1.02, 18), 1000, 1e-7) > 1.0


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(InvalidParameterError, match="no sigma reaches"):
        accounting.calibrate_sigma(1e-6, 1.0, 1, 10**6, 1e-9)


@pytest.mark.parametrize(
    "sigma,q,k",
    [
        (0.0, 0.01, 10), (-1.0, 0.01, 10), (math.nan, 0.01, 10), (math.inf, 0.01, 10),
        (0.2, 0.0, 10), (0.2, -0.1, 10), (0.2, 1.5, 10), (0.2, math.nan, 10),
        (0.2, 0.01, 0), (0.2, 0.01, 2.5), (0.2, 0.01, True), (0.2, "0.1", 10),
    ],
)
def test_invalid_mechanism_parameters(sigma, q, k):
    with pytest.raises(InvalidParameterError):
        MechanismParams(sigma, q, k)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan, 2.0])
def test_invalid_delta(delta):
    with pytest.raises(InvalidParameterError, match="delta"):
        accounting.epsilon_for(MechanismParams(0.2, 0.01, 18), 10, delta)


@pytest.mark.parametrize("queries", [0, -5, 1.5])
def test_invalid_query_count(queries):
    with pytest.raises(InvalidParameterError, match="queries"):
        accounting.epsilon_for(MechanismParams(0.2, 0.01, 18), queries, 1e-5)


def test_q_equal_one_means_no_subsampling_and_q_zero_is_refused():
    assert MechanismParams(0.2, 1, 18).q == 1.0
    with pytest.raises(InvalidParameterError, match="q = 0 is not allowed"):
        MechanismParams(0.2, 0, 18)
