"""`dprdm serve`: the generation service (FastAPI on uvicorn) over one private index."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import typer

from dprdm import demo_layout
from dprdm.cli.generator_options import GENERATOR_CHOICE, generator_options
from dprdm.cli.output import (JSON_OPTION, LEDGER_OPTION, RAY_PRIVATE_NETWORK, cli_errors,
                              console, emit)
from dprdm.errors import InvalidParameterError
from dprdm.service.guard import HostPolicy, bracketed

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


@generator_options
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
    allowed_host: list[str] = typer.Option(
        None, "--allowed-host", metavar="NAME",
        help="A Host name clients use (repeatable; NAME any port, NAME:PORT one port, '*' any "
             "name). Loopback names with the port are always allowed. Not with --keyless-local."),
    content_guidance: float = typer.Option(
        None, "--content-guidance", metavar="G",
        help="Demo generator: split guidance for every request, G the prompt text's own scale "
             "(the request's guidance then scales only what the released condition adds; see "
             "docs/generator.md). Default: the generator's own (the shipped one: 6), "
             "else plain guidance."),
    pool: bool = typer.Option(None, "--pool/--no-pool",
                              help="Shrink every request's DP release towards the index's "
                                   "style estimate, when the operator made one (`dprdm budget "
                                   "style-estimate`; free) [on]."),
    docs: bool = typer.Option(None, "--docs/--no-docs",
                              help="Serve /docs, /redoc, /openapi.json (Swagger UI and ReDoc "
                                   "load their scripts from a CDN); off by default."),
    ledger_url: str = LEDGER_OPTION,
    ray_address: str = typer.Option(
        None, "--ray-address",
        help="A sharded --index only: run its shards as Ray actors ('local': an in-process Ray, "
             "one worker only; 'auto' / host:port: the actors `dprdm index serve-shards` "
             "started). Without it a sharded index runs in each worker process. A shard that is "
             "down answers 503 shard_unavailable with Retry-After. " + RAY_PRIVATE_NETWORK),
    choice=GENERATOR_CHOICE,
    as_json: bool = JSON_OPTION,
) -> None:
    """Serve the HTTP API and web page; the index's ledger enforces the privacy budget.

    The mechanism (k, q, sigma) is the one pinned in the index's ledger (`dprdm budget init`);
    --k/--q/--sigma that differ from it are refused, and clients cannot choose it. The server
    answers only for the loopback names and --host with its port, plus each --allowed-host
    (DNS-rebinding protection), and refuses state-changing requests from other origins. With
    --json, one JSON object describing the running service is printed on stdout once the port is
    bound and /healthz answers; a taken port is an error (exit 2). Logs go to stderr.

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
        options = dict(index_dir=index_dir, ledger_url=ledger_url, ray_address=ray_address,
                       public_index_dir=public_dir, k=k, q=q, sigma=sigma,
                       lam=lam, host=host, port=port, workers=workers,
                       allow_public_only=allow_public_only, keyless_local=keyless_local,
                       max_images=max_images, max_steps=max_steps, default_steps=default_steps,
                       torch_threads=threads, content_guidance=content_guidance,
                       allowed_hosts=tuple(allowed_host) if allowed_host else None, docs=docs,
                       pool=pool)
        options.update(_generator_settings(choice))
        config = build_config(options, config_file)
        if config.port == 0:
            raise InvalidParameterError("give a port in [1, 65535]")
        sock = bind_socket(config.host, config.port)  # before the models load: fail fast
        content_guidance = config.content_guidance
        try:
            os.environ[CONFIG_ENV] = config.to_json()
            if config.workers > 1:
                # prometheus_client multi-process mode: set before any worker imports it.
                metrics_dir = tempfile.mkdtemp(prefix="dprdm-metrics-")
                os.environ[MULTIPROC_ENV] = metrics_dir
                figures = _check_index(config)
                style_estimate = figures.pop("style_estimate")
                target = "dprdm.service.app:create_app_from_env"
            else:
                from dprdm.service.app import create_app

                target = create_app(config)
                figures = dict(target.state.engine.budget(),
                               ledger=target.state.engine.ledger.location)
                # not given: the one the loaded generator records (multi-process: its workers')
                content_guidance = getattr(target.state.engine.rag.backend, "content_guidance",
                                           config.content_guidance)
                estimate = target.state.engine.rag.style_estimate
                style_estimate = None if estimate is None else estimate.describe()
        except BaseException:
            sock.close()
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
            raise
    started = {
        "url": f"http://{bracketed(config.host)}:{config.port}/",
        "workers": config.workers,
        "index": str(config.index_dir),
        "ledger": figures.pop("ledger"),
        "ray_address": config.ray_address,
        "mechanism": {"sigma": config.settings.sigma, "q": config.settings.q,
                      "k": config.settings.k, "lam": config.settings.lam},
        "budget": figures,
        "public_only_enabled": config.allow_public_only,
        "keyless_local": config.keyless_local,
        "allowed_hosts": HostPolicy.for_server(config.host, config.port,
                                               config.allowed_hosts).names(),
        "docs": config.docs,  # /docs, /redoc, /openapi.json; their scripts come from a CDN
        "metrics": "multi-process" if config.workers > 1 else "single-process",
        "generator": config.generator,
        "content_guidance": content_guidance,
        "style_estimate": style_estimate,
    }

    def announce() -> None:
        if as_json:
            emit(started, True)
        else:
            console.print(f"dprdm service on [bold]{started['url']}[/] ({config.workers} "
                          f"worker(s)); {figures['queries_remaining']} private queries remain")
            if config.docs:
                console.print("API docs on /docs: Swagger UI and ReDoc load their scripts from "
                              "cdn.jsdelivr.net")

    uv_config = uvicorn.Config(target, factory=isinstance(target, str), host=config.host,
                               port=config.port, workers=config.workers, log_config=LOG_CONFIG,
                               access_log=False)
    server = uvicorn.Server(uv_config)
    stop = threading.Event()
    threading.Thread(target=_announce_when_healthy, args=(config, announce, stop),
                     daemon=True).start()
    try:
        if config.workers > 1:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(uv_config, sockets=[sock]).run()
        else:
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if config.workers == 1 and not server.started:
        raise typer.Exit(code=3)


def _generator_settings(choice) -> dict:
    """The generator flags given on the command line, as config keys (a flag left at its default
    leaves the config file's value in place)."""
    from dprdm.generation.backends.choice import GeneratorChoice

    default = GeneratorChoice()
    keys = {"generator": "generator", "model": "model_dir", "prior": "prior_dir",
            "encoder": "encoder", "adapter": "adapter_file", "device": "device",
            "attention_slicing": "attention_slicing", "cpu_offload": "cpu_offload",
            "batch_size": "batch_size", "image_size": "image_size"}
    return {keys[name]: value for name, value in choice.to_dict().items()
            if value != getattr(default, name)}


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a clear error (exit 2) before
    anything loads, and so that "ready" means bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise InvalidParameterError(
                f"port {port} on {host} is already in use (another server?): stop it or give "
                "another --port") from None
        raise InvalidParameterError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _announce_when_healthy(config, announce, stop: threading.Event) -> None:
    """Call `announce` once, when /healthz answers 200 on the bound socket."""
    import http.client

    connect = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(config.host, config.host)
    while not stop.wait(0.2):
        conn = http.client.HTTPConnection(connect, config.port, timeout=5)
        try:
            conn.request("GET", "/healthz", headers={
                "Host": f"{bracketed(connect)}:{config.port}"})
            if conn.getresponse().status == 200:
                announce()
                return
        except OSError:
            pass
        finally:
            conn.close()


def _check_index(config) -> dict:
    """Open what the workers will open, so that a bad index fails here, once, clearly."""
    from dprdm.privacy import open_private_index
    from dprdm.retrieval import EmbeddingIndex
    from dprdm.service.keys import KeyStore
    from dprdm.style_estimate import load_style_estimate

    private, ledger = open_private_index(config.index_dir, config.ledger_url)
    indexes = [(private, "private")]
    if config.public_index_dir is not None:
        indexes.append((EmbeddingIndex.open(config.public_index_dir), "public"))
    # the generator's image tower alone: an index from another tower fails here, once
    choice = config.generator_choice()
    space = choice.load_image_tower().space
    for index, what in indexes:
        space.check_index(index.path, index.dim, what, require_record=choice.generator != "demo")
    KeyStore(config.index_dir)
    estimate = (load_style_estimate(config.index_dir, ledger.ledger_id, private.dim)
                if config.pool else None)  # a foreign or broken estimate fails here, once
    summary = ledger.summary()
    return {"ledger": ledger.location,
            "style_estimate": None if estimate is None else estimate.describe(),
            "epsilon_budget": summary.epsilon_budget, "delta": summary.delta,
            "epsilon_spent": summary.epsilon_spent,
            "epsilon_remaining": summary.epsilon_remaining, "queries_spent": summary.queries,
            "queries_remaining": ledger.remaining_queries(config.settings.params)}
