"""The generation service: a multi-client HTTP API and web page over one private index.

* ``config``  -- :class:`ServiceConfig`: what the operator fixes at start-up (the mechanism too).
* ``keys``    -- :class:`KeyStore`: hashed API keys and per-key quotas, beside the ledger.
* ``engine``  -- :class:`GenerationEngine`: the one RetrievalAugmentedGenerator of a worker.
* ``schemas`` -- the pydantic request/response bodies.
* ``metrics`` -- Prometheus counters, histograms and budget gauges.
* ``app``     -- ``create_app(config)``: routes, auth, validation, errors, limits.
* ``static/`` -- the web page (plain HTML, CSS and JS; nothing fetched from elsewhere).

Start it with ``dprdm serve``; the privacy budget is enforced by the index's ledger, which every
worker and process shares. Importing this package loads nothing heavy (no torch, no FastAPI).
"""

__all__ = ["ServiceConfig", "build_config", "create_app"]


def __getattr__(name: str):
    if name in ("ServiceConfig", "build_config"):
        from dprdm.service import config

        return getattr(config, name)
    if name == "create_app":
        from dprdm.service.app import create_app

        return create_app
    raise AttributeError(name)
