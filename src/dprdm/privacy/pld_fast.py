"""dp_accounting's PLD steps for our one mechanism, with the same arithmetic and less work.

Owns three functions, each bit for bit the dp_accounting 0.6.0 (pinned) code it replaces -- the
same grid, the same truncation, the same floating-point operations in the same order -- minus
Python loops over grid points and work repeated across a search:

* :func:`gaussian_pld` = ``privacy_loss_distribution.from_gaussian_mechanism`` (pessimistic,
  connect-the-dots, log-mass truncation -50, add/remove-one). The library inverts the privacy
  loss one grid point at a time in ``get_delta_for_epsilon`` (~14 us a point; the one-release
  PLD of z = 0.3 on a 1e-4 grid has 2.4e5 points per adjacency: ~90 % of a 3.4 s build), and
  turns the 2.4e5 connect-the-dots masses into a dict and back with another loop.
  :class:`_VectorisedGaussianPrivacyLoss` does that arithmetic on the whole array (the library's
  scalar helpers call numpy's own log / exp / log1p, so the values are the same); the rare points
  where the library takes a special branch (a loss at, or numerically near, the subsampling bound
  +-log(1 - q), or exactly 0) go through the library's scalar code itself.
* :func:`self_compose_dense` = ``DensePLDPmf.self_compose`` (``common.self_convolve``). Its
  tail bounds (``compute_self_convolve_bounds``: 40 log-sum-exps over the whole PMF, ~0.5 s at
  2.4e5 points, the same for every T) are computed with scipy's logsumexp arithmetic minus its
  overhead (:func:`_log_mgfs_of`, 5x faster) and memoised per PMF, and the PMF's forward FFT per
  (PMF, FFT length): neighbouring T (the last steps of a search) share it.
* :func:`epsilon_for_delta_dense` = ``DensePLDPmf.get_epsilon_for_delta``: the library's loop
  down the losses (running sums, one ``math.exp`` per point) in numpy blocks; running sums are
  ``np.cumsum`` (sequential, like the loop), and the stopping test is re-done with ``math.log``
  wherever numpy's value is within 1e-9 of the threshold.

Identical results need numpy's array log / exp / log1p to round as its scalar calls and libm's
``math.exp`` / ``math.log`` do (true where numpy calls libm for float64, e.g. x86-64 without
AVX-512); :func:`numpy_matches_scalar_math` checks that once per process on 2e4 sample points,
and where it fails every function here hands over to the library's own code (slow, same bits).
tests/test_accounting.py compares each with the library, array for array and bit for bit.
"""

from __future__ import annotations

import functools
import math
import numbers
import threading
import weakref
from collections import OrderedDict

import numpy as np
from dp_accounting.pld import pld_pmf, privacy_loss_distribution, privacy_loss_mechanism
from scipy import fft, special

_ADD = privacy_loss_mechanism.AdjacencyType.ADD
_REMOVE = privacy_loss_mechanism.AdjacencyType.REMOVE
# math.isclose's default relative tolerance is 1e-9; points within 1e-8 of a bound take the
# library's scalar path, which then decides isclose exactly as it always does.
_NEAR_BOUND = 1e-8
_ADJACENCY = privacy_loss_distribution.NeighborRel.ADD_OR_REMOVE_ONE


@functools.lru_cache(maxsize=1)
def numpy_matches_scalar_math() -> bool:
    """Do numpy's array exp / log / log1p round exactly as its scalar calls and as math.exp /
    math.log (what the library's loops use), on 1e4 sample points each? Checked once."""
    rng = np.random.default_rng(20260101)
    exps = np.concatenate([rng.uniform(-50.0, 50.0, 5000), rng.uniform(-1e-3, 1e-3, 5000)])
    logs = 10.0 ** rng.uniform(-300.0, 300.0, 10_000)
    log1ps = np.concatenate([-rng.uniform(0.0, 1.0, 5000), rng.uniform(-1e-6, 1e3, 5000)])
    checks = ((np.exp, math.exp, exps), (np.log, math.log, logs), (np.log1p, math.log1p, log1ps))
    for vectorised, scalar, points in checks:
        values = vectorised(points)
        if not (np.array_equal(values, [scalar(float(x)) for x in points])
                and np.array_equal(values, [vectorised(x) for x in points])):
            return False
    return True


class _VectorisedGaussianPrivacyLoss(privacy_loss_mechanism.GaussianPrivacyLoss):
    """GaussianPrivacyLoss whose hockey-stick divergence on an array of epsilons is computed
    without a Python loop; the values are those of the scalar code (see the module docstring)."""

    def _inverse_privacy_losses(self, epsilons: np.ndarray) -> np.ndarray:
        """``[self.inverse_privacy_loss(e) for e in epsilons]`` as an array, ADD / REMOVE."""
        q = self.sampling_prob
        s = self.sensitivity
        variance = self._standard_deviation**2
        if q == 1.0:  # the library's shortcut: no subsampling
            losses = epsilons
            special = np.zeros(epsilons.shape, dtype=bool)
        else:
            # PrivacyLoss._inverse_privacy_loss_{add,remove}: the loss without subsampling is
            # +-common.log_a_times_exp_b_plus_c(1 / q, +-epsilon, 1 - 1 / q), i.e. (a > 0,
            # c < 0, b != 0) _log_sub(b + log(a), log(-c)) = d + log1p(-exp(log(-c) - d)).
            a, c = 1 / q, 1 - 1 / q
            bound = math.log(1 - q)
            if self.adjacency_type == _ADD:
                b, bound = -epsilons, -bound
            else:
                b = epsilons
            log_minus_c = np.log(-c)
            with np.errstate(all="ignore"):
                d = b + np.log(a)
                losses = d + np.log1p(-np.exp(log_minus_c - d))
            special = ((np.abs(epsilons - bound) <= _NEAR_BOUND * abs(bound)) | (b == 0)
                       | ~(log_minus_c < d))
            if self.adjacency_type == _ADD:
                losses = -losses
        with np.errstate(all="ignore"):
            # GaussianPrivacyLoss._inverse_privacy_loss_without_subsampling_remove (and + s for
            # ADD: _inverse_privacy_loss_without_subsampling_add), same operations, same order.
            x = -0.5 * s - losses * variance / s
            if self.adjacency_type == _ADD:
                x = s + x
        for i in np.flatnonzero(special):  # the library's own branches (and its errors)
            x[i] = self.inverse_privacy_loss(epsilons[i])
        return x

    def get_delta_for_epsilon(self, epsilon):  # type: ignore[no-untyped-def]
        """MonotonePrivacyLoss.get_delta_for_epsilon (dp_accounting 0.6.0), line for line, with
        the x_cutoffs list comprehension replaced by _inverse_privacy_losses."""
        if self.adjacency_type not in (_ADD, _REMOVE):
            return super().get_delta_for_epsilon(epsilon)
        is_scalar = isinstance(epsilon, numbers.Number)
        epsilons = np.array([epsilon]) if is_scalar else np.asarray(epsilon)
        deltas = np.zeros_like(epsilons, dtype=float)
        if self.sampling_prob == 1.0:
            inverse_indices = np.full_like(epsilons, True, dtype=bool)
        elif self.adjacency_type == _ADD:
            inverse_indices = epsilons < -math.log1p(-self.sampling_prob)
        else:
            inverse_indices = epsilons > math.log1p(-self.sampling_prob)
            other_indices = np.logical_not(inverse_indices)
            deltas[other_indices] = -np.expm1(epsilons[other_indices])
        x_cutoffs = self._inverse_privacy_losses(epsilons[inverse_indices])
        deltas[inverse_indices] = (
            self.mu_upper_cdf(x_cutoffs)
            - np.exp(epsilons[inverse_indices] + self.mu_lower_log_cdf(x_cutoffs)))
        deltas = np.clip(deltas, 0, 1)
        return float(deltas[0]) if is_scalar else deltas


def _connect_dots_pmf(loss: _VectorisedGaussianPrivacyLoss, interval: float) -> pld_pmf.PLDPmf:
    """privacy_loss_distribution._create_pld_pmf_from_monotone_privacy_loss(loss, True,
    interval, use_connect_dots=True) for a continuous mechanism, and
    pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap after it, without the dict round trip
    where the result is dense (the same array of masses, the same DensePLDPmf)."""
    bounds = loss.connect_dots_bounds()
    lower = math.floor(bounds.epsilon_lower / interval)
    upper = math.ceil(bounds.epsilon_upper / interval)
    deltas = np.asarray(loss.get_delta_for_epsilon(np.arange(lower, upper + 1) * interval),
                        dtype=np.float64)
    if upper - lower + 1 <= pld_pmf._MAX_PMF_SPARSE_SIZE or lower == upper:  # noqa: SLF001
        return pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(interval, lower, upper,
                                                                     deltas)
    # pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap, n >= 2, line for line:
    if np.any(deltas < 0) or np.any(deltas > 1):
        raise ValueError(f"deltas are not between 0 and 1 : deltas={deltas}.")
    if np.any(np.diff(deltas) > pld_pmf._DELTA_DIFF_TOLERANCE):  # noqa: SLF001
        raise ValueError(f"deltas are not in non-increasing order: deltas={deltas}.")
    deltas = np.minimum.accumulate(deltas)
    delta_diffs = np.diff(deltas)
    probs = np.zeros_like(deltas)
    probs[0] = 1 - deltas[0] + delta_diffs[0] / math.expm1(interval)
    probs[1:-1] = ((delta_diffs[1:] - delta_diffs[:-1] * math.exp(interval))
                   / math.expm1(interval))
    probs[-1] = delta_diffs[-1] / math.expm1(-interval)
    probs = np.maximum(0.0, probs)
    # create_pmf: more than _MAX_PMF_SPARSE_SIZE losses -> DensePLDPmf from the same masses
    return pld_pmf.DensePLDPmf(interval, lower, probs, deltas[-1], True)


def gaussian_pld(standard_deviation: float, interval: float,
                 sampling_prob: float = 1.0) -> privacy_loss_distribution.PrivacyLossDistribution:
    """privacy_loss_distribution.from_gaussian_mechanism(standard_deviation,
    value_discretization_interval=interval, sampling_prob=sampling_prob,
    neighboring_relation=ADD_OR_REMOVE_ONE) with every other argument at its default."""
    if not numpy_matches_scalar_math():
        return privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation, value_discretization_interval=interval,
            sampling_prob=sampling_prob, neighboring_relation=_ADJACENCY)

    def pmf(adjacency: privacy_loss_mechanism.AdjacencyType) -> pld_pmf.PLDPmf:
        loss = _VectorisedGaussianPrivacyLoss(standard_deviation, sampling_prob=sampling_prob,
                                              adjacency_type=adjacency)
        return _connect_dots_pmf(loss, interval)

    remove = pmf(_REMOVE)
    if sampling_prob == 1.0:
        return privacy_loss_distribution.PrivacyLossDistribution(remove)
    return privacy_loss_distribution.PrivacyLossDistribution(remove, pmf(_ADD))


# -- self-composition: DensePLDPmf.self_compose with its T-independent work memoised -----------

_TAIL_MASS_TRUNCATION = 1e-15  # PrivacyLossDistribution.self_compose's default
_log_mgfs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PMF -> 40 log-MGFs
_spectra: OrderedDict = OrderedDict()  # (id(PMF), FFT length) -> (PMF, its FFT); newest last
_SPECTRA_KEPT = 4  # complex arrays of the FFT length (16 MB each at 1e6 points)
_lock = threading.Lock()


def _self_convolve_bounds(pmf: pld_pmf.DensePLDPmf, num_times: int) -> tuple[int, int]:
    """common.compute_self_convolve_bounds(pmf._probs, num_times, 1e-15), its log-MGFs (which
    do not depend on num_times) memoised per PMF."""
    input_list = pmf._probs  # noqa: SLF001
    upper_bound = (len(input_list) - 1) * num_times
    lower_bound = 0
    orders = np.concatenate((np.arange(-20, 0), np.arange(1, 21))) / len(input_list)
    with _lock:
        log_mgfs = _log_mgfs.get(pmf)
    if log_mgfs is None:
        log_mgfs = _log_mgfs_of(input_list, orders)
        with _lock:
            _log_mgfs[pmf] = log_mgfs
    for order, log_mgf_value in zip(orders, log_mgfs):
        bound = (num_times * log_mgf_value + math.log(2 / _TAIL_MASS_TRUNCATION)) / order
        if not math.isfinite(bound):
            continue
        if order > 0:
            upper_bound = min(upper_bound, math.ceil(bound))
        if order < 0:
            lower_bound = max(lower_bound, math.floor(bound))
    return lower_bound, upper_bound


def _log_mgfs_of(probs: np.ndarray, orders: np.ndarray) -> list:
    """``[special.logsumexp(np.arange(len(probs)) * order, b=probs) for order in orders]``, the
    same floating-point operations on the same arrays (scipy 1.17.1's ``_logsumexp``: zero
    weights' exponents set to -inf, the largest exponent a_max and its weight m taken out,
    s = sum(b * exp(a - a_max)) / m, log1p(s) + log(m) + a_max), without what scipy does around
    it for general inputs: a second direct sum for infinite results, masks and copies (5x less
    time). Here the exponents i * order are strictly monotone in i (checked at the largest), so
    a_max is the exponent of the first or last positive weight; a zero weight's term is then
    0 * exp(finite) = 0, as 0 * exp(-inf) is in scipy. Anything else (a negative, infinite or
    NaN weight, all weights zero, a non-finite result) goes to scipy itself."""
    n = len(probs)
    positive = np.flatnonzero(probs > 0)
    if positive.size == 0 or not probs.min() >= 0 or not np.isfinite(probs).all():
        return [special.logsumexp(np.arange(n) * order, b=probs) for order in orders]
    indices = np.arange(n, dtype=np.float64)  # (np.arange(n) * order casts to float64 first)
    terms = np.empty(n)
    log_mgfs = []
    for order in orders:
        i_max = int(positive[-1] if order > 0 else positive[0])
        a_max = indices[i_max] * order
        neighbour = i_max - 1 if order > 0 else i_max + 1
        if 0 <= neighbour < n and not indices[neighbour] * order < a_max:
            log_mgfs.append(special.logsumexp(np.arange(n) * order, b=probs))  # a tie: scipy
            continue
        np.multiply(indices, order, out=terms)  # a
        np.subtract(terms, a_max, out=terms)  # a - a_max
        np.exp(terms, out=terms)
        np.multiply(probs, terms, out=terms)  # b * exp(a - a_max)
        terms[i_max] = 0.0  # scipy: a[i_max] = -inf
        m = probs[i_max:i_max + 1]  # sum(b * (i == i_max)): that one weight
        s = np.sum(terms, keepdims=True, dtype=terms.dtype)
        s = np.where(s == 0, s, s / m)
        out = np.log1p(s) + np.log(m) + a_max  # (s >= 0, m > 0: sign +1)
        if not np.isfinite(out[0]):
            log_mgfs.append(special.logsumexp(np.arange(n) * order, b=probs))
            continue
        log_mgfs.append(out[0])
    return log_mgfs


def _spectrum(pmf: pld_pmf.DensePLDPmf, fast_len: int) -> np.ndarray:
    """fft.fft(pmf._probs, fast_len), the last _SPECTRA_KEPT kept (read-only)."""
    key = (id(pmf), fast_len)
    with _lock:
        if key in _spectra:
            _spectra.move_to_end(key)
            return _spectra[key][1]
    spectrum = fft.fft(pmf._probs, fast_len)  # noqa: SLF001
    spectrum.flags.writeable = False
    with _lock:
        _spectra[key] = (pmf, spectrum)  # (the PMF is held, so its id is not reused)
        while len(_spectra) > _SPECTRA_KEPT:
            _spectra.popitem(last=False)
    return spectrum


def self_compose_dense(pmf: pld_pmf.DensePLDPmf, num_times: int) -> pld_pmf.DensePLDPmf:
    """pmf.self_compose(num_times) (tail truncation 1e-15), line for line: DensePLDPmf.self_compose
    and common.self_convolve, with _self_convolve_bounds and _spectrum."""
    if not numpy_matches_scalar_math() or num_times <= 0:
        return pmf.self_compose(num_times)
    # pylint: disable=protected-access
    lower_loss = pmf._lower_loss * num_times
    truncation_lower_bound, truncation_upper_bound = _self_convolve_bounds(pmf, num_times)
    output_len = truncation_upper_bound - truncation_lower_bound + 1
    fast_len = fft.next_fast_len(max(output_len, len(pmf._probs)))
    truncated_convolution_output = np.real(fft.ifft(_spectrum(pmf, fast_len)**num_times))
    probs = np.roll(truncated_convolution_output, -truncation_lower_bound)[:output_len]
    lower_loss += truncation_lower_bound
    probs = np.array(probs)
    inf_prob = (_TAIL_MASS_TRUNCATION
                - math.expm1(num_times * math.log1p(- pmf._infinity_mass)))
    return pld_pmf.DensePLDPmf(pmf._discretization, lower_loss, probs, inf_prob,
                               pmf._pessimistic_estimate)


# -- epsilon for delta: DensePLDPmf.get_epsilon_for_delta in numpy blocks ------------------------

_BLOCK = 8192  # losses per block; the loop usually stops within the first few blocks


def epsilon_for_delta_dense(pmf: pld_pmf.DensePLDPmf, delta: float) -> float:
    """pmf.get_epsilon_for_delta(delta) (pld_pmf._get_epsilon_for_delta over the losses from the
    top down), block by block: the state the loop has before each step is a running sum
    (np.cumsum adds in order, as the loop does), and the first step where the loop stops is
    found on the block, its log test re-done with math.log where numpy's value is near."""
    if not numpy_matches_scalar_math():
        return pmf.get_epsilon_for_delta(delta)
    # pylint: disable=protected-access
    infinity_mass = pmf._infinity_mass
    if infinity_mass > delta:
        return math.inf
    step = -pmf._discretization
    loss = (pmf._lower_loss + len(pmf._probs) - 1) * pmf._discretization  # itertools.count(.)
    probs = np.flip(pmf._probs)
    mass_upper, mass_lower = infinity_mass, 0
    for start in range(0, len(probs), _BLOCK):
        prob = probs[start:start + _BLOCK]
        steps = np.full(len(prob), step)
        steps[0] = loss
        losses = np.cumsum(steps)  # loss, loss + step, (loss + step) + step, ...
        uppers = np.cumsum(np.concatenate(([mass_upper], prob)))  # [i]: before step i
        lowers = np.cumsum(np.concatenate(([mass_lower], np.exp(-losses) * prob)))
        with np.errstate(all="ignore"):
            margin = np.log((uppers[:-1] - delta) / lowers[:-1]) - losses
        eligible = (uppers[:-1] > delta) & (lowers[:-1] > 0)
        near = eligible & (np.abs(margin) <= 1e-9 * (1.0 + np.abs(losses)))
        stops = eligible & (margin >= 0)
        for i in np.flatnonzero(near):  # decide these exactly as the loop does
            stops[i] = math.log((uppers[i] - delta) / lowers[i]) >= losses[i]
        lost = (uppers[1:] >= delta) & (lowers[1:] == 0)  # exp(-loss) underflowed: loss is eps
        first = np.flatnonzero(stops | lost)
        if first.size:
            i = int(first[0])
            if not stops[i]:
                return max(0, losses[i])
            mass_upper, mass_lower = uppers[i], lowers[i]
            break
        mass_upper, mass_lower = uppers[-1], lowers[-1]
        loss = losses[-1] + step
    if mass_upper <= mass_lower + delta:
        return 0
    return math.log((mass_upper - delta) / mass_lower)
