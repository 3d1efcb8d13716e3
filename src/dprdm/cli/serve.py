"""`dprdm serve`: the generation service (FastAPI on uvicorn) over one private index."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import typer

from dprdm import demo_layout
from dprdm.cli.output import JSON_OPTION, cli_errors, console, emit

LOG_CONFIG = {  # everything on stderr: with --json, stdout holds one JSON object only
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain",
                            "stream": "ext://sys.stderr"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        "dprdm.service": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}


def serve(
    index: Path = typer.Option(None, "--index", help="Private index directory (with a ledger)."),
    demo: bool = typer.Option(False, "--demo", help="Serve the index `make demo` prepared."),
    config_file: Path = typer.Option(None, "--config",
                                     help="TOML or JSON file with these settings."),
    public_index: Path = typer.Option(None, "--public-index", help="A PUBLIC index (optional)."),
    k: int = typer.Option(None, "--k", help="Only to assert the ledger's pinned k."),
    q: float = typer.Option(None, "--q", help="Only to assert the ledger's pinned q."),
    sigma: float = typer.Option(None, "--sigma", help="Only to assert the ledger's pinned sigma."),
    lam: float = typer.Option(None, "--lam", help="c = lam * released + (1 - lam) * text "
                                                  "(default: the ledger's lam)."),
    host: str = typer.Option(None, "--host", help="Address to listen on [127.0.0.1]."),
    port: int = typer.Option(None, "--port", help="Port [8000]."),
    workers: int = typer.Option(None, "--workers", help="Worker processes [1]."),
    allow_public_only: bool = typer.Option(None, "--allow-public-only/--no-public-only",
                                           help="Serve public-only requests (no private data)."),
    keyless_local: bool = typer.Option(None, "--keyless-local",
                                       help="No API key needed (loopback addresses only)."),
    max_images: int = typer.Option(None, "--max-images", help="Images per request [4]."),
    max_steps: int = typer.Option(None, "--max-steps", help="Diffusion steps limit [100]."),
    default_steps: int = typer.Option(None, "--default-steps", help="Steps if not sent [50]."),
    threads: int = typer.Option(None, "--threads", help="Torch threads per worker."),
    encoder: str = typer.Option(None, "--encoder", help="'demo' or a CLIP model directory."),
    model: Path = typer.Option(None, "--model", help="Generator directory (default: demo)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Serve the HTTP API and web page; the index's ledger enforces the privacy budget.

    The mechanism (k, q, sigma) is the one pinned in the index's ledger (`dprdm budget init`);
    --k/--q/--sigma that differ from it are refused, and clients cannot choose it. With --json, one JSON object describing
    the running service is printed on stdout once it is ready; logs go to stderr.

    Example: dprdm serve --index private-index/ --port 8000 --workers 2 --allow-public-only
    """
    import uvicorn

    from dprdm.service.config import CONFIG_ENV, build_config
    from dprdm.service.metrics import MULTIPROC_ENV

    metrics_dir = None
    with cli_errors(as_json):
        index_dir, public_dir = index, public_index
        if demo:
            index_dir = index_dir or demo_layout.require(demo_layout.private_index_dir())
            if public_dir is None and demo_layout.public_index_dir().exists():
                public_dir = demo_layout.public_index_dir()
        options = dict(index_dir=index_dir, public_index_dir=public_dir, k=k, q=q, sigma=sigma,
                       lam=lam, host=host, port=port, workers=workers,
                       allow_public_only=allow_public_only, keyless_local=keyless_local,
                       max_images=max_images, max_steps=max_steps, default_steps=default_steps,
                       torch_threads=threads, encoder=encoder, model_dir=model)
        config = build_config(options, config_file)
        if config.port == 0:
            from dprdm.errors import InvalidParameterError

            raise InvalidParameterError("give a port in [1, 65535]")
        os.environ[CONFIG_ENV] = config.to_json()
        if config.workers > 1:
            # prometheus_client multi-process mode: set before any worker imports it.
            metrics_dir = tempfile.mkdtemp(prefix="dprdm-metrics-")
            os.environ[MULTIPROC_ENV] = metrics_dir
            figures = _check_index(config)
            target = "dprdm.service.app:create_app_from_env"
        else:
            from dprdm.service.app import create_app

            target = create_app(config)
            figures = target.state.engine.budget()
    started = {
        "url": f"http://{config.host}:{config.port}/",
        "workers": config.workers,
        "index": str(config.index_dir),
        "mechanism": {"sigma": config.settings.sigma, "q": config.settings.q,
                      "k": config.settings.k, "lam": config.settings.lam},
        "budget": figures,
        "public_only_enabled": config.allow_public_only,
        "keyless_local": config.keyless_local,
        "metrics": "multi-process" if config.workers > 1 else "single-process",
    }
    if as_json:
        emit(started, True)
    else:
        console.print(f"dprdm service on [bold]{started['url']}[/] ({config.workers} worker(s)); "
                      f"{figures['queries_remaining']} private queries remain")
    try:
        uvicorn.run(target, factory=isinstance(target, str), host=config.host, port=config.port,
                    workers=config.workers, log_config=LOG_CONFIG, access_log=False)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _check_index(config) -> dict:
    """Open what the workers will open, so that a bad index fails here, once, clearly."""
    from dprdm.privacy import open_private_index
    from dprdm.retrieval import EmbeddingIndex
    from dprdm.service.keys import KeyStore

    _, ledger = open_private_index(config.index_dir)
    if config.public_index_dir is not None:
        EmbeddingIndex.open(config.public_index_dir)
    KeyStore(config.index_dir)
    summary = ledger.summary()
    return {"epsilon_budget": summary.epsilon_budget, "delta": summary.delta,
            "epsilon_spent": summary.epsilon_spent,
            "epsilon_remaining": summary.epsilon_remaining, "queries_spent": summary.queries,
            "queries_remaining": ledger.remaining_queries(config.settings.params)}
