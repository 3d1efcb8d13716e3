"""The privacy-critical code of dprdm, small and in one place.

* ``accounting`` -- events and epsilon (dp_accounting PLD enforced, RDP reported), calibration.
* ``sampling``   -- Poisson subsampling in O(qN) (geometric gaps), distribution-identical to a mask.
* ``randomness`` -- noise and coins from OS entropy; no seed reaches them.
* ``mechanism``  -- :class:`PrivateRetrieval`: subsample -> exact k-NN -> (1/k) sum -> + noise,
                    returning only the noised aggregates, after charging the ledger.
* ``ledger``     -- the per-index budget: every release recorded before it is returned; the
                    pinned mechanism; the release watermark (rollback detection).
* ``filter``     -- the RDP filter that accounts a ledger whose mechanism was changed.
* ``binding``    -- index <-> ledger binding: ``open_private_index``, the ONE verified way to open
                    the pair, and ``init_budget`` (``dprdm budget init``).

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
from dprdm.privacy.binding import init_budget, open_private_index
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
    "init_budget",
    "max_queries",
    "open_ledger",
    "open_private_index",
]
