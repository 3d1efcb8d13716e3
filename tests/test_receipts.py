"""Per-call figures from the call's own receipts, and --dry-run previews (nothing charged)."""

import threading

import numpy as np
import pytest

from dprdm.privacy import MechanismParams, PrivateRetrieval, accounting, init_budget
from dprdm.privacy.receipts import call_figures, preview
from dprdm.retrieval import build_index

PARAMS = MechanismParams(1.0, 0.5, 5)


@pytest.fixture()
def pair(tmp_path):
    from dprdm.privacy import open_private_index

    build_index(np.random.default_rng(0).normal(size=(100, 8)), tmp_path / "idx")
    init_budget(tmp_path / "idx", 5.0, 1e-5, PARAMS)
    return open_private_index(tmp_path / "idx")


def test_concurrent_calls_each_report_only_their_own_queries(pair):
    index, ledger = pair
    queries = np.random.default_rng(1).normal(size=(2, 8))
    start, reports = threading.Barrier(2), []

    def call():
        receipts: list = []
        start.wait()
        PrivateRetrieval(index, PARAMS, ledger).release(queries, receipts=receipts)
        reports.append(call_figures(receipts, ledger.summary()))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r["queries_by_call"] for r in reports] == [2, 2]  # not 4: the other call's are not ours
    assert sorted(r["ledger_queries_after_own_commit"] for r in reports) == [2, 4]
    one = accounting.epsilon_for(PARAMS, 2, 1e-5)
    both = accounting.epsilon_for(PARAMS, 4, 1e-5)
    assert sum(r["epsilon_spent_by_call"] for r in reports) == pytest.approx(both)
    assert {round(r["epsilon_after_own_commit"], 9) for r in reports} == {round(one, 9),
                                                                          round(both, 9)}


def test_preview_charges_nothing_and_says_when_a_call_would_be_refused(pair):
    _, ledger = pair
    remaining = ledger.remaining_queries()
    plan = preview(ledger, 3)
    assert plan["would_be_refused"] is False and plan["queries_remaining_after"] == remaining - 3
    assert plan["epsilon_after"] == pytest.approx(accounting.epsilon_for(PARAMS, 3, 1e-5))
    too_many = preview(ledger, remaining + 1)
    assert too_many["would_be_refused"] is True and too_many["epsilon_after"] is None
    assert ledger.summary().queries == 0
