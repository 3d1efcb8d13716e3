"""Accounting: reference values, an independent PRV bracket, calibration inverses, validation."""

import math

import numpy as np
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


# --- issue 13 item 6: the accountant under extreme parameters --------------------------------


def test_pld_accountant_is_bit_for_bit_the_stock_one():
    # The shortcut (no size ** T, memoised one-release PLD) must not change a single bit.
    from dp_accounting.pld import pld_privacy_accountant

    cases = [(MechanismParams(2.5, 0.1, 40), 2), (MechanismParams(2.5, 0.1, 40), 300),
             (MechanismParams(5.0, 1.0, 4), 50)]
    for params, count in cases:
        event = params.event(count)
        for interval in (4e-4, 1.6e-3):
            stock = pld_privacy_accountant.PLDAccountant(
                neighboring_relation=accounting.ADJACENCY, value_discretization_interval=interval
            ).compose(event).get_epsilon(1e-6)
            ours = accounting._pld_accountant(interval).compose(event).get_epsilon(1e-6)
            assert ours == stock


def test_rdp_from_memoised_curves_matches_the_stock_accountant():
    groups = ((MechanismParams(0.2, 0.01, 18), 700), (MechanismParams(0.1, 0.02, 10), 300),
              (MechanismParams(1.0, 1.0, 4), 20))
    stock = accounting._rdp_accountant().compose(accounting._accounting_event(groups))
    eps, order = stock.get_epsilon_and_optimal_order(1e-6)
    assert accounting.epsilon_rdp(groups, 1e-6) == (pytest.approx(eps, rel=1e-12), order)


def test_enforced_epsilon_is_the_smaller_upper_bound(monkeypatch):
    params = MechanismParams(0.2, 0.01, 18)
    eps_rdp = accounting.epsilon_rdp([(params, 1000)], 1e-7)[0]
    assert accounting.epsilon_for(params, 1000, 1e-7) < eps_rdp  # PLD, the tighter, here
    # Far out the PLD's rounding dominates: the RDP bound is enforced (and the cap is reachable).
    huge = MechanismParams(200.0, 1e-6, 10)  # z = 1000
    assert accounting.epsilon_for(huge, 10**12, 1e-5) == pytest.approx(
        accounting.epsilon_rdp([(huge, 10**12)], 1e-5)[0])
    assert accounting.max_queries(huge, 1.0, 1e-5) == accounting.MAX_QUERIES_SEARCHED
    # Past PLD_MAX_RELEASES = 1e7 the PLD is not even built (z = 100, q = 1e-3, 3e7 releases:
    # PLD 0.55, RDP 0.20, and 3 s per PLD evaluation).
    many = MechanismParams(20.0, 1e-3, 10)
    count = 3 * 10**7
    monkeypatch.setattr(accounting, "_pld_epsilon", lambda *args: pytest.fail("PLD built"))
    assert accounting.epsilon_for(many, count, 1e-5) == (
        accounting.epsilon_rdp([(many, count)], 1e-5)[0])


@pytest.mark.parametrize(
    "z,q,epsilon,delta,k",
    [
        (50.0, 0.1, 10.0, 1e-5, 40),    # the reproduced 45 s case
        (1000.0, 1.0, 1.0, 1e-5, 10),   # largest z of the goal grid, no subsampling
        (1e6, 1.0, 0.1, 1e-10, 1),      # largest supported z, smallest epsilon and delta
        (0.3, 1.0, 100.0, 1e-3, 10),    # smallest z of the goal grid, largest epsilon and delta
        (0.3, 0.1, 100.0, 1e-10, 100),
        (100.0, 1e-3, 1.0, 1e-5, 10),   # T ~ 6e8: RDP alone (a PLD evaluation took 70 s there)
    ],
)
def test_max_queries_is_the_exact_boundary_across_the_grid(z, q, epsilon, delta, k):
    params = MechanismParams(2 * z / k, q, k)
    t_max = accounting.max_queries(params, epsilon, delta)
    assert 0 < t_max < accounting.MAX_QUERIES_SEARCHED
    assert accounting.epsilon_for(params, t_max, delta) <= epsilon
    assert accounting.epsilon_for(params, t_max + 1, delta) > epsilon


def test_max_queries_at_the_corners_of_the_supported_range():
    assert accounting.max_queries(MechanismParams(2e-4, 1.0, 1), 100.0, 1e-3) == 0  # z = 1e-4
    assert accounting.max_queries(MechanismParams(2e6, 1e-9, 1), 1e-3, 1e-12) == (
        accounting.MAX_QUERIES_SEARCHED)  # z = 1e6, q = 1e-9


def test_calibrations_at_the_corners():
    sigma = accounting.calibrate_sigma(100.0, 1.0, 100, 37, 1e-10)
    assert accounting.epsilon_for(MechanismParams(sigma, 1.0, 100), 37, 1e-10) <= 100.0
    assert accounting.epsilon_for(MechanismParams(sigma * 0.999, 1.0, 100), 37, 1e-10) > 100.0
    q = accounting.calibrate_q(1.0, 200.0, 10, 10**6, 1e-5)  # z = 1000
    assert accounting.epsilon_for(MechanismParams(200.0, q, 10), 10**6, 1e-5) <= 1.0
    assert accounting.epsilon_for(MechanismParams(200.0, q * 1.001, 10), 10**6, 1e-5) > 1.0


@pytest.mark.parametrize(
    "sigma,q,k,match",
    [
        (1e-300, 0.1, 40, "noise multiplier .* outside the supported range"),
        (1e300, 0.1, 40, "noise multiplier .* outside the supported range"),
        (1e6, 0.1, 40, "noise multiplier .* outside the supported range"),  # z = 2e7
        (1e-5, 1.0, 10, "noise multiplier .* outside the supported range"),  # z = 5e-5
        (0.2, 1e-12, 18, "q must be >= 1e-09"),
        (0.2, 0.01, 10**6, "k must be <= 100000"),
    ],
)
def test_parameters_outside_the_supported_range_are_refused(sigma, q, k, match):
    with pytest.raises(InvalidParameterError, match=match):
        MechanismParams(sigma, q, k)


def test_budgets_and_counts_outside_the_supported_range_are_refused():
    params = MechanismParams(0.2, 0.01, 18)
    with pytest.raises(InvalidParameterError, match="queries must be <= 1e"):
        accounting.epsilon_for(params, 10**13, 1e-5)
    with pytest.raises(InvalidParameterError, match="delta must be >= 1e-12"):
        accounting.epsilon_for(params, 10, 1e-300)
    with pytest.raises(InvalidParameterError, match="epsilon must be in"):
        accounting.max_queries(params, 1e300, 1e-5)
    # The ends of the ranges themselves are accepted.
    MechanismParams(2e-4, accounting.Q_MIN, 1)
    MechanismParams(2e6 / accounting.K_MAX, 1.0, accounting.K_MAX)
    assert accounting.epsilon_for(params, accounting.MAX_QUERIES, 1e-12) > 0


# --- the searches: located on a coarse proxy, decided on the enforced figure ----------------


def test_settle_decides_on_the_enforced_cost_wherever_the_proxy_pointed():
    calls = []

    def cost(t):  # boundary at T = 10,000 for a target of 1
        calls.append(t)
        return math.sqrt(t) / 100

    for start in (1, 9_990, 10_000, 10_001, 50_000, 10**9):
        assert accounting._settle(cost, 1.0, start, 1, 10**12, tol=1, integer=True) == 10_000
    calls.clear()  # a proxy that pointed at the boundary costs two evaluations
    assert accounting._settle(cost, 1.0, 10_000, 1, 10**12, tol=1, integer=True) == 10_000
    assert set(calls) == {10_000, 10_001}  # (_boundary re-reads both ends: cached in use)
    # Continuous and decreasing (like sigma): the answer fits, one tolerance step down fails.
    for start in (0.2, 0.9999, 1.37, 900.0):
        z = accounting._settle(lambda z: 1 / z, 1.0, start, 1000.0, 0.1, rel_tol=1e-4)
        assert 1 / z <= 1.0 < 1 / (z * (1 - 1e-4))
    # The ends of the range: all fit -> the last point; none fits -> None, after trying `first`.
    assert accounting._settle(lambda t: 0.0, 1.0, 5, 1, 100, tol=1, integer=True) == 100
    calls.clear()
    assert accounting._settle(lambda t: calls.append(t) or 2.0, 1.0, 5, 1, 100, tol=1,
                              integer=True) is None
    assert calls[-1] == 1


def test_settle_re_aims_only_from_a_finite_positive_figure():
    # The re-aim rescales the proxy by the enforced figure: an infinite (or zero) one would
    # divide by it. Such points are stepped over instead, and the boundary is still exact.
    seen = []

    def reaim(x, value):
        seen.append(value)
        return x

    cost = lambda t: math.inf if t > 50 else t / 100  # noqa: E731
    assert accounting._settle(cost, 0.3, 60, 1, 100, tol=1, integer=True, reaim=reaim) == 30
    assert seen and all(0 < value < math.inf for value in seen)


def test_small_noise_searches_locate_on_the_proxy_and_stay_exact(monkeypatch):
    # The proxy serves small noise multipliers, where one enforced PLD build takes seconds
    # (z = 0.3, q = 1e-6, epsilon 1: 6e4 grid points; bench/accounting.py checks the answers
    # there). Here the cheapest such case (z = 0.5, q = 0.1, epsilon 8: 2.4e4 points): the
    # searches build only a few enforced one-release PLDs, and their answers are exact on
    # epsilon_for.
    k, q, target, delta = 10, 0.1, 8.0, 1e-5
    params = MechanismParams(2 * 0.5 / k, q, k)
    proxy_interval = accounting.PROXY_COARSENING * accounting._pld_interval(target)
    built = set()
    stock = accounting._subsampled_gaussian_pld

    def counting(z, q, interval):
        if interval < proxy_interval:
            built.add((z, q, interval))
        return stock(z, q, interval)

    monkeypatch.setattr(accounting, "_subsampled_gaussian_pld", counting)
    assert accounting._coarse_proxy_resolves(params, target)  # the coarse proxy is in use
    built.clear()
    t_max = accounting.max_queries(params, target, delta)
    assert len(built) == 1  # one enforced build, shared by every T tried (before: 2)
    assert accounting.epsilon_for(params, t_max, delta) <= target
    assert accounting.epsilon_for(params, t_max + 1, delta) > target
    built.clear()
    sigma = accounting.calibrate_sigma(target, q, k, t_max, delta)
    assert len(built) <= 3  # z near the answer, and z = 1000 (range check) (before: 6)
    assert accounting.epsilon_for(MechanismParams(sigma, q, k), t_max, delta) <= target
    assert accounting.epsilon_for(MechanismParams(sigma * (1 - 1e-4), q, k), t_max, delta) > target
    built.clear()
    q_max = accounting.calibrate_q(target, params.sigma, k, t_max, delta)
    assert len(built) <= 4  # (before: 12)
    assert accounting.epsilon_for(MechanismParams(params.sigma, q_max, k), t_max, delta) <= target
    assert accounting.epsilon_for(
        MechanismParams(params.sigma, q_max * (1 + 1e-4), k), t_max, delta) > target


def test_a_proxy_off_by_a_few_percent_is_rescaled_not_dropped(monkeypatch):
    # The slowest corner of bench/accounting.py (z = 0.3, q = 1e-6, epsilon 0.1, delta 1e-3,
    # k = 100): the coarse proxy is 4 % pessimistic at its answer (more than AIM_GAP, less than
    # PROXY_TRUST). The search is not redone from the RDP bracket (~10 enforced evaluations of
    # 0.5 s): _settle re-aims with the rescaled proxy and keeps the fitting start, so a few
    # enforced evaluations bracket the boundary; the answer is exact on epsilon_for.
    k, sigma, target, delta, queries = 100, 2 * 0.3 / 100, 0.1, 1e-3, 46953
    searches, evaluated = [], []
    search, enforced = accounting._calibrate_q, accounting.epsilon_for

    def recording(*args):
        searches.append(args[-1])  # allow_coarse
        return search(*args)

    def counting(params, count, d):
        evaluated.append(params.q)
        return enforced(params, count, d)

    monkeypatch.setattr(accounting, "_calibrate_q", recording)
    monkeypatch.setattr(accounting, "epsilon_for", counting)
    q_max = accounting.calibrate_q(target, sigma, k, queries, delta)
    monkeypatch.setattr(accounting, "epsilon_for", enforced)
    assert searches == [True]  # the proxy was kept
    assert len(set(evaluated)) <= 5  # (dropping it: 10)
    assert accounting.epsilon_for(MechanismParams(sigma, q_max, k), queries, delta) <= target
    assert accounting.epsilon_for(
        MechanismParams(sigma, q_max * (1 + 1e-4), k), queries, delta) > target


def test_a_proxy_that_disagrees_with_the_enforced_figure_is_dropped(monkeypatch):
    # Where the coarse grid's rounding adds up (many releases), the proxy can be off by a factor;
    # the search then starts again on epsilon_for alone. PROXY_TRUST = 0 forces that path.
    monkeypatch.setattr(accounting, "PROXY_TRUST", 0.0)
    params = MechanismParams(0.1, 0.1, 10)  # z = 0.5: the proxy would be used
    accounting._max_queries.cache_clear()
    t_max = accounting.max_queries(params, 8.0, 1e-5)
    assert accounting._max_queries.cache_info().misses == 2  # with the proxy, then without
    assert accounting.epsilon_for(params, t_max, 1e-5) <= 8.0
    assert accounting.epsilon_for(params, t_max + 1, 1e-5) > 8.0
    accounting._max_queries.cache_clear()


# --- pld_fast: the library's PLD steps without Python loops, bit for bit ---------------------


def _same_pmf(ours, stock):
    from dp_accounting.pld import pld_pmf

    assert type(ours) is type(stock)
    assert ours._infinity_mass == stock._infinity_mass
    if isinstance(stock, pld_pmf.DensePLDPmf):
        assert ours._lower_loss == stock._lower_loss
        assert np.array_equal(ours._probs, stock._probs)
    else:
        assert ours._loss_probs == stock._loss_probs


def _same_pld(ours, stock):
    assert ours._symmetric == stock._symmetric
    _same_pmf(ours._pmf_remove, stock._pmf_remove)
    if not stock._symmetric:
        _same_pmf(ours._pmf_add, stock._pmf_add)


@pytest.mark.parametrize(
    "z,q,interval",
    [
        (0.3, 1e-6, 1.6e-3),   # the small-noise corner (dense: 1.5e4 points per adjacency)
        (0.5, 0.1, 1e-3),
        (0.5, 0.999, 2e-3),    # q near 1: grid points near the subsampling bound log(1 - q)
        (2.5, 0.1, 4e-4),
        (1.0, 1.0, 1e-3),      # no subsampling (one symmetric PMF)
        (50.0, 0.1, 1.6e-3),   # sparse (< 1000 points)
        (1000.0, 1e-6, 1e-4),
    ],
)
def test_fast_one_release_build_is_bit_for_bit_the_library(z, q, interval):
    from dp_accounting.pld import privacy_loss_distribution

    from dprdm.privacy import pld_fast

    stock = privacy_loss_distribution.from_gaussian_mechanism(
        z, value_discretization_interval=interval, sampling_prob=q,
        neighboring_relation=accounting.ADJACENCY)
    _same_pld(pld_fast.gaussian_pld(z, interval, q), stock)


def test_reused_pld_and_fft_give_the_figure_of_a_fresh_stock_accountant():
    # A search evaluates many T with one memoised one-release PLD, memoised tail bounds and a
    # forward FFT shared by neighbouring T; every figure must equal a fresh stock accountant's.
    from dp_accounting.pld import pld_privacy_accountant

    from dprdm.privacy import pld_fast

    accounting._subsampled_gaussian_pld.cache_clear()
    pld_fast._spectra.clear()
    params = MechanismParams(2 * 0.4 / 10, 1e-3, 10)  # z = 0.4: a dense one-release PLD
    interval = 2e-3
    counts = (1, 300, 5000, 5001, 5003, 300)
    ours = {}
    for count in counts:  # reuses: the PLD always, tail bounds always, the FFT from 5001 on
        event = params.event(count)
        accountant = accounting._pld_accountant(interval).compose(event)
        ours[count] = [accountant.get_epsilon(delta) for delta in (1e-3, 1e-6, 1e-10)]
    assert accounting._subsampled_gaussian_pld.cache_info().misses == 1
    if pld_fast.numpy_matches_scalar_math():  # else (e.g. AVX-512) the library's code ran
        fft_lengths = {key[1] for key in pld_fast._spectra}
        assert len(pld_fast._spectra) < 2 * len(set(counts))  # (5000, 5001, 5003 share one FFT)
        assert len(fft_lengths) >= 2
    for count in counts:
        stock = pld_privacy_accountant.PLDAccountant(
            neighboring_relation=accounting.ADJACENCY, value_discretization_interval=interval
        ).compose(params.event(count))
        assert ours[count] == [stock.get_epsilon(delta) for delta in (1e-3, 1e-6, 1e-10)]
        _same_pld(accounting._pld_accountant(interval).compose(params.event(count))._pld,
                  stock._pld)


def test_block_epsilon_for_delta_is_the_library_loop():
    # Random dense PMFs (spanning several blocks, or a handful of points), every branch of the
    # loop: infinite mass above delta, a stop inside a block, at its edge, never, and losses so
    # large that exp(-loss) underflows.
    from dp_accounting.pld import pld_pmf

    from dprdm.privacy import pld_fast

    rng = np.random.default_rng(7)
    for size, lower, interval, infinity in ((20_000, -9_000, 1e-4, 1e-9), (3, 0, 0.5, 0.0),
                                            (pld_fast._BLOCK + 1, -100, 1e-3, 1e-7),
                                            (5_000, 1_000_000, 1e-3, 0.0),
                                            (2_000, -1_000, 1e-2, 0.2)):
        probs = rng.exponential(size=size)
        probs *= (1 - infinity) / probs.sum()
        pmf = pld_pmf.DensePLDPmf(interval, lower, probs, infinity, True)
        for delta in (0.5, 0.1, 1e-3, 1e-6, 1e-9, 1e-12):
            assert pld_fast.epsilon_for_delta_dense(pmf, delta) == pmf.get_epsilon_for_delta(
                delta)


def test_fast_paths_hand_over_to_the_library_where_numpy_rounds_differently(monkeypatch):
    from dp_accounting.pld import pld_pmf, privacy_loss_distribution

    from dprdm.privacy import pld_fast

    assert isinstance(pld_fast.numpy_matches_scalar_math(), bool)
    monkeypatch.setattr(pld_fast, "numpy_matches_scalar_math", lambda: False)
    used = []
    stock_build = privacy_loss_distribution.from_gaussian_mechanism
    monkeypatch.setattr(privacy_loss_distribution, "from_gaussian_mechanism",
                        lambda *a, **kw: used.append("build") or stock_build(*a, **kw))
    stock_compose = pld_pmf.DensePLDPmf.self_compose
    monkeypatch.setattr(pld_pmf.DensePLDPmf, "self_compose",
                        lambda self, *a, **kw: used.append("compose") or stock_compose(
                            self, *a, **kw))
    pld = pld_fast.gaussian_pld(0.5, 1e-3, 0.1)
    composed = pld_fast.self_compose_dense(pld._pmf_remove, 7)
    assert used == ["build", "compose"]
    assert pld_fast.epsilon_for_delta_dense(composed, 1e-5) == composed.get_epsilon_for_delta(
        1e-5)


def test_fast_tail_bounds_are_scipys_logsumexp_bit_for_bit():
    # The 40 log-MGFs of compute_self_convolve_bounds: real one-release PMFs (dense, with and
    # without zero masses), and odd arrays (zeros at the ends, one or two points, -0.0 weights);
    # all-zero or negative weights hand over to scipy itself.
    from scipy import special

    from dprdm.privacy import pld_fast

    pld = pld_fast.gaussian_pld(0.3, 1.6e-3, 1e-6)
    rng = np.random.default_rng(11)
    arrays = [pld._pmf_remove._probs, pld._pmf_add._probs,
              np.concatenate([[0.0, -0.0], rng.exponential(size=500), [0.0] * 7]),
              np.array([0.25]), np.array([0.0, 1e-300]), np.array([0.7, 0.0]),
              np.array([0.0, 0.0, 0.0]), np.array([0.5, -1e-3, 0.5]),
              rng.exponential(size=3000) * (rng.uniform(size=3000) < 0.2)]
    for probs in arrays:
        orders = np.concatenate((np.arange(-20, 0), np.arange(1, 21))) / len(probs)
        with np.errstate(all="ignore"):
            stock = np.array([special.logsumexp(np.arange(len(probs)) * order, b=probs)
                              for order in orders])
            ours = np.array(pld_fast._log_mgfs_of(probs, orders))
        assert np.array_equal(ours, stock, equal_nan=True)


def _cold_caches():
    from dprdm.privacy import pld_fast

    for value in vars(accounting).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()
    pld_fast._log_mgfs.clear()
    pld_fast._spectra.clear()


def test_a_dropped_proxy_calibration_gives_the_stock_arithmetics_answer(monkeypatch):
    # A dropped proxy (off by more than PROXY_TRUST) redoes the calibration on epsilon_for alone:
    # ~10 enforced evaluations, whose tail bounds (pld_fast._log_mgfs_of) and RDP curves
    # (memoised _log_comb) were sped up. That path, cheaply (calibrate_sigma for one release at
    # q = 0.1, epsilon 30: z = 0.19; PROXY_TRUST = 0 forces the drop): the answer must be that
    # of scipy's logsumexp and the unmemoised _log_comb.
    from dp_accounting.rdp import rdp_privacy_accountant
    from scipy import special

    from dprdm.privacy import pld_fast

    monkeypatch.setattr(accounting, "PROXY_TRUST", 0.0)
    dropped = []
    search = accounting._calibrate_sigma

    def recording(*args):
        dropped.append(args[-1])  # allow_coarse: False once the proxy is dropped
        return search(*args)

    monkeypatch.setattr(accounting, "_calibrate_sigma", recording)

    def answer():
        _cold_caches()
        return accounting.calibrate_sigma(30.0, 0.1, 10, 1, 1e-5)

    fast = answer()
    assert dropped == [True, False]
    assert hasattr(rdp_privacy_accountant._log_comb, "cache_info")
    monkeypatch.setattr(rdp_privacy_accountant, "_log_comb",
                        rdp_privacy_accountant._log_comb.__wrapped__)
    monkeypatch.setattr(pld_fast, "_log_mgfs_of", lambda probs, orders: [
        special.logsumexp(np.arange(len(probs)) * order, b=probs) for order in orders])
    assert answer() == fast
    _cold_caches()
