"""The exact discrete Gaussian, vectorised: Canonne, Kamath & Steinke's sampler in numpy.

Owns :func:`discrete_gaussian`, the production noise of ``noise.py``: N_Z(0, s^2) per coordinate
for an INTEGER scale s (``noise_scale`` only ever asks for integers), drawn by Algorithm 3 of
Canonne, Kamath & Steinke, "The Discrete Gaussian for Differential Privacy" (NeurIPS 2020) in
exact integer arithmetic, every random bit from the operating system (``os.urandom``, i.e.
getrandom(2)). It has no seed and no state. Per coordinate:

    t = s + 1
    repeat                                                     (Algorithm 3)
        Y ~ discrete Laplace of scale t                        (Algorithm 2)
        accept Y with probability exp(-(|Y| - s^2/t)^2 / (2 s^2))
    until accepted

and each Bernoulli(exp(-gamma)) with gamma in [0, 1] is Algorithm 1: K = 1; while a
Bernoulli(gamma / K) succeeds, K += 1; succeed when K is odd.

Rewrites that keep every integer below 2^63 (int64) where the paper uses arbitrary precision,
and that draw many coins per numpy pass. Each is an identity between probabilities or a choice
among independent draws that ignores their values, so the output distribution is the paper's:

* Bernoulli(gamma / K) is drawn as Bernoulli(gamma) AND Bernoulli(1 / K), two independent draws:
  K never multiplies a denominator.
* The acceptance exponent is x = (|Y| t - s^2)^2 / (2 s^2 t^2) = (w / m)^2 / 2 with
  w = | |Y| t - s^2 | and m = s t. With c = ceil(w / m) and N = ceil(c^2 / 2),
  exp(-x) = exp(-x / N)^N: the test is N independent Bernoulli(exp(-y)), y = x / N <= 1, each
  by Algorithm 1 with Bernoulli(y) = Bernoulli(p) AND Bernoulli(p) AND Bernoulli(c^2 / (2N)),
  p = w / (c m) <= 1. (w = 0 would mean c = N = 0 and accept; it never happens, since
  s^2 = 1 mod t, but the code handles it.)
* Sequential loops are drawn BLOCK steps at a time: Algorithm 1's successive Bernoulli(gamma/K)
  for K = K0 .. K0 + BLOCK - 1, the Bernoulli(exp(-1)) trials that count Algorithm 2's V, and
  the N rounds of the acceptance test, each as independent draws of one array; the loop's
  outcome is read off the first failure, and draws past it are discarded unread.
* Candidates are drawn in surplus (Algorithms 2 and 3 reject some) and the first accepted ones,
  in draw order, are kept: accepted candidates are i.i.d. draws of the target whatever their
  number, so keeping the first n of them is exact.

For s < 2^26 (:data:`MAX_SCALE`) and |Y| < min(2^62 / t, 2^30 s) every integer above fits in
int64 (c <= 2^30, c^2 <= 2^60, c m < 2^63). A candidate with a larger |Y| (at least 1,024 t: a
chance below exp(-1024) per candidate) is tested all the same, by the same rewrite in Python
integers (:func:`_accept_in_python_integers`). A V of 2^31 or more in Algorithm 2 (chance
exp(-2^31)) raises instead of releasing. Larger scales are refused here; ``noise.py`` draws them
with OpenDP.

Timing: the number of numpy passes, and so the running time, depends on the noise drawn (the
longest V, the rounds of the acceptance test), as with every rejection sampler of this kind,
OpenDP's included (docs/privacy.md, "Side channels").

Uniform integers below a bound b are 64-bit OS words kept when r >= 2^64 mod b and mapped to
r mod b: exactly uniform (the kept range holds a whole number of copies of [0, b)).

Why hand-written: OpenDP's implementation of the same algorithm costs ~22 us of CPU per
coordinate (one call per Bernoulli through arbitrary-precision rationals), 0.56 s of a
100-query batch at d = 512; this one works on whole arrays. OpenDP stays as the test oracle
(tests/test_discrete_gaussian.py compares the two) and for the scales this one refuses.
"""

from __future__ import annotations

import os
import secrets

import numpy as np

from dprdm.errors import InvalidParameterError

EXACT_SAMPLER = "dprdm-discrete-gaussian"
MAX_SCALE = 2**26  # s below this: m = s (s + 1) < 2^53; |Y| is checked per draw (_int64_limit)
BLOCK = 4  # steps of a sequential loop drawn per numpy pass, once few elements still run ...
SMALL_PASS = 1024  # ... i.e. below this many (a pass costs tens of us; larger ones draw 1 step)
_INT64_HEADROOM = 2**62
_MAX_V = 2**31  # t V < 2^57 below it; reaching it takes 2^29 passes (chance exp(-2^31))
# Surplus of candidates: Algorithm 2 keeps ~63 % (E exp(-U/t)), Algorithm 3 ~76 % (54 % at s=1).
_LAPLACE_SURPLUS, _GAUSSIAN_SURPLUS, _MIN_SURPLUS = 1.65, 1.4, 16
_REJECTED = np.iinfo(np.int64).min  # marks a rejected candidate (|candidates| < 2^57)


def _uniform_below(bound: int | np.ndarray, count: int) -> np.ndarray:
    """`count` independent uniform integers in [0, b): one bound `b` for all (an int) or one per
    element (an int64 array of `count` bounds); 1 <= b < 2^63. A 64-bit OS word r is kept when
    r >= 2^64 mod b and gives r mod b."""
    per_element = np.ndim(bound) > 0
    if per_element:
        bounds = np.asarray(bound, dtype=np.uint64)
        pending = np.flatnonzero(bounds > 1)  # a bound of 1 has the one answer 0
    else:
        bounds = np.uint64(bound)
        pending = np.arange(count) if bound > 1 else np.arange(0)
    out = np.zeros(count, dtype=np.int64)
    while pending.size:
        b = bounds[pending] if per_element else bounds
        floor = (-b) % b if per_element else np.uint64((1 << 64) % int(bound))  # 2^64 mod b
        words = np.frombuffer(os.urandom(8 * pending.size), dtype=np.uint64)
        kept = words >= floor
        out[pending[kept]] = (words[kept] % (b[kept] if per_element else b)).astype(np.int64)
        pending = pending[~kept]
    return out


def _coins(count: int) -> np.ndarray:
    """`count` fair coins (Bernoulli(1/2)): the low bit of an OS byte each."""
    return (np.frombuffer(os.urandom(count), dtype=np.uint8) & 1).astype(bool)


def _bernoulli(numerators: int | np.ndarray, denominators: int | np.ndarray,
               count: int) -> np.ndarray:
    """`count` independent Bernoulli(n / d) (0 <= n <= d, 1 <= d < 2^63), exactly; n and d are
    ints or per-element int64 arrays."""
    return _uniform_below(denominators, count) < numerators


def _block(running: int) -> int:
    """Steps drawn per pass for `running` elements: one while the arrays are large (no coin is
    drawn in vain), BLOCK once the pass's fixed cost dominates."""
    return 1 if running >= SMALL_PASS else BLOCK


def _first_failure(success: np.ndarray) -> np.ndarray:
    """Per row of a (n, L) boolean array, the column of its first False (L when there is none)."""
    return np.where(success.all(axis=1), success.shape[1], success.argmin(axis=1))


def _bernoulli_exp_minus(bernoulli_gamma, count: int) -> np.ndarray:
    """Bernoulli(exp(-gamma_i)) for i < count by Algorithm 1, gamma_i in [0, 1].

    `bernoulli_gamma(indices)` draws a fresh Bernoulli(gamma_i) for every entry of `indices`
    (repeats included); Bernoulli(gamma / K) is that AND an independent Bernoulli(1 / K). Each
    pass draws K = K0 .. K0 + L - 1 (L = :func:`_block`) for every running i; K is where the
    first one fails."""
    final_k = np.ones(count, dtype=np.int64)
    first_k = np.ones(count, dtype=np.int64)
    running = np.arange(count)
    while running.size:
        block = _block(running.size)
        ks = first_k[running][:, None] + np.arange(block)
        success = (bernoulli_gamma(np.repeat(running, block)) &
                   _bernoulli(1, ks.ravel(), ks.size)).reshape(ks.shape)
        column = _first_failure(success)
        failed = column < block
        final_k[running[failed]] = ks[failed, column[failed]]
        first_k[running[~failed]] += block
        running = running[~failed]
    return final_k % 2 == 1


def _bernoulli_exp_minus_one(count: int) -> np.ndarray:
    """Bernoulli(exp(-1)), `count` times."""
    return _bernoulli_exp_minus(lambda indices: np.ones(indices.size, dtype=bool), count)


def _laplace_candidates(t: int, count: int) -> np.ndarray:
    """`count` runs of Algorithm 2's loop body: the signed candidate where it is accepted, and
    a marker (the int64 minimum) where it is rejected."""
    u = _uniform_below(t, count)
    keep = _bernoulli_exp_minus(lambda i: _bernoulli(u[i], t, i.size), count)  # exp(-U/t)
    v = np.zeros(count, dtype=np.int64)
    counting = np.flatnonzero(keep)
    while counting.size:  # V: Bernoulli(exp(-1)) successes before the first failure
        block = _block(counting.size)
        column = _first_failure(_bernoulli_exp_minus_one(counting.size * block).reshape(-1, block))
        v[counting] += column
        counting = counting[column == block]
    if v.max(initial=0) >= _MAX_V:
        raise RuntimeError("discrete Laplace: V out of the int64 range")
    x = u + t * v  # < 2^57: t <= 2^26 and V < 2^31
    negative = _coins(count)
    keep &= ~(negative & (x == 0))
    return np.where(keep, np.where(negative, -x, x), _REJECTED)


def _first_accepted(candidates, count: int, surplus: float) -> np.ndarray:
    """The first `count` accepted candidates in draw order; `candidates(n)` draws n and marks
    the rejected ones with the int64 minimum."""
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        need = count - filled
        drawn = candidates(int(need * surplus) + _MIN_SURPLUS)
        accepted = drawn[drawn != _REJECTED][:need]
        out[filled:filled + accepted.size] = accepted
        filled += accepted.size
    return out


def discrete_laplace(t: int, count: int) -> np.ndarray:
    """`count` draws of the discrete Laplace P(x) ~ exp(-|x| / t) (Algorithm 2, integer t)."""
    return _first_accepted(lambda n: _laplace_candidates(t, n), count, _LAPLACE_SURPLUS)


def _accept(magnitudes: np.ndarray, s: int) -> np.ndarray:
    """Bernoulli(exp(-(|Y| t - s^2)^2 / (2 s^2 t^2))) per |Y| (int64, |Y| below
    :func:`_int64_limit`), by the N-fold rewrite of the module docstring, :func:`_block` rounds
    a pass."""
    t = s + 1
    m = s * t
    w = np.abs(magnitudes * t - s * s)
    c = -(-w // m)  # ceil(w / m); 0 exactly when w = 0
    rounds = (c * c + 1) // 2  # N = ceil(c^2 / 2)
    remaining = rounds.copy()
    accepted = np.ones(magnitudes.size, dtype=bool)
    running = np.flatnonzero(remaining > 0)
    while running.size:
        block = _block(running.size)
        p_num, p_den = np.repeat(w[running], block), np.repeat(c[running] * m, block)
        q_num, q_den = np.repeat(c[running] ** 2, block), np.repeat(2 * rounds[running], block)

        def bernoulli_y(i, p_num=p_num, p_den=p_den, q_num=q_num, q_den=q_den):
            return (_bernoulli(p_num[i], p_den[i], i.size) & _bernoulli(p_num[i], p_den[i], i.size)
                    & _bernoulli(q_num[i], q_den[i], i.size))

        success = _bernoulli_exp_minus(bernoulli_y, p_num.size).reshape(-1, block)
        used = np.minimum(remaining[running], block)  # rounds of this pass; the rest is unread
        failed = (~success & (np.arange(block) < used[:, None])).any(axis=1)
        accepted[running[failed]] = False
        remaining[running] -= used
        running = running[~failed & (remaining[running] > 0)]
    return accepted


def _bernoulli_python(numerator: int, denominator: int) -> bool:
    return secrets.randbelow(denominator) < numerator  # secrets: os.urandom


def _accept_in_python_integers(magnitude: int, s: int) -> bool:
    """:func:`_accept` for one |Y| too large for int64, in Python integers, one step at a time."""
    t = s + 1
    m = s * t
    w = abs(magnitude * t - s * s)
    c = -(-w // m)
    rounds = (c * c + 1) // 2
    for _ in range(rounds):
        k = 1
        while (_bernoulli_python(w, c * m) and _bernoulli_python(w, c * m)
               and _bernoulli_python(c * c, 2 * rounds) and _bernoulli_python(1, k)):
            k += 1
        if k % 2 == 0:
            return False
    return True


def _int64_limit(s: int) -> int:
    """|Y| below this keeps |Y| t < 2^62 and c = ceil(w / m) <= 2^30 (so c^2 <= 2^60)."""
    return min(_INT64_HEADROOM // (s + 1), 2**30 * s)


def _gaussian_candidates(s: int, count: int) -> np.ndarray:
    """`count` runs of Algorithm 3's loop body (rejected ones marked with the int64 minimum)."""
    y = discrete_laplace(s + 1, count)
    magnitudes = np.abs(y)
    small = magnitudes < _int64_limit(s)
    accepted = np.zeros(count, dtype=bool)
    accepted[small] = _accept(magnitudes[small], s)
    for i in np.flatnonzero(~small):
        accepted[i] = _accept_in_python_integers(int(magnitudes[i]), s)
    return np.where(accepted, y, _REJECTED)


def discrete_gaussian(s: int, count: int) -> np.ndarray:
    """`count` independent draws of N_Z(0, s^2) (Algorithm 3) for an integer 1 <= s < 2^26."""
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < MAX_SCALE:
        raise InvalidParameterError(f"the exact sampler takes an integer scale in [1, 2^26), "
                                    f"got {s!r}")
    return _first_accepted(lambda n: _gaussian_candidates(s, n), count, _GAUSSIAN_SURPLUS)
