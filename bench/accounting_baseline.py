"""BASELINE for bench/accounting.py: src/dprdm/privacy/accounting.py as of commit 39ab201, verbatim
below this note (before the accountant was bounded and sped up, issue 13 item 6). Only the bench
imports it; nothing in dprdm does. Its numbers differ slightly from the new ones because the new
PLD grid is rounded down to a power of two (see _pld_interval there)."""

from __future__ import annotations

# Original module docstring (kept as a comment-string):
_ORIGINAL_DOC = """Privacy accounting for DP-RDM releases.

Owns the translation from "what was released" to "how much privacy it cost":

* :class:`MechanismParams` -- the (sigma, q, k) of the private retrieval step, validated.
* :func:`release_event` -- the dp_accounting ``DpEvent`` for T releases with those parameters,
  and for a whole ledger of heterogeneous releases.
* :func:`epsilon` -- the ENFORCED figure: Google dp_accounting's PLD accountant, pessimistic
  estimate, add/remove-one adjacency. :func:`epsilon_rdp` -- an RDP figure reported beside it.
* :func:`calibrate_sigma`, :func:`max_queries`, :func:`calibrate_q` -- the inverses, via
  ``dp_accounting.mechanism_calibration`` (which never returns a parameter that overshoots).

The mechanism (see ``mechanism.py``): one release is a = (1/k) * sum of k unit-norm neighbours of
the query inside a Poisson(q) subsample of the private set (zero-filled), plus N(0, sigma^2 I).
Adding or removing one record moves a by at most 2/k in L2, so each release is a
Poisson-subsampled Gaussian mechanism with noise multiplier z = sigma / (2/k) = sigma * k / 2.
Repeated releases are composed by count (``SelfComposedDpEvent``), never one by one, so T = 1e6
costs a few FFTs, not a million.
"""


import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dprdm.errors import InvalidParameterError

# dp_accounting's RDP code logs a warning per order it cannot evaluate (and then excludes it,
# which only loosens the bound); that is noise for our users.
absl_logging.set_verbosity(absl_logging.ERROR)

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
# Above this epsilon (RDP bound) no PLD is built: the RDP bound is reported as the enforced figure.
RDP_ONLY_ABOVE = 1000.0


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
    return delta


def check_epsilon(epsilon: object) -> float:
    epsilon = _finite_number("epsilon", epsilon)
    if epsilon <= 0.0:
        raise InvalidParameterError(f"epsilon must be > 0, got {epsilon}")
    return epsilon


def check_queries(queries: object) -> int:
    return _whole_number("queries", queries, 1)


def check_q(q: object) -> float:
    q = _finite_number("q", q)
    if not 0.0 < q <= 1.0:
        raise InvalidParameterError(
            f"q must be in (0, 1] (q = 1 means no subsampling; q = 0 is not allowed), got {q}"
        )
    return q


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
        object.__setattr__(self, "k", _whole_number("k", self.k, 1))

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the aggregate under add/remove-one: one neighbour swaps, 2/k."""
        return 2.0 / self.k

    @property
    def noise_multiplier(self) -> float:
        """Noise std in units of the sensitivity: sigma * k / 2."""
        return self.sigma * self.k / 2.0

    def event(self, count: int = 1) -> dp_event.DpEvent:
        """The DpEvent for `count` releases with these parameters."""
        count = check_queries(count)
        one: dp_event.DpEvent = dp_event.GaussianDpEvent(self.noise_multiplier)
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
    precision = sum(count / p.noise_multiplier**2 for p, count in groups if p.q == 1.0)
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
    memory bounded (a fixed 1e-4 grid needs gigabytes once epsilon is in the thousands). Capped at
    1 nat, beyond which the PLD code overflows.
    """
    return min(1.0, max(PLD_DISCRETIZATION, epsilon_scale * PLD_DISCRETIZATION))


def _pld_epsilon(event: dp_event.DpEvent, delta: float, interval: float) -> float:
    return float(_pld_accountant(interval).compose(event).get_epsilon(delta))


def _search_accountant(epsilon_target: float) -> Callable[[], dp_accounting.PrivacyAccountant]:
    """The accountant that calibrations search with, matching what epsilon() reports near the
    target: RDP above RDP_ONLY_ABOVE, else PLD on the grid for the target's scale."""
    if epsilon_target > RDP_ONLY_ABOVE:
        return _rdp_accountant
    interval = _pld_interval(epsilon_target)
    return lambda: _pld_accountant(interval)


def _search_epsilon(event: dp_event.DpEvent, delta: float, epsilon_target: float) -> float:
    return float(_search_accountant(epsilon_target)().compose(event).get_epsilon(delta))


def _pld_accountant(interval: float = PLD_DISCRETIZATION) -> pld_privacy_accountant.PLDAccountant:
    return pld_privacy_accountant.PLDAccountant(
        neighboring_relation=ADJACENCY, value_discretization_interval=interval
    )


def _rdp_accountant() -> rdp_privacy_accountant.RdpAccountant:
    return rdp_privacy_accountant.RdpAccountant(orders=RDP_ORDERS, neighboring_relation=ADJACENCY)


@functools.lru_cache(maxsize=4096)
def _epsilon_rdp(
    groups: tuple[tuple[MechanismParams, int], ...], delta: float
) -> tuple[float, float]:
    if not groups:
        return 0.0, float("nan")
    accountant = _rdp_accountant().compose(_accounting_event(groups))
    eps, order = accountant.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


@functools.lru_cache(maxsize=4096)
def _epsilon_pld(groups: tuple[tuple[MechanismParams, int], ...], delta: float) -> float:
    if not groups:
        return 0.0
    # RDP is a fast upper bound; it sets the scale of the PLD grid. Past RDP_ONLY_ABOVE the
    # guarantee is void anyway and a PLD would need terabytes: report the RDP bound itself.
    scale = _epsilon_rdp(groups, delta)[0]
    if scale > RDP_ONLY_ABOVE:
        return scale
    return _pld_epsilon(_accounting_event(groups), delta, _pld_interval(scale))


def epsilon(releases: Releases, delta: float) -> float:
    """Enforced epsilon of a collection of releases: PLD, pessimistic, add/remove adjacency."""
    return _epsilon_pld(_grouped(releases), check_delta(delta))


def epsilon_rdp(releases: Releases, delta: float) -> tuple[float, float]:
    """(epsilon, optimal order) from the RDP accountant: an upper bound, looser than PLD."""
    return _epsilon_rdp(_grouped(releases), check_delta(delta))


def epsilon_for(params: MechanismParams, queries: int, delta: float) -> float:
    """Enforced epsilon of `queries` releases with one parameter set."""
    return epsilon([(params, check_queries(queries))], delta)


def _rdp_epsilon_for(params: MechanismParams, queries: int, delta: float) -> float:
    return _epsilon_rdp(((params, queries),), delta)[0]


def calibrate_sigma(epsilon_target: float, q: float, k: int, queries: int, delta: float) -> float:
    """Smallest sigma (to within 1e-6 in noise-multiplier units) whose `queries` releases fit.

    Two stages keep it fast: the RDP bound (cheap, looser) gives a sigma that surely fits, then
    the PLD calibration searches just below it."""
    epsilon_target, delta = check_epsilon(epsilon_target), check_delta(delta)
    queries = check_queries(queries)
    shape = MechanismParams(1.0, q, k)
    z_low, z_high = NOISE_MULTIPLIER_RANGE

    def params(z: float) -> MechanismParams:
        return MechanismParams(sigma=z * shape.sensitivity, q=shape.q, k=shape.k)

    if epsilon_for(params(z_high), queries, delta) > epsilon_target:
        raise InvalidParameterError(
            f"no sigma reaches epsilon={epsilon_target} for {queries} queries (q={shape.q}, "
            f"k={shape.k}, delta={delta}): even noise multiplier {z_high} "
            f"(sigma={params(z_high).sigma:.4g}) costs more; allow fewer queries, a smaller q "
            "or a larger budget"
        )
    # RDP >= PLD, so the RDP-calibrated z satisfies the PLD constraint too: an upper bracket.
    if _rdp_epsilon_for(params(z_low), queries, delta) <= epsilon_target:
        z_fits = z_low
    else:
        z_fits = mechanism_calibration.calibrate_dp_mechanism(
            _rdp_accountant,
            lambda z: params(z).event(queries),
            epsilon_target,
            delta,
            bracket_interval=mechanism_calibration.ExplicitBracketInterval(z_low, z_high),
            tol=1e-4,
        )
    # The search evaluates ONE function (see _search_accountant).
    def pld_fits(z: float) -> bool:
        return _search_epsilon(params(z).event(queries), delta, epsilon_target) <= epsilon_target

    # Walk down until the PLD constraint is violated: a lower bracket.
    z_fails = z_fits
    while z_fails > z_low:
        z_fails = max(z_low, z_fails / 1.25)
        if not pld_fits(z_fails):
            break
    else:
        return params(z_low).sigma  # every supported sigma fits; the smallest is the answer
    if not pld_fits(z_fits):  # RDP and PLD grids disagree at the edge: widen upwards
        z_fits = min(z_high, z_fits * 1.01)
    z = mechanism_calibration.calibrate_dp_mechanism(
        _search_accountant(epsilon_target),
        lambda z: params(z).event(queries),
        epsilon_target,
        delta,
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(z_fails, z_fits),
    )
    # Guarantee the answer under epsilon() itself (the ledger's check), whose grid follows the
    # RDP scale rather than the target's: nudge up by the grid's relative precision if needed.
    while epsilon_for(params(z), queries, delta) > epsilon_target and z < z_high:
        z = min(z_high, z * (1.0 + 2 * PLD_DISCRETIZATION))
    return params(z).sigma


def max_queries(params: MechanismParams, epsilon_target: float, delta: float) -> int:
    """Largest T with epsilon(T releases) <= epsilon_target; 0 if not even one fits."""
    if not isinstance(params, MechanismParams):
        raise InvalidParameterError("params must be a MechanismParams")
    return _max_queries(params, check_epsilon(epsilon_target), check_delta(delta))


@functools.lru_cache(maxsize=1024)
def _max_queries(params: MechanismParams, epsilon_target: float, delta: float) -> int:

    def fits(t: int) -> bool:  # the ledger's own check
        return epsilon_for(params, t, delta) <= epsilon_target

    if not fits(1):
        return 0
    # The search evaluates ONE function (see _search_accountant).
    def fits_on_grid(t: int) -> bool:
        return _search_epsilon(params.event(t), delta, epsilon_target) <= epsilon_target

    low, high = 1, 2
    while fits_on_grid(high):
        if high >= MAX_QUERIES_SEARCHED:
            return MAX_QUERIES_SEARCHED
        low, high = high, high * 2
    guess = low
    if fits_on_grid(low):
        guess = mechanism_calibration.calibrate_dp_mechanism(
            _search_accountant(epsilon_target),
            params.event,
            epsilon_target,
            delta,
            bracket_interval=mechanism_calibration.ExplicitBracketInterval(low, high),
            discrete=True,
        )
    # Settle against epsilon() itself, whose grid follows the RDP scale rather than the
    # target's; the two differ by a few queries at most: gallop, then bisect.
    return _largest_true(fits, guess)


def _largest_true(predicate: Callable[[int], bool], guess: int) -> int:
    """Largest t >= 0 with predicate(t), for a monotone predicate (t <= 0 counts as True)."""

    def ok(t: int) -> bool:
        return t <= 0 or predicate(t)

    step = 1
    if ok(guess):
        low = guess
        while ok(low + step):
            low, step = low + step, step * 2
        high = low + step
    else:
        high = guess
        while not ok(high - step):
            high, step = high - step, step * 2
        low = max(0, high - step)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low


def calibrate_q(epsilon_target: float, sigma: float, k: int, queries: int, delta: float) -> float:
    """Largest sampling rate q (within 1e-9) whose `queries` releases fit."""
    epsilon_target, delta = check_epsilon(epsilon_target), check_delta(delta)
    queries = check_queries(queries)
    base = MechanismParams(sigma, 1.0, k)

    def params(q: float) -> MechanismParams:
        return MechanismParams(base.sigma, q, base.k)

    if epsilon_for(base, queries, delta) <= epsilon_target:
        return 1.0
    q_low = 1e-9
    if epsilon_for(params(q_low), queries, delta) > epsilon_target:
        raise InvalidParameterError(
            f"no q reaches epsilon={epsilon_target} for {queries} queries "
            f"(sigma={base.sigma}, k={base.k}, delta={delta})"
        )
    q = mechanism_calibration.calibrate_dp_mechanism(
        _search_accountant(epsilon_target),
        lambda q: params(q).event(queries),
        epsilon_target,
        delta,
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(q_low, 1.0),
        tol=1e-9,
    )
    while q > q_low and epsilon_for(params(q), queries, delta) > epsilon_target:
        q *= 1.0 - 2 * PLD_DISCRETIZATION  # settle against epsilon()'s own grid
    return q
