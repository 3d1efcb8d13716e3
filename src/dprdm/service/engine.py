"""The service's generation backend: :class:`GenerationEngine`.

Owns the one :class:`~dprdm.rdm.RetrievalAugmentedGenerator` of a worker (generator backend, as
``--generator`` chose it, private index, ledger, operator-fixed mechanism, optional public index), the lock
that serialises generation, and the budget figures clients see. It has no HTTP in it.

* Every private query goes through ``RetrievalAugmentedGenerator.generate``, which charges the
  ledger (``SqliteLedger.charge``: atomic across threads, workers and processes) before the
  mechanism computes anything; so nothing leaves the service uncounted.
* Generation is CPU-bound and the pipeline's scheduler is stateful: one generation at a time
  per worker (a lock), torch limited to the worker's share of the cores. Scale with workers.
* A request that the budget can no longer afford is refused before it waits for the lock (the
  budget only ever shrinks, so a failed ``can_afford`` is final); ``charge`` remains the check.
* The index and ledger are opened through ``open_private_index`` (verified pair); the
  mechanism is the ledger's pinned one, checked against the config.
* The budget figures are aggregates (epsilon, query counts): no ids, distances or norms.
"""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import asdict, dataclass

import torch

from dprdm.errors import BudgetExceededError, DprdmError
from dprdm.image_files import png_bytes
from dprdm.privacy import MechanismParams, StoredLedger, open_private_index
from dprdm.service.config import ServiceConfig


class _TimedLedger:
    """The real ledger, with the time of each charge() observed (for metrics and the bench)."""

    def __init__(self, ledger: StoredLedger, observe) -> None:
        self._ledger = ledger
        self._observe = observe

    def charge(self, params: MechanismParams, count: int = 1, caller: str = ""):
        started = time.perf_counter()
        try:
            return self._ledger.charge(params, count, caller=caller)
        finally:
            self._observe(time.perf_counter() - started)

    def __getattr__(self, name: str):
        return getattr(self._ledger, name)


@dataclass(frozen=True)
class Generation:
    mode: str
    images_png: list[bytes]
    width: int
    height: int
    seed: int | None
    steps: int
    guidance: float
    content_guidance: float | None = None

    def images_base64(self) -> list[str]:
        return [base64.b64encode(png).decode("ascii") for png in self.images_png]


class GenerationEngine:
    """Loads the models and indexes once; answers generation and budget questions."""

    def __init__(self, config: ServiceConfig, metrics=None, *, encoder=None,
                 pipeline=None, backend=None) -> None:
        """A generator `backend`, or a demo `encoder` and `pipeline`, may be passed in already
        loaded (tests, benchmarks); else the config's generator is loaded."""
        from dprdm.rdm import RetrievalAugmentedGenerator
        from dprdm.retrieval import EmbeddingIndex
        from dprdm.style_estimate import load_style_estimate

        self.config = config
        self.metrics = metrics
        self.params = config.settings.params
        torch.set_num_threads(config.threads)
        private_index, self.ledger = open_private_index(config.index_dir, config.ledger_url)
        if self.ledger.mechanism != self.params:
            raise DprdmError(
                "the mechanism pinned in the index's ledger is not the one this service was "
                "configured with (changed by `dprdm budget set-mechanism`?): restart the service"
            )
        self.capacity = self.ledger.remaining_queries(self.params)  # warms T_max (seconds, once)
        # The epsilon table of the budget figures (computed once per mechanism and budget,
        # shared through the ledger): filled in the background, so responses only look it up.
        threading.Thread(target=self._warm_figures, daemon=True).start()
        if backend is None and (encoder is None or pipeline is None):
            if encoder is not None or pipeline is not None:
                raise DprdmError("pass both a demo encoder and pipeline, or a backend")
            backend = config.generator_choice().load_backend(**config.backend_settings())
        elif backend is None:
            from dprdm.generation.backends.demo import DemoBackend

            backend = DemoBackend(encoder, pipeline, content_guidance=config.content_guidance)
        # The operator's stored style estimate (or a refusal at start-up when it is not this
        # ledger's): each request's one release is shrunk towards it (free post-processing).
        estimate = (load_style_estimate(config.index_dir, self.ledger.ledger_id,
                                        private_index.dim) if config.pool else None)
        # RetrievalAugmentedGenerator refuses an index from another image tower than the
        # backend's here, at start-up, before any request can be charged.
        self.rag = RetrievalAugmentedGenerator(
            backend=backend,
            private_index=private_index,
            ledger=_TimedLedger(self.ledger, self._observe_charge),
            settings=config.settings,
            public_index=(EmbeddingIndex.open(config.public_index_dir)
                          if config.public_index_dir is not None else None),
            ray_address=config.ray_address,  # a sharded index: its shards on Ray
            pool=config.pool, style_estimate=estimate,
        )
        self._lock = threading.Lock()

    def _warm_figures(self) -> None:
        try:
            self.ledger.warm_epsilon_table()
        except Exception:  # noqa: BLE001 - figures are then computed on demand instead
            pass

    def _observe_charge(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.ledger_seconds.observe(seconds)

    # -- budget ---------------------------------------------------------------------------------
    def can_afford(self) -> bool:
        return self.ledger.can_afford(self.params, 1)

    def budget(self) -> dict:
        """The ledger's aggregate figures now (epsilon and query counts only)."""
        started = time.perf_counter()
        summary = self.ledger.summary()
        figures = {
            "epsilon_budget": summary.epsilon_budget,
            "delta": summary.delta,
            "epsilon_spent": summary.epsilon_spent,
            "epsilon_remaining": summary.epsilon_remaining,
            "queries_spent": summary.queries,
            "queries_remaining": self.ledger.remaining_queries(self.params),
        }
        if self.metrics is not None:
            self.metrics.accounting_seconds.observe(time.perf_counter() - started)
        return figures

    def mechanism(self) -> dict:
        return asdict(self.config.settings)

    def style_estimate_releases(self) -> int | None:
        """How many releases the style estimate in use averages (None: none in use)."""
        estimate = self.rag.style_estimate
        return None if estimate is None else estimate.releases

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompt: str, n: int, guidance: float, steps: int, seed: int | None,
                 public_only: bool, caller: str) -> Generation:
        """One prompt -> n images. DP mode charges one private query (raises
        BudgetExceededError, with nothing charged, when the budget cannot afford it)."""
        if not public_only and not self.can_afford():
            raise BudgetExceededError("privacy budget exhausted")
        with self._lock:
            result = self.rag.generate([prompt], n=n, guidance=guidance, steps=steps, seed=seed,
                                       public_only=public_only, caller=caller)
        images = result.images[0]
        return Generation(
            mode="public-only" if public_only else "dp",
            images_png=[png_bytes(image) for image in images],
            width=int(images.shape[2]), height=int(images.shape[1]),
            seed=seed, steps=steps, guidance=guidance,
            content_guidance=getattr(self.rag.backend, "content_guidance", None),
        )
