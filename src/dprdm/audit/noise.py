"""The audit's noise check: is the released noise N(0, v I), as the accountant assumes?

Owns :func:`check_noise`. The canary design puts every pre-noise aggregate on the line of its
direction u (the canary is +u, every other record -u), so in the (d - 1)-dimensional complement of
u a release is pure noise, in both neighbouring sets and whatever the subsample did. There, after
centring each set on its own mean (2n - 2 degrees of freedom for n trials per set), a correct
mechanism's trial vectors (sums of `queries` releases) are i.i.d. N(0, queries * sigma^2 I):

* each coordinate's sum of squares / (queries * sigma^2) is chi-square(2n - 2): a two-sided exact
  interval for its variance ratio;
* each pair of coordinates' sample correlation r gives r sqrt(nu / (1 - r^2)) ~ Student t(nu),
  nu = 2n - 3, under independence: a two-sided exact test of correlation 0;
* where the design makes the aggregate of the set WITHOUT the canary constant (the worst-case
  record count: a subsample then holds k antipodes but with probability <= 1e-9), also the
  variance along u in that set (chi-square(n - 1)).

All m tests run at level alpha / m (Bonferroni), so a correct mechanism fails the check with
probability <= alpha. The check fails when any test rejects; the report says which statistic was
furthest out and the bounds it was held to. It cannot see a non-Gaussian noise with the right
covariance, nor noise that depends on the data in a way that keeps the covariance (the
distinguishing test of :mod:`.bounds` is the check for those that matter).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dprdm.errors import InvalidParameterError

DEFAULT_NOISE_ALPHA = 1e-6  # false-alarm probability of the whole check for a correct mechanism


@dataclass(frozen=True)
class NoiseCheck:
    """Outcome of the noise-covariance check (variance ratios are measured / expected)."""

    passed: bool
    alpha: float  # false-alarm probability of the whole check
    tests: int  # m: variances + correlations tested, each at alpha / m
    expected_variance: float  # queries * sigma^2 per coordinate of a trial vector
    variance_ratio_min: float
    variance_ratio_max: float
    variance_ratio_interval: tuple[float, float]  # accepted range (complement of u)
    along_canary_variance_ratio: float | None  # None when the design does not fix it
    max_abs_correlation: float
    correlation_bound: float  # accepted |r|
    failures: tuple[str, ...]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["variance_ratio_interval"] = list(self.variance_ratio_interval)
        out["failures"] = list(self.failures)
        return out


def orthogonal_complement(direction: np.ndarray) -> np.ndarray:
    """(d, d - 1) orthonormal basis of the complement of `direction`."""
    direction = np.asarray(direction, dtype=np.float64)
    direction = direction / np.linalg.norm(direction)
    basis, _ = np.linalg.qr(np.column_stack([direction, np.eye(direction.size)]))
    return basis[:, 1 : direction.size]


def check_noise(without: np.ndarray, with_: np.ndarray, direction: np.ndarray,
                expected_variance: float, alpha: float = DEFAULT_NOISE_ALPHA,
                without_aggregate_is_constant: bool = False) -> NoiseCheck:
    """Test that trial vectors `without`, `with_` (n, d each) carry N(0, expected_variance I)
    noise around aggregates that lie on the line of `direction`."""
    if not 0.0 < alpha < 1.0:
        raise InvalidParameterError(f"noise alpha must be in (0, 1), got {alpha}")
    without = np.asarray(without, dtype=np.float64)
    with_ = np.asarray(with_, dtype=np.float64)
    n, d = without.shape
    if with_.shape != (n, d) or n < 4 or d < 2:
        raise InvalidParameterError("the noise check needs two (n >= 4, d >= 2) arrays")
    direction = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    complement = orthogonal_complement(direction)
    residuals = np.concatenate([without - without.mean(axis=0),
                                with_ - with_.mean(axis=0)]) @ complement
    df = 2 * n - 2
    coordinates = d - 1
    pairs = coordinates * (coordinates - 1) // 2
    tests = coordinates + pairs + int(without_aggregate_is_constant)
    alpha_each = alpha / tests

    from scipy.stats import chi2  # imported here: scipy.stats takes seconds to import
    from scipy.stats import t as student_t

    sums_of_squares = np.sum(residuals * residuals, axis=0)
    ratios = sums_of_squares / df / expected_variance
    low, high = (float(chi2.ppf(alpha_each / 2, df)) / df,
                 float(chi2.isf(alpha_each / 2, df)) / df)
    failures = [f"variance of noise coordinate {j} is {ratio:.4g} x expected, outside "
                f"[{low:.4g}, {high:.4g}]" for j, ratio in enumerate(ratios)
                if not low <= ratio <= high]

    max_abs_correlation, correlation_bound = 0.0, 1.0
    if pairs:
        scale = np.sqrt(np.maximum(sums_of_squares, 1e-300))
        correlations = (residuals.T @ residuals) / np.outer(scale, scale)
        upper = np.abs(correlations[np.triu_indices(coordinates, 1)])
        nu = df - 1
        t_bound = float(student_t.isf(alpha_each / 2, nu))
        correlation_bound = t_bound / np.sqrt(nu + t_bound**2)  # |r| at which |t| = t_bound
        max_abs_correlation = float(upper.max())
        if max_abs_correlation > correlation_bound:
            failures.append(f"noise coordinates are correlated: max |r| = "
                            f"{max_abs_correlation:.4g} > {correlation_bound:.4g}")

    along = None
    if without_aggregate_is_constant:
        along_residual = (without - without.mean(axis=0)) @ direction
        along = float(along_residual @ along_residual / (n - 1) / expected_variance)
        along_low = float(chi2.ppf(alpha_each / 2, n - 1)) / (n - 1)
        along_high = float(chi2.isf(alpha_each / 2, n - 1)) / (n - 1)
        if not along_low <= along <= along_high:
            failures.append(f"variance along the canary direction is {along:.4g} x expected, "
                            f"outside [{along_low:.4g}, {along_high:.4g}]")
    return NoiseCheck(
        passed=not failures,
        alpha=alpha,
        tests=tests,
        expected_variance=expected_variance,
        variance_ratio_min=float(ratios.min()),
        variance_ratio_max=float(ratios.max()),
        variance_ratio_interval=(low, high),
        along_canary_variance_ratio=along,
        max_abs_correlation=max_abs_correlation,
        correlation_bound=float(correlation_bound),
        failures=tuple(failures),
    )
