"""The RDP privacy filter: the accountant of a ledger whose mechanism was changed.

Owns :class:`RdpFilter`. PLD composition (``accounting.epsilon``) is proven for a sequence of
mechanisms fixed in advance. Once the operator changes a ledger's mechanism (``dprdm budget
set-mechanism``) the later mechanisms may have been chosen after seeing earlier outputs, and the
ledger is accounted with a privacy filter instead:

    Feldman & Zrnic (2021), "Individual Privacy Accounting via a Renyi Filter": for ONE order alpha
    fixed before any release, an adaptively chosen sequence of mechanisms whose RDP at alpha
    sums to at most B, stopped (by the filter) before the sum would exceed B, is (alpha, B)-RDP.

alpha is fixed at ``budget init`` from public parameters only (the optimal RDP order of the pinned
mechanism at its capacity) and stored in the ledger. B is the largest RDP level whose conversion to
(epsilon, delta) -- dp_accounting's ``compute_epsilon`` at that single order -- is within the
epsilon budget. Every release, those made under the first mechanism included, counts in the sum
with its RDP at alpha (add/remove adjacency, Poisson-subsampled Gaussian, computed by
dp_accounting). The filter admits a charge only if the sum after it is <= B, so it never admits
beyond B.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from dp_accounting.rdp import rdp_privacy_accountant

from dprdm.errors import BudgetExceededError
from dprdm.privacy import accounting
from dprdm.privacy.accounting import ADJACENCY, MechanismParams

Totals = dict[MechanismParams, int]


@functools.lru_cache(maxsize=1024)
def rdp_per_release(params: MechanismParams, order: float) -> float:
    """RDP at `order` of ONE release with `params` (dp_accounting; add/remove adjacency)."""
    accountant = rdp_privacy_accountant.RdpAccountant(orders=[order],
                                                      neighboring_relation=ADJACENCY)
    accountant.compose(params.event(1))
    return float(accountant._rdp[0])  # dp_accounting keeps the RDP curve here (no public getter)


def epsilon_at(order: float, rdp: float, delta: float) -> float:
    """(epsilon, delta) of an (order, rdp)-RDP guarantee: dp_accounting's single-order conversion."""
    if rdp <= 0.0:
        return 0.0
    return float(rdp_privacy_accountant.compute_epsilon([order], [rdp], delta)[0])


def rdp_bound(order: float, epsilon: float, delta: float) -> float:
    """B: the largest RDP level at `order` whose conversion is <= epsilon (bisection, from below)."""
    low, high = 0.0, max(1.0, epsilon)
    while epsilon_at(order, high, delta) <= epsilon:
        low, high = high, high * 2
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if epsilon_at(order, middle, delta) <= epsilon else (low, middle)
    return low


def choose_order(params: MechanismParams, epsilon: float, delta: float) -> float:
    """alpha: the optimal RDP order of `params` at its capacity (public parameters only)."""
    capacity = max(1, accounting.max_queries(params, epsilon, delta))
    return float(accounting.epsilon_rdp([(params, capacity)], delta)[1])


@dataclass(frozen=True)
class RdpFilter:
    """An RDP filter at one order: admits releases while their RDP sum stays <= bound."""

    order: float
    bound: float
    epsilon_budget: float
    delta: float

    @classmethod
    def for_budget(cls, order: float, epsilon: float, delta: float) -> RdpFilter:
        return cls(order, rdp_bound(order, epsilon, delta), epsilon, delta)

    def spent(self, totals: Totals) -> float:
        """The RDP sum at `order` of every release recorded in `totals`."""
        return math.fsum(count * rdp_per_release(p, self.order) for p, count in totals.items())

    def epsilon_spent(self, totals: Totals) -> float:
        return epsilon_at(self.order, self.spent(totals), self.delta)

    def admit(self, totals: Totals, params: MechanismParams, count: int) -> Totals:
        """The totals after `count` more releases with `params`; raises if the sum would pass B."""
        after = dict(totals)
        after[params] = after.get(params, 0) + count
        if self.spent(after) > self.bound:
            raise BudgetExceededError(
                f"privacy budget exceeded (RDP filter at order {self.order:g}: this ledger's "
                f"mechanism was changed, see `dprdm budget show`): RDP spent "
                f"{self.spent(totals):.4g} of {self.bound:.4g}; {count} more "
                f"quer{'y' if count == 1 else 'ies'} with sigma={params.sigma:g}, "
                f"q={params.q:g}, k={params.k} would bring it to {self.spent(after):.4g}. "
                "Nothing was charged or released."
            )
        return after

    def remaining(self, totals: Totals, params: MechanismParams) -> int:
        """How many more releases with `params` the filter admits."""
        per_release = rdp_per_release(params, self.order)
        left = self.bound - self.spent(totals)
        if left < 0 or per_release <= 0:
            return 0 if left < 0 else accounting.MAX_QUERIES_SEARCHED
        count = int(left // per_release)
        while count > 0 and self.spent({**totals, params: totals.get(params, 0) + count}) > self.bound:
            count -= 1  # floating-point rounding of the division: settle against admit's own sum
        return count

    def describe(self) -> dict:
        return {"order": self.order, "rdp_bound": self.bound,
                "statement": f"({self.order:g}, {self.bound:.4g})-RDP, hence "
                             f"({self.epsilon_budget:g}, {self.delta:g})-DP"}
