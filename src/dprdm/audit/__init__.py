"""Privacy auditing: an empirical lower bound on epsilon that can catch an implementation bug.

* ``experiment`` -- the canary design (two neighbouring private sets, a worst-case canary) and the
                    trials, run through the real mechanism on real on-disk indexes.
* ``bounds``     -- Clopper-Pearson bounds on a distinguishing test's error rates and the epsilon
                    lower bound they imply (test chosen on one half of the trials, scored on the
                    other).

A correct mechanism's lower bound stays below the accountant's epsilon; a broken one (noise too
small, wrong sensitivity, reused noise or subsample) pushes it above.
"""

from dprdm.audit.bounds import DistinguishingTest, EpsilonLowerBound, epsilon_lower_bound
from dprdm.audit.experiment import (
    AuditResult,
    CanaryDesign,
    MechanismFactory,
    experiment_ledger,
    run_audit,
    worst_case_records,
)

__all__ = [
    "AuditResult",
    "CanaryDesign",
    "DistinguishingTest",
    "EpsilonLowerBound",
    "MechanismFactory",
    "epsilon_lower_bound",
    "experiment_ledger",
    "run_audit",
    "worst_case_records",
]
