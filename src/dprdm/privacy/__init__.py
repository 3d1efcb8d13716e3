"""The privacy-critical code of dprdm, small and in one place.

* ``accounting`` -- events and epsilon (dp_accounting PLD enforced, RDP reported), calibration.
* ``sampling``   -- Poisson subsampling in O(qN) (geometric gaps), distribution-identical to a mask.
* ``randomness`` -- noise and coins from OS entropy; no seed reaches them.
* ``mechanism``  -- :class:`PrivateRetrieval`: subsample -> exact k-NN -> (1/k) sum -> + noise,
                    returning only the noised aggregates, after charging the ledger.
* ``ledger``     -- the per-index budget: every release recorded before it is returned.

Every other package reaches private data only through :class:`PrivateRetrieval`.
"""

from dprdm.privacy.accounting import (
    MechanismParams,
    calibrate_q,
    calibrate_sigma,
    epsilon,
    epsilon_for,
    epsilon_rdp,
    max_queries,
)
from dprdm.privacy.ledger import InMemoryLedger, LedgerSummary, SqliteLedger, open_ledger
from dprdm.privacy.mechanism import ArrayVectors, PrivateRetrieval

__all__ = [
    "ArrayVectors",
    "InMemoryLedger",
    "LedgerSummary",
    "MechanismParams",
    "PrivateRetrieval",
    "SqliteLedger",
    "calibrate_q",
    "calibrate_sigma",
    "epsilon",
    "epsilon_for",
    "epsilon_rdp",
    "max_queries",
    "open_ledger",
]
