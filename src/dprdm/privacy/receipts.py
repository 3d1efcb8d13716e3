"""What ONE call charged, and what it would charge: figures built from the call's own receipts.

Owns :func:`call_figures` (after the fact: the ``Charge`` receipts that the ledger returned to this
call) and :func:`preview` (before the fact, for ``--dry-run``: nothing is charged).

Why receipts: several processes may charge one ledger at the same time, so "the ledger's total
after the call minus before it" counts other callers' queries too. A receipt is written inside the
charge's own transaction: ``count`` is what this call charged and ``queries_total`` the ledger's
total right after its own commit, whatever happened around it.

Epsilon figures are the ledger's reported ones (its epsilon table, rounded up to a grid of counts,
so a small call may show 0 and a later one the step). They are given for a ledger with one pinned
mechanism (its epsilon is a function of the query count alone); after ``budget set-mechanism``
the ledger is accounted by an RDP filter and ``dprdm budget show`` is the place to read its
figures, so they are None here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dprdm.privacy import accounting
from dprdm.privacy.accounting import MechanismParams


def _epsilon_at(ledger, params: MechanismParams, queries: int, delta: float) -> float:
    """The ledger's reported epsilon after `queries` releases (its epsilon table: rounded up to
    a grid of counts, so never below the exact figure), or the exact one for ledgers without it."""
    if queries <= 0:
        return 0.0
    if hasattr(ledger, "reported_epsilon"):
        return ledger.reported_epsilon(queries)
    return accounting.epsilon_for(params, queries, delta)


def _single_mechanism(summary) -> bool:
    return len(summary.releases) <= 1 and getattr(summary, "accountant", "pld") != "rdp-filter"


def call_figures(receipts: Sequence[Any], ledger) -> dict[str, Any]:
    """Per-call ledger figures from this call's receipts; the ledger's summary (read after the
    call) gives the budget and what is left now, labelled as the ledger's, not the call's."""
    summary = ledger.summary()
    charged = sum(r.count for r in receipts)
    figures: dict[str, Any] = {
        "queries_by_call": charged,
        "ledger_queries_after_own_commit": receipts[-1].queries_total if receipts else None,
        "epsilon_spent_by_call": None,
        "epsilon_after_own_commit": None,
        "epsilon_budget": summary.epsilon_budget, "delta": summary.delta,
        "ledger_now": {"queries": summary.queries, "epsilon_spent": summary.epsilon_spent,
                       "epsilon_remaining": summary.epsilon_remaining},
    }
    if receipts and _single_mechanism(summary):
        params, delta = receipts[-1].params, summary.delta
        # the call's marginal cost: its own queries, on top of what preceded each of its commits
        spent = sum(_epsilon_at(ledger, params, r.queries_total, delta)
                    - _epsilon_at(ledger, params, r.queries_total - r.count, delta)
                    for r in receipts)
        figures["epsilon_spent_by_call"] = spent
        figures["epsilon_after_own_commit"] = _epsilon_at(ledger, params,
                                                          receipts[-1].queries_total, delta)
    return figures


def preview(ledger, count: int) -> dict[str, Any]:
    """What charging `count` queries with the pinned mechanism would do; charges nothing."""
    count = accounting.check_queries(count)
    summary = ledger.summary()
    params = ledger.mechanism
    remaining = ledger.remaining_queries(params)
    result: dict[str, Any] = {
        "dry_run": True, "queries": count, "would_be_refused": count > remaining,
        "queries_remaining_before": remaining,
        "queries_remaining_after": max(0, remaining - count) if count <= remaining else remaining,
        "epsilon_budget": summary.epsilon_budget, "delta": summary.delta,
        "epsilon_before": summary.epsilon_spent, "epsilon_after": None,
        "mechanism": {"sigma": round(params.sigma, 6), "q": params.q, "k": params.k},
        "accountant": getattr(summary, "accountant", "pld"),
    }
    if _single_mechanism(summary) and count <= remaining:
        result["epsilon_after"] = _epsilon_at(ledger, params, summary.queries + count,
                                              summary.delta)
    return result
