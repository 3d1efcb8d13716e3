"""Privacy auditing: an empirical lower bound on epsilon that can catch an implementation bug.

* ``experiment`` -- the canary design (two neighbouring private sets, a worst-case canary) and the
                    trials, run through the real mechanism on real on-disk indexes.
* ``statistics`` -- per-trial scores of the whole released vector (projection on the canary's
                    direction, a linear discriminant and a Gaussian likelihood ratio fitted on the
                    selection half).
* ``bounds``     -- Clopper-Pearson bounds on a distinguishing test's error rates and the epsilon
                    lower bound they imply (statistic and test chosen on one half of the trials,
                    scored on the other).
* ``noise``      -- the check that the released noise is N(0, sigma^2 I) (variances and
                    correlations, Bonferroni-controlled false-alarm rate).

A correct mechanism's lower bound stays below the accountant's epsilon and its noise passes the
check; a broken one (noise too small or correlated, wrong sensitivity, reused noise or subsample)
pushes the bound above the claim or fails the noise check.
"""

from dprdm.audit.bounds import (
    DistinguishingTest,
    EpsilonLowerBound,
    epsilon_lower_bound,
    epsilon_lower_bound_among,
)
from dprdm.audit.experiment import (
    AuditResult,
    CanaryDesign,
    MechanismFactory,
    experiment_ledger,
    run_audit,
    worst_case_records,
)
from dprdm.audit.noise import NoiseCheck, check_noise

__all__ = [
    "AuditResult",
    "CanaryDesign",
    "DistinguishingTest",
    "EpsilonLowerBound",
    "MechanismFactory",
    "NoiseCheck",
    "check_noise",
    "epsilon_lower_bound",
    "epsilon_lower_bound_among",
    "experiment_ledger",
    "run_audit",
    "worst_case_records",
]
