"""Bench-only switch: a ledger WITHOUT the epsilon table, i.e. the budget figures as every DP
response computed them before it (a fresh PLD + RDP for the exact new ledger state).

bench/service.py puts this folder first on the PYTHONPATH of its "before" server and sets
DPRDM_BENCH_NO_EPSILON_TABLE=1; Python imports ``sitecustomize`` at start-up in the server and in
every worker it spawns. Only the reported figures change (admission never used the table). Never
used by dprdm itself.
"""

import os

if os.environ.get("DPRDM_BENCH_NO_EPSILON_TABLE") == "1":
    from dprdm.privacy import accounting
    from dprdm.privacy import ledger as _ledger

    def _exact_epsilon(self, params, count):
        groups = [(params, count)]
        return (accounting.epsilon(groups, self.delta),
                accounting.epsilon_rdp(groups, self.delta)[0])

    _ledger.epsilon_grid_point = lambda count, capacity, ratio=None: count  # the exact count
    _ledger.StoredLedger._tabulated_epsilon = _exact_epsilon  # no memo, no stored table
    _ledger.StoredLedger.warm_epsilon_table = lambda self, up_to=None: 0
