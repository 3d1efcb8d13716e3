"""Privacy accounting for DP-RDM releases.

Owns the translation from "what was released" to "how much privacy it cost":

* :class:`MechanismParams` -- the (sigma, q, k) of the private retrieval step, validated.
* :func:`release_event` -- the dp_accounting ``DpEvent`` for T releases with those parameters,
  and for a whole ledger of heterogeneous releases.
* :func:`epsilon` -- the ENFORCED figure: Google dp_accounting's PLD accountant, pessimistic
  estimate, add/remove-one adjacency (or the RDP bound, where that is the smaller upper bound).
  :func:`epsilon_rdp` -- an RDP figure reported beside it.
* :func:`calibrate_sigma`, :func:`max_queries`, :func:`calibrate_q` -- the inverses: searches
  bracketed by the cheap RDP bound, located on a coarse-grid PLD where the enforced one is slow
  to build (small noise multipliers), and settled on :func:`epsilon` itself, so their answer
  never overshoots the figure the ledger enforces (max_queries: T fits, T + 1 does not;
  calibrations: to a relative CALIBRATION_REL_TOL = 1e-4).
* the supported parameter ranges (NOISE_MULTIPLIER_BOUNDS, Q_MIN, K_MAX, MAX_QUERIES,
  EPSILON_MAX, DELTA_MIN), refused with InvalidParameterError outside.

The mechanism (see ``mechanism.py``): one release is a = (1/k) * sum of k unit-norm neighbours of
the query inside a Poisson(q) subsample of the private set (zero-filled), plus N(0, sigma^2 I).
Adding or removing one record moves a by at most 2/k in L2, so each release is a
Poisson-subsampled Gaussian mechanism with noise multiplier z = sigma / (2/k) = sigma * k / 2.
The released aggregate is rounded to a grid (``noise.py``), which adds up to 0.1 % to the
sensitivity: the accountant uses (2/k) * (1 + SENSITIVITY_SLACK), i.e. the ACCOUNTED multiplier
``accounted_noise_multiplier`` = z / (1 + SENSITIVITY_SLACK).
Repeated releases are composed by count (``SelfComposedDpEvent``), never one by one, so T = 1e6
costs a few FFTs, not a million.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import dp_event
from dp_accounting.pld import pld_pmf, pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from dprdm.errors import InvalidParameterError
from dprdm.privacy.pld_fast import epsilon_for_delta_dense, gaussian_pld, self_compose_dense
from dprdm.privacy.noise import SENSITIVITY_SLACK

# dp_accounting's RDP code logs a warning per order it cannot evaluate (and then excludes it,
# which only loosens the bound); that is noise for our users.
absl_logging.set_verbosity(absl_logging.ERROR)

# dp_accounting's RDP of a subsampled Gaussian sums, for each order alpha, up to alpha + 1 terms
# with a log binomial coefficient each (three scipy gammaln calls: ~45 % of an RDP curve, the
# same values for every noise multiplier and q). The function is pure, so it is memoised where
# the library looks it up (a module global): the same values, computed once per process.
# pylint: disable=protected-access  # dp_accounting is pinned (==0.6.0)
if not hasattr(rdp_privacy_accountant._log_comb, "cache_info"):
    rdp_privacy_accountant._log_comb = functools.lru_cache(maxsize=65536)(
        rdp_privacy_accountant._log_comb)
# pylint: enable=protected-access

ADJACENCY = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

# PLD discretisation of the privacy-loss axis. The PLD accountant is pessimistic: a coarser grid
# can only over-state epsilon, never under-state it.
PLD_DISCRETIZATION = 1e-4

# RDP orders: the reference notebook's (opacus) grid, extended upwards for small-noise settings.
RDP_ORDERS = (
    [1.1 + 0.1 * i for i in range(99)]
    + list(range(11, 64))
    + [80, 96, 128, 192, 256, 512, 1024]
)

# Calibration searches noise multipliers z = sigma * k / 2 in this range. Below it the PLD of a
# single query is huge and slow to build; above it the noise swamps any unit-norm signal.
NOISE_MULTIPLIER_RANGE = (0.1, 1000.0)
MAX_QUERIES_SEARCHED = 10**12

# Supported parameters (docs/privacy.md, "The accountant"). Outside them the accountants overflow, divide
# by zero or take hours; every entry point refuses them with an InvalidParameterError (exit 2).
NOISE_MULTIPLIER_BOUNDS = (1e-4, 1e6)  # z = sigma * k / 2; 1e-4 already costs epsilon > 1e6
Q_MIN = 1e-9  # smallest Poisson sampling rate
K_MAX = 100_000  # neighbours averaged per query
MAX_QUERIES = MAX_QUERIES_SEARCHED  # releases in one accounting question (and max_queries' cap)
EPSILON_MAX = 1e6  # largest epsilon target or budget
DELTA_MIN = 1e-12  # smallest delta: the PLD truncates tails of mass 1e-15
# Above this epsilon (RDP bound) no PLD is built: the RDP bound is reported as the enforced figure.
RDP_ONLY_ABOVE = 1000.0
# Above this many releases neither: the PLD's pessimistic rounding, which grows with the number of
# compositions, makes it looser than RDP there and slow (z = 100, q = 1e-3: 3e7 releases PLD
# 0.55 vs RDP 0.20, 3 s; 1e8: 1.06 vs 0.38, 11 s; 6e8: 2.9 vs 1.0, 70 s; z = 1000, q = 0.1: 3e7
# releases PLD 2.94 vs RDP 2.40; at 1e7, 1.3070 vs 1.3099, the last point where the PLD won).
PLD_MAX_RELEASES = 10**7


def _finite_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be finite, got {value}")
    return value


def _whole_number(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidParameterError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise InvalidParameterError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_delta(delta: object) -> float:
    delta = _finite_number("delta", delta)
    if not 0.0 < delta < 1.0:
        raise InvalidParameterError(f"delta must be in (0, 1), got {delta}")
    if delta < DELTA_MIN:
        raise InvalidParameterError(
            f"delta must be >= {DELTA_MIN:g} (the supported range is [{DELTA_MIN:g}, 1)), "
            f"got {delta:g}"
        )
    return delta


def check_epsilon(epsilon: object) -> float:
    epsilon = _finite_number("epsilon", epsilon)
    if not 0.0 < epsilon <= EPSILON_MAX:
        raise InvalidParameterError(f"epsilon must be in (0, {EPSILON_MAX:g}], got {epsilon:g}")
    return epsilon


def check_queries(queries: object) -> int:
    queries = _whole_number("queries", queries, 1)
    if queries > MAX_QUERIES:
        raise InvalidParameterError(f"queries must be <= {MAX_QUERIES:.0e}, got {queries}")
    return queries


def check_q(q: object) -> float:
    q = _finite_number("q", q)
    if not 0.0 < q <= 1.0:
        raise InvalidParameterError(
            f"q must be in (0, 1] (q = 1 means no subsampling; q = 0 is not allowed), got {q}"
        )
    if q < Q_MIN:
        raise InvalidParameterError(f"q must be >= {Q_MIN:g} (supported: [{Q_MIN:g}, 1]), got {q:g}")
    return q


def check_k(k: object) -> int:
    k = _whole_number("k", k, 1)
    if k > K_MAX:
        raise InvalidParameterError(f"k must be <= {K_MAX} (supported: [1, {K_MAX}]), got {k}")
    return k


def check_noise_multiplier(params: MechanismParams) -> None:
    """The accountants' supported range of z = sigma * k / 2 (see NOISE_MULTIPLIER_BOUNDS)."""
    low, high = NOISE_MULTIPLIER_BOUNDS
    z = params.noise_multiplier
    if not low <= z <= high:
        raise InvalidParameterError(
            f"noise multiplier sigma*k/2 = {z:.4g} (sigma={params.sigma:g}, k={params.k}) is "
            f"outside the supported range [{low:g}, {high:g}]: "
            + ("so little noise gives no privacy at all" if z < low
               else "so much noise drowns any retrieved signal")
        )


@dataclass(frozen=True, order=True)
class MechanismParams:
    """Parameters of one private retrieval step: noise std sigma, sampling rate q, neighbours k."""

    sigma: float
    q: float
    k: int

    def __post_init__(self) -> None:
        sigma = _finite_number("sigma", self.sigma)
        if sigma <= 0.0:
            raise InvalidParameterError(f"sigma must be > 0, got {sigma}")
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "q", check_q(self.q))
        object.__setattr__(self, "k", check_k(self.k))
        check_noise_multiplier(self)

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the aggregate under add/remove-one: one neighbour swaps, 2/k."""
        return 2.0 / self.k

    @property
    def noise_multiplier(self) -> float:
        """Noise std in units of the sensitivity: sigma * k / 2."""
        return self.sigma * self.k / 2.0

    @property
    def accounted_noise_multiplier(self) -> float:
        """The multiplier every accountant uses: sigma over the grid-inflated sensitivity
        (2/k) * (1 + SENSITIVITY_SLACK) (see noise.py), i.e. noise_multiplier / (1 + slack)."""
        return self.noise_multiplier / (1.0 + SENSITIVITY_SLACK)

    def event(self, count: int = 1) -> dp_event.DpEvent:
        """The DpEvent for `count` releases with these parameters."""
        count = check_queries(count)
        one: dp_event.DpEvent = dp_event.GaussianDpEvent(self.accounted_noise_multiplier)
        if self.q < 1.0:
            one = dp_event.PoissonSampledDpEvent(self.q, one)
        return one if count == 1 else dp_event.SelfComposedDpEvent(one, count)


Releases = Iterable[tuple[MechanismParams, int]]


def _grouped(releases: Releases) -> tuple[tuple[MechanismParams, int], ...]:
    """Sums counts per distinct parameter set; a canonical, hashable form of a ledger."""
    totals: Counter[MechanismParams] = Counter()
    for params, count in releases:
        totals[params] += check_queries(count)
    return tuple(sorted(totals.items()))


def release_event(releases: Releases) -> dp_event.DpEvent:
    """One DpEvent for a whole ledger: releases with equal parameters are composed by count."""
    groups = _grouped(releases)
    if not groups:
        return dp_event.NoOpDpEvent()
    events = [params.event(count) for params, count in groups]
    return events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events)


def _accounting_event(groups: tuple[tuple[MechanismParams, int], ...]) -> dp_event.DpEvent:
    """The event handed to the accountants: unsampled (q = 1) Gaussian releases are folded
    into ONE Gaussian with 1/z^2 = sum(count / z_i^2). That is exact (Gaussian mechanisms compose
    into a Gaussian mechanism) and keeps the PLD of many unsampled queries small."""
    precision = sum(count / p.accounted_noise_multiplier**2 for p, count in groups if p.q == 1.0)
    events = [p.event(count) for p, count in groups if p.q < 1.0]
    if precision > 0.0:
        events.append(dp_event.GaussianDpEvent(1.0 / math.sqrt(precision)))
    if not events:
        return dp_event.NoOpDpEvent()
    return events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events)


def _pld_interval(epsilon_scale: float) -> float:
    """Grid of the privacy-loss axis for an answer of about `epsilon_scale`.

    The PLD accountant rounds pessimistically, so ANY grid gives an upper bound on epsilon; a grid
    proportional to the answer keeps the relative error near 1e-4, the time near 0.1 s and the
    memory bounded (a fixed 1e-4 grid needs gigabytes once epsilon is in the thousands). The grid
    is PLD_DISCRETIZATION times a power of two (rounded down, so never coarser than
    scale * 1e-4): neighbouring query counts then share one grid, and the PLD of one release on
    it is built once per search (see _subsampled_gaussian_pld). Capped at 1 nat, beyond which the
    PLD code overflows.
    """
    doublings = math.floor(math.log2(max(1.0, epsilon_scale)))
    return min(1.0, PLD_DISCRETIZATION * 2.0**doublings)


def _pld_epsilon(event: dp_event.DpEvent, delta: float, interval: float) -> float:
    return float(_pld_accountant(interval).compose(event).get_epsilon(delta))


def _pld_accountant(interval: float = PLD_DISCRETIZATION) -> pld_privacy_accountant.PLDAccountant:
    return _PLDAccountant(neighboring_relation=ADJACENCY, value_discretization_interval=interval)


class _PLDAccountant(pld_privacy_accountant.PLDAccountant):
    """dp_accounting's PLD accountant, with the same results and without two slow steps.

    1. For T releases of a Poisson-subsampled Gaussian whose one-release PLD is stored sparsely,
       dp_accounting 0.6.0 (``SparsePLDPmf.self_compose``) first evaluates ``size ** T`` as an
       exact integer -- millions of digits when T is ~1e6, tens of seconds of big-integer
       arithmetic -- only to decide that the result must be dense; then it converts to dense and
       composes. Here the same decision is taken with logarithms and the same dense composition
       runs directly.
    2. The PLD of ONE release is memoised per (z, q, grid), so a search over T builds it once,
       and built by pld_fast.gaussian_pld (the library's Python loops over up to 1e6 grid points
       done in numpy: 3.4 s -> 0.13 s at z = 0.3, q = 1e-6 on a 1e-4 grid).
    3. T-fold self-composition of a dense PMF (pld_fast.self_compose_dense) reuses the PMF's
       tail bounds and FFT across T, and epsilon-for-delta (pld_fast.epsilon_for_delta_dense)
       runs the library's loop in numpy blocks.
    The PLD, and every epsilon, is bit-for-bit the stock accountant's (tests/test_accounting.py;
    pld_fast hands over to the library where numpy's rounding would differ).
    """

    def _maybe_compose(self, event: dp_event.DpEvent, count: int,
                       do_compose: bool) -> object:
        if (do_compose and isinstance(event, dp_event.PoissonSampledDpEvent)
                and isinstance(event.event, dp_event.GaussianDpEvent)
                and event.sampling_probability > 0 and event.event.noise_multiplier > 0
                and self.neighboring_relation == ADJACENCY):
            one = _subsampled_gaussian_pld(event.event.noise_multiplier,
                                           event.sampling_probability,
                                           self._value_discretization_interval)
            self._pld = self._pld.compose(_self_compose(one, count))
            return None
        if (do_compose and isinstance(event, dp_event.GaussianDpEvent)
                and event.noise_multiplier > 0 and self.neighboring_relation == ADJACENCY):
            one = _gaussian_pld(event.noise_multiplier / math.sqrt(count),
                                self._value_discretization_interval)
            self._pld = self._pld.compose(one)
            return None
        return super()._maybe_compose(event, count, do_compose)

    def get_epsilon(self, target_delta: float) -> float:
        """PLDAccountant.get_epsilon: the PLD's get_epsilon_for_delta (max over the two
        adjacencies), dense PMFs through pld_fast's block version of the same loop."""
        if self._contains_non_dp_event:
            return math.inf
        # pylint: disable=protected-access  # dp_accounting is pinned (==0.6.0)
        pld = self._pld
        pmfs = [pld._pmf_remove] if pld._symmetric else [pld._pmf_remove, pld._pmf_add]
        epsilons = [epsilon_for_delta_dense(pmf, target_delta)
                    if isinstance(pmf, pld_pmf.DensePLDPmf)
                    else pmf.get_epsilon_for_delta(target_delta) for pmf in pmfs]
        return max(epsilons)


@functools.lru_cache(maxsize=64)
def _subsampled_gaussian_pld(
    noise_multiplier: float, q: float, interval: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """PLD of one Poisson(q)-subsampled Gaussian release, exactly as PLDAccountant builds it
    (``from_gaussian_mechanism``; pld_fast.py: the same arrays, without its Python loops)."""
    return gaussian_pld(noise_multiplier, interval, sampling_prob=q)


@functools.lru_cache(maxsize=64)
def _gaussian_pld(standard_deviation: float,
                  interval: float) -> privacy_loss_distribution.PrivacyLossDistribution:
    """PLD of an unsubsampled Gaussian (the folded q = 1 releases), as PLDAccountant builds it."""
    return gaussian_pld(standard_deviation, interval)


def _self_compose(pld: privacy_loss_distribution.PrivacyLossDistribution,
                  count: int) -> privacy_loss_distribution.PrivacyLossDistribution:
    """``pld.self_compose(count)``, densifying first where the library would (see above)."""
    # pylint: disable=protected-access  # dp_accounting is pinned (==0.6.0) in pyproject.toml
    pmfs = [pld._pmf_remove] if pld._symmetric else [pld._pmf_remove, pld._pmf_add]
    densified = []
    for pmf in pmfs:
        sparse = isinstance(pmf, pld_pmf.SparsePLDPmf)
        if sparse and count > 1 and count * math.log(max(pmf.size, 1)) > math.log(
                pld_pmf._MAX_PMF_SPARSE_SIZE):
            pmf = pmf.to_dense_pmf()  # what SparsePLDPmf.self_compose does after size ** T
        densified.append(pmf)
    # PrivacyLossDistribution.self_compose(count): each PMF's self_compose (dense ones through
    # pld_fast, which reuses their tail bounds and FFT across counts)
    return privacy_loss_distribution.PrivacyLossDistribution(*[
        self_compose_dense(pmf, count) if isinstance(pmf, pld_pmf.DensePLDPmf)
        else pmf.self_compose(count) for pmf in densified])


def _rdp_accountant() -> rdp_privacy_accountant.RdpAccountant:
    return rdp_privacy_accountant.RdpAccountant(orders=RDP_ORDERS, neighboring_relation=ADJACENCY)


@functools.lru_cache(maxsize=1024)
def _rdp_of_one(event: dp_event.DpEvent) -> tuple[float, ...]:
    """RDP curve (one value per order in RDP_ORDERS) of ONE event: 0.1 s for a subsampled
    Gaussian, so memoised; T releases cost T times it (RDP composes additively)."""
    return tuple(_rdp_accountant().compose(event).rdp)


@functools.lru_cache(maxsize=4096)
def _epsilon_rdp(
    groups: tuple[tuple[MechanismParams, int], ...], delta: float
) -> tuple[float, float]:
    if not groups:
        return 0.0, float("nan")
    # The same sum of per-order curves that RdpAccountant.compose(_accounting_event(groups))
    # forms, from memoised per-release curves.
    event = _accounting_event(groups)
    parts = event.events if isinstance(event, dp_event.ComposedDpEvent) else [event]
    rdp = [0.0] * len(RDP_ORDERS)
    for part in parts:
        count = 1
        if isinstance(part, dp_event.SelfComposedDpEvent):
            part, count = part.event, part.count
        rdp = [total + count * one for total, one in zip(rdp, _rdp_of_one(part))]
    eps, order = rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, rdp, delta)
    return float(eps), float(order)


@functools.lru_cache(maxsize=4096)
def _epsilon_pld(groups: tuple[tuple[MechanismParams, int], ...], delta: float) -> float:
    if not groups:
        return 0.0
    # RDP is a fast upper bound; it sets the scale of the PLD grid. Past RDP_ONLY_ABOVE the
    # guarantee is void anyway and a PLD would need terabytes: report the RDP bound itself.
    scale = _epsilon_rdp(groups, delta)[0]
    if scale > RDP_ONLY_ABOVE or sum(count for _, count in groups) > PLD_MAX_RELEASES:
        return scale
    # Both figures bound the true epsilon from above; the PLD is the tighter one except where its
    # pessimistic rounding (which grows with the number of releases) dominates: take the smaller.
    return min(scale, _pld_epsilon(_accounting_event(groups), delta, _pld_interval(scale)))


def epsilon(releases: Releases, delta: float) -> float:
    """Enforced epsilon of a collection of releases: PLD, pessimistic, add/remove adjacency;
    the RDP bound instead where that is smaller, above RDP_ONLY_ABOVE or past PLD_MAX_RELEASES."""
    return _epsilon_pld(_grouped(releases), check_delta(delta))


def epsilon_rdp(releases: Releases, delta: float) -> tuple[float, float]:
    """(epsilon, optimal order) from the RDP accountant: an upper bound, looser than PLD."""
    return _epsilon_rdp(_grouped(releases), check_delta(delta))


def epsilon_for(params: MechanismParams, queries: int, delta: float) -> float:
    """Enforced epsilon of `queries` releases with one parameter set."""
    return epsilon([(params, check_queries(queries))], delta)


def _rdp_epsilon_for(params: MechanismParams, queries: int, delta: float) -> float:
    return _epsilon_rdp(((params, queries),), delta)[0]


def _boundary(cost: Callable[[float], float], target: float, fit: float, fail: float,
              tol: float = 0.0, rel_tol: float = 0.0, integer: bool = False) -> float:
    """The last point that fits on a monotone cost curve: given cost(fit) <= target < cost(fail),
    returns x with cost(x) <= target and a point within tol + rel_tol * x of x (towards `fail`)
    that does not fit. For integers (tol 1) that is the exact boundary: x fits, x + 1 does not.

    Costs behave like powers of x (epsilon ~ sqrt(T) .. T, ~ 1/z .. 1/z^2), so the next point is
    the root of log(cost / target) interpolated linearly in log(x) (regula falsi, Illinois
    variant: an end kept twice has its value halved; ~3-6 steps), aimed half a tolerance past the
    estimate so that the bracket closes from both sides. A cost of 0 counts as target * 1e-6;
    bisection (geometric) after four moves of the same end or where x <= 0.
    """

    def log_ratio(value: float) -> float:
        return math.log(max(value, target * 1e-6) / target) if value < math.inf else math.inf

    g_fit, g_fail = log_ratio(cost(fit)), log_ratio(cost(fail))
    last, repeats = "", 0
    direction = 1.0 if fail > fit else -1.0
    while abs(fail - fit) > (width := tol + rel_tol * fit):
        low, high = min(fit, fail), max(fit, fail)
        if repeats >= 4 or low <= 0 or g_fail == math.inf:
            guess = (low + high) / 2 if low <= 0 or high / low < 4 else math.sqrt(low * high)
        else:
            guess = fit * (fail / fit) ** (g_fit / (g_fit - g_fail))
            guess += direction * width / 2 * (1.0 if last == "fit" else -1.0 if last else 0.0)
        if integer:
            x = float(min(max(round(guess), low + 1), high - 1))
        else:
            x = min(max(guess, low + width / 4), high - width / 4)
        g = log_ratio(cost(x))
        side = "fit" if g <= 0.0 else "fail"
        repeats = repeats + 1 if side == last else 1
        if side == "fit":
            fit, g_fit = x, g
            if repeats > 1:
                g_fail /= 2
        else:
            fail, g_fail = x, g
            if repeats > 1:
                g_fit /= 2
        last = side
    return fit


# -- the searches: located on a cheap proxy, settled on the enforced figure ----------------------
# A PLD evaluation costs one build of the one-release PLD (a Python loop in dp_accounting over its
# grid points: ~15 us each, 6e4 points = ~1 s at z = 0.3) plus one composition. The calibrations
# need a new build per candidate, max_queries one build and a composition per candidate. So the
# searches first LOCATE the answer on a proxy and only then SETTLE it on epsilon() itself:
# * the proxy is the same pessimistic PLD on a grid PROXY_COARSENING times coarser than the one
#   epsilon() uses near the target (1/64 of the points or fewer), where that still resolves the
#   one-release privacy loss (>= PROXY_MIN_POINTS grid points: small noise multipliers, where the
#   builds are slow and the coarse figure is within ~1e-4 of the enforced one); elsewhere (few
#   points: builds are cheap, and a coarse grid's rounding would add up over many compositions)
#   the proxy is epsilon() itself;
# * settling evaluates epsilon() at the proxy's answer and one tolerance step beyond it, which
#   usually brackets the boundary at once (2 enforced evaluations), and steps on (x4 per step)
#   until it does. The answer is decided on epsilon() alone: the proxy only says where to look.
PROXY_COARSENING = 64
PROXY_MIN_POINTS = 256
# The coarse figure must agree with the enforced one at the located answer to this relative
# precision, else the search is redone on the enforced figure alone (z = 1, q = 1e-3, 4e4
# releases: the coarse grid's rounding adds up to 4x the enforced epsilon at z = 2.8). Within it,
# the proxy still says where to look once rescaled by the ratio of the two figures (see _settle;
# z = 0.3, q = 1e-6, epsilon 0.1: the proxy is 4 % pessimistic at its answer).
PROXY_TRUST = 0.1
# _settle re-aims at once where the enforced figure at the start is further than this from the
# target (relative); nearer, one tolerance step usually brackets the boundary.
AIM_GAP = 1e-3
CALIBRATION_REL_TOL = 1e-4


@functools.lru_cache(maxsize=4096)
def _coarse_epsilon(params: MechanismParams, queries: int, delta: float, interval: float) -> float:
    return _pld_epsilon(_accounting_event(((params, queries),)), delta, interval)


def _coarse_proxy_resolves(params: MechanismParams, target: float) -> bool:
    """Does the coarse grid still resolve the one-release privacy loss of `params` (>=
    PROXY_MIN_POINTS points)? Decided once per search, at a reference point from the RDP stage
    (the builds near the answer are at least as large), so that a search does not mix figures."""
    if params.q == 1.0:
        return False  # folded into one Gaussian: cheap to build at any grid
    interval = min(1.0, PROXY_COARSENING * _pld_interval(target))
    one = _subsampled_gaussian_pld(params.accounted_noise_multiplier, params.q, interval)
    # pylint: disable=protected-access  # dp_accounting is pinned (==0.6.0)
    return interval < 1.0 and one._pmf_remove.size >= PROXY_MIN_POINTS


def _proxy_agrees(enforced: float, proxy: float) -> bool:
    return proxy > 0.0 and abs(enforced / proxy - 1.0) <= PROXY_TRUST


def _proxy_epsilon_for(params: MechanismParams, queries: int, delta: float, target: float,
                       coarse: bool) -> float:
    """Where to look: the coarse-grid PLD epsilon if `coarse` (see _coarse_proxy_resolves), else
    epsilon_for() itself. Never decides an answer (see _settle)."""
    if not coarse or params.q == 1.0 or queries > PLD_MAX_RELEASES:
        return epsilon_for(params, queries, delta)  # (past PLD_MAX_RELEASES: RDP only, cheap)
    interval = min(1.0, PROXY_COARSENING * _pld_interval(target))
    return _coarse_epsilon(params, queries, delta, interval)


def _settle(cost: Callable[[float], float], target: float, start: float, first: float,
            last: float, *, tol: float = 0.0, rel_tol: float = 0.0, integer: bool = False,
            reaim: Callable[[float, float], float] | None = None) -> float | None:
    """The boundary of `cost` (the ENFORCED figure) near `start`, the proxy's answer, within the
    range [first, last] ordered from fitting to failing (T: 1 .. cap; z: z_high .. z_low).

    Evaluates `start` and a point one tolerance width beyond it. If they do not bracket the
    boundary, or the enforced figure at `start` is further than AIM_GAP from the target,
    `reaim(x, cost(x))` (at most twice) moves on to where the proxy, rescaled by the ratio of the
    two figures seen at x, puts the boundary (the points already seen are kept: a fitting start
    and a failing aim bracket the boundary); after that it steps on from the last point by 4x the
    previous step (clamped to the range). The bracket is closed by _boundary: the result fits,
    and a point within tol + rel_tol * x of it (towards `last`) does not. If `last` fits, it is
    returned; if `first` fails, None.
    """
    toward_last = 1.0 if last > first else -1.0
    low, high = min(first, last), max(first, last)

    def step(x: float, widths: float) -> float:
        # 0.999: the bracket of the first step is within the width despite float rounding
        y = x + widths * (tol + rel_tol * abs(x)) * (1.0 if integer else 0.999)
        return min(max(float(round(y)) if integer else y, low), high)

    reaims = 0 if reaim is None else 2
    fit: float | None = None
    fail: float | None = None
    x = start
    widths = 1.0
    while True:
        value = cost(x)
        if value <= target:
            fit = x if fit is None or (x - fit) * toward_last > 0 else fit
        else:
            fail = x if fail is None or (fail - x) * toward_last > 0 else fail
        if fit is not None and fail is not None:
            return _boundary(cost, target, fit, fail, tol=tol, rel_tol=rel_tol, integer=integer)
        far = abs(value / target - 1.0) > AIM_GAP
        if reaims and 0.0 < value < math.inf and (widths == 4.0 or far):  # no bracket: re-aim
            reaims -= 1
            aimed = reaim(x, value)  # type: ignore[misc]
            if aimed != x and low <= aimed <= high:
                x, widths = aimed, 1.0
                continue
        nxt = step(fit, toward_last * widths) if fit is not None else step(
            fail, -toward_last * widths)  # type: ignore[arg-type]
        if nxt == x:
            return fit  # `last` fits (fit is x), or `first` fails (fit is None)
        x = nxt
        widths *= 4


def calibrate_sigma(epsilon_target: float, q: float, k: int, queries: int, delta: float) -> float:
    """Smallest sigma (to a relative CALIBRATION_REL_TOL) whose `queries` releases fit under
    epsilon() itself: the returned sigma fits, sigma * (1 - 1e-4) does not.

    The RDP bound (cheap, looser; RDP >= PLD) calibrates a noise multiplier to 2 %; the proxy
    (see _proxy_epsilon_for) brackets and locates the answer from there; _settle decides it on
    epsilon(). Searched within NOISE_MULTIPLIER_RANGE."""
    epsilon_target, delta = check_epsilon(epsilon_target), check_delta(delta)
    return _calibrate_sigma(epsilon_target, q, k, check_queries(queries), delta, True)


def _calibrate_sigma(epsilon_target: float, q: float, k: int, queries: int, delta: float,
                     allow_coarse: bool) -> float:
    shape = MechanismParams(1.0, q, k)
    z_low, z_high = NOISE_MULTIPLIER_RANGE

    def params(z: float) -> MechanismParams:
        return MechanismParams(sigma=z * shape.sensitivity, q=shape.q, k=shape.k)

    def cost(z: float) -> float:
        return epsilon_for(params(z), queries, delta)

    coarse = False

    def proxy(z: float) -> float:
        return _proxy_epsilon_for(params(z), queries, delta, epsilon_target, coarse)

    def rdp_cost(z: float) -> float:
        return _rdp_epsilon_for(params(z), queries, delta)

    def unreachable() -> InvalidParameterError:
        return InvalidParameterError(
            f"no sigma reaches epsilon={epsilon_target} for {queries} queries (q={shape.q}, "
            f"k={shape.k}, delta={delta}): even noise multiplier {z_high} "
            f"(sigma={params(z_high).sigma:.4g}) costs more; allow fewer queries, a smaller "
            "q or a larger budget"
        )

    if cost(z_high) > epsilon_target:  # z = 1000: a cheap build
        raise unreachable()
    z_fits = z_high
    if rdp_cost(z_high) <= epsilon_target:
        z_fits = z_low
        if rdp_cost(z_low) > epsilon_target:
            z_fits = _boundary(rdp_cost, epsilon_target, z_high, z_low, rel_tol=0.02)
    coarse = allow_coarse and _coarse_proxy_resolves(params(z_fits), epsilon_target)
    while z_fits < z_high and proxy(z_fits) > epsilon_target:  # RDP and PLD disagree: step up
        z_fits = min(z_high, z_fits * 1.05)
    z_fails = z_fits * proxy(z_fits) / epsilon_target
    while z_fails > z_low and proxy(z_fails) <= epsilon_target:
        z_fits, z_fails = z_fails, z_fails / 2
    located = z_low
    if z_fails > z_low or proxy(z_low) > epsilon_target:
        located = _boundary(proxy, epsilon_target, z_fits, max(z_fails, z_low),
                            rel_tol=CALIBRATION_REL_TOL / (4 if coarse else 1))
        if not coarse:  # located on epsilon() itself: that is the answer
            return params(located).sigma
    if coarse and not _proxy_agrees(cost(located), proxy(located)):
        return _calibrate_sigma(epsilon_target, q, k, queries, delta, False)

    def reaim(z: float, enforced: float) -> float:
        aimed = _settle(proxy, epsilon_target * proxy(z) / enforced, z, z_high, z_low,
                        rel_tol=CALIBRATION_REL_TOL / 4)
        return z if aimed is None else aimed

    z = _settle(cost, epsilon_target, located, z_high, z_low, rel_tol=CALIBRATION_REL_TOL,
                reaim=reaim if coarse else None)
    if z is None:
        raise unreachable()
    return params(z).sigma


def max_queries(params: MechanismParams, epsilon_target: float, delta: float) -> int:
    """Largest T with epsilon(T releases) <= epsilon_target, at most MAX_QUERIES_SEARCHED (which
    then means "at least that many"); 0 if not even one fits."""
    if not isinstance(params, MechanismParams):
        raise InvalidParameterError("params must be a MechanismParams")
    return _max_queries(params, check_epsilon(epsilon_target), check_delta(delta), True)


@functools.lru_cache(maxsize=1024)
def _max_queries(params: MechanismParams, epsilon_target: float, delta: float,
                 allow_coarse: bool) -> int:
    """RDP (memoised per-order curve: microseconds per T) proves the cap or gives T_rdp, which
    fits; an extrapolation epsilon ~ sqrt(T) from there on the proxy overshoots the answer;
    _boundary locates it on the proxy, and _settle decides it on epsilon_for() itself: T fits,
    T + 1 does not."""

    def cost(t: float) -> float:
        return epsilon_for(params, int(t), delta)

    coarse = allow_coarse and _coarse_proxy_resolves(params, epsilon_target)

    def proxy(t: float) -> float:
        return _proxy_epsilon_for(params, int(t), delta, epsilon_target, coarse)

    def rdp_cost(t: float) -> float:
        return _rdp_epsilon_for(params, int(t), delta)

    cap = MAX_QUERIES_SEARCHED
    if rdp_cost(1) > epsilon_target and proxy(1) > epsilon_target and cost(1) > epsilon_target:
        return 0  # (the proxy only spares a slow build)
    if rdp_cost(cap) <= epsilon_target:
        return cap  # RDP proves the cap (and is what epsilon() reports that far out)
    fit = 1
    if rdp_cost(1) <= epsilon_target:
        fit = int(_boundary(rdp_cost, epsilon_target, 1, cap, tol=1, integer=True))
        if proxy(fit) > epsilon_target:  # RDP and PLD grids disagree at the edge
            fit = 1
    fail = cap
    while True:  # overshoot by extrapolating epsilon ~ sqrt(T) (the slowest growth), <= 1000x
        ratio = epsilon_target / max(proxy(fit), epsilon_target / 32)
        guess = min(cap, max(fit + 1, math.ceil(fit * ratio**2)))
        if proxy(guess) > epsilon_target:
            fail = guess
            break
        if guess == cap:
            break
        fit = guess
    located = cap if fail == cap and proxy(cap) <= epsilon_target else int(
        _boundary(proxy, epsilon_target, fit, fail, tol=1, integer=True))
    if coarse and not _proxy_agrees(cost(located), proxy(located)):
        return _max_queries(params, epsilon_target, delta, False)

    def reaim(t: float, enforced: float) -> float:
        aimed = _settle(proxy, epsilon_target * proxy(t) / enforced, t, 1, cap, tol=1,
                        integer=True)
        return t if aimed is None else aimed

    t_max = _settle(cost, epsilon_target, located, 1, cap, tol=1, integer=True,
                    reaim=reaim if coarse else None)
    return 0 if t_max is None else int(t_max)


def calibrate_q(epsilon_target: float, sigma: float, k: int, queries: int, delta: float) -> float:
    """Largest sampling rate q (to a relative CALIBRATION_REL_TOL) whose `queries` releases fit
    under epsilon(): q fits, q * (1 + 1e-4) does not (or q = 1); searched within [Q_MIN, 1].
    Same stages as calibrate_sigma (epsilon grows at most linearly in q)."""
    epsilon_target, delta = check_epsilon(epsilon_target), check_delta(delta)
    return _calibrate_q(epsilon_target, sigma, k, check_queries(queries), delta, True)


def _calibrate_q(epsilon_target: float, sigma: float, k: int, queries: int, delta: float,
                 allow_coarse: bool) -> float:
    base = MechanismParams(sigma, 1.0, k)

    def params(q: float) -> MechanismParams:
        return MechanismParams(base.sigma, q, base.k)

    def cost(q: float) -> float:
        return epsilon_for(params(q), queries, delta)

    coarse = allow_coarse and _coarse_proxy_resolves(params(Q_MIN), epsilon_target)

    def proxy(q: float) -> float:
        return _proxy_epsilon_for(params(q), queries, delta, epsilon_target, coarse)

    def rdp_cost(q: float) -> float:
        return _rdp_epsilon_for(params(q), queries, delta)

    def unreachable() -> InvalidParameterError:
        return InvalidParameterError(
            f"no q reaches epsilon={epsilon_target} for {queries} queries "
            f"(sigma={base.sigma}, k={base.k}, delta={delta}); the smallest supported q is "
            f"{Q_MIN:g}"
        )

    if (rdp_cost(Q_MIN) > epsilon_target and proxy(Q_MIN) > epsilon_target
            and cost(Q_MIN) > epsilon_target):  # (the proxy only spares a slow build)
        raise unreachable()
    q_fits = Q_MIN
    if rdp_cost(Q_MIN) <= epsilon_target:
        q_fits = 1.0
        if rdp_cost(1.0) > epsilon_target:
            q_fits = _boundary(rdp_cost, epsilon_target, Q_MIN, 1.0, rel_tol=0.02)
    coarse = allow_coarse and _coarse_proxy_resolves(params(q_fits), epsilon_target)
    while q_fits > Q_MIN and proxy(q_fits) > epsilon_target:  # RDP and PLD disagree: step down
        q_fits = max(Q_MIN, q_fits / 1.05)
    located = 1.0
    while q_fits < 1.0:  # overshoot: epsilon grows at most linearly in q
        guess = min(1.0, max(q_fits * 1.01, q_fits * epsilon_target / max(
            proxy(q_fits), epsilon_target / 1024)))
        if proxy(guess) > epsilon_target:
            located = _boundary(proxy, epsilon_target, q_fits, guess,
                                rel_tol=CALIBRATION_REL_TOL / (4 if coarse else 1))
            if not coarse:  # located on epsilon() itself: that is the answer
                return located
            break
        q_fits = guess
    if coarse and not _proxy_agrees(cost(located), proxy(located)):
        return _calibrate_q(epsilon_target, sigma, k, queries, delta, False)

    def reaim(q: float, enforced: float) -> float:
        aimed = _settle(proxy, epsilon_target * proxy(q) / enforced, q, Q_MIN, 1.0,
                        rel_tol=CALIBRATION_REL_TOL / 4)
        return q if aimed is None else aimed

    q = _settle(cost, epsilon_target, located, Q_MIN, 1.0, rel_tol=CALIBRATION_REL_TOL,
                reaim=reaim if coarse else None)
    if q is None:
        raise unreachable()
    return q
