"""Prometheus metrics of the service: :class:`ServiceMetrics`, exposed at ``GET /metrics``.

Owns the counters and histograms (requests, refusals, latency, generations, ledger time) and
the budget gauges. Nothing here carries private data: only counts, durations and the ledger's
aggregate budget figures.

* Requests, refusals and latencies are counted by each worker. With ``--workers N > 1``,
  ``dprdm serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers
  start, and every scrape (answered by any one worker) sums all workers' files
  (prometheus_client's multi-process mode), so the figures are service-wide.
* The budget gauges are not counted at all: each scrape reads them from the ledger (the one
  source of truth, shared by every worker and process).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LEDGER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _BudgetCollector:
    """Budget gauges read from the ledger at scrape time."""

    def __init__(self, figures: Callable[[], dict]) -> None:
        self._figures = figures

    def collect(self):
        figures = self._figures()
        for name, key, text in (
            ("dprdm_budget_epsilon_total", "epsilon_budget", "Epsilon budget of the index."),
            ("dprdm_budget_epsilon_spent", "epsilon_spent", "Epsilon spent (PLD accountant)."),
            ("dprdm_budget_queries_spent", "queries_spent", "Private queries recorded."),
            ("dprdm_budget_queries_remaining", "queries_remaining",
             "Private queries that still fit the budget."),
        ):
            yield GaugeMetricFamily(name, text, value=float(figures[key]))


class ServiceMetrics:
    """The service's metrics; one instance per app (its own registry, so tests can make many)."""

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.registry = CollectorRegistry()
        self.requests = Counter("dprdm_http_requests", "HTTP requests by route and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("dprdm_http_request_duration_seconds",
                                 "HTTP request latency by route.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.refusals = Counter("dprdm_refusals", "Refused requests by reason "
                                "(unauthorized, invalid, budget_exhausted, quota_exceeded, ...).",
                                ["reason"], registry=self.registry)
        self.generations = Counter("dprdm_generations", "Successful generation requests by mode.",
                                   ["mode"], registry=self.registry)
        self.images = Counter("dprdm_images", "Images returned by mode.", ["mode"],
                              registry=self.registry)
        self.ledger_seconds = Histogram("dprdm_ledger_charge_seconds",
                                        "Time spent in the ledger's charge() per private query.",
                                        buckets=LEDGER_BUCKETS, registry=self.registry)
        self.accounting_seconds = Histogram(
            "dprdm_budget_figures_seconds",
            "Time spent computing the budget figures of a response (accountant + ledger read).",
            buckets=LEDGER_BUCKETS, registry=self.registry)

    def render(self, budget_figures: Callable[[], dict]) -> tuple[bytes, str]:
        """(body, content type) of one scrape."""
        if self.multiprocess_dir is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
        else:
            registry = CollectorRegistry()
            registry.register(_Forward(self.registry))
        registry.register(_BudgetCollector(budget_figures))
        return generate_latest(registry), CONTENT_TYPE_LATEST


class _Forward:
    """Exposes another registry's metrics inside a scrape registry."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self):
        return self._source.collect()
