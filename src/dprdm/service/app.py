"""The HTTP API and web page: ``create_app(config) -> FastAPI``.

Owns routing, authentication, validation, error mapping, the body-size limit and request
logging/metrics. All policy lives in the library: the engine (and through it the ledger and the
mechanism) decides what may be released; this module only turns HTTP into calls and back.

Routes: ``GET /`` (web page), ``GET /favicon.svg``, ``GET /healthz``, ``GET /v1/info``,
``GET /v1/budget`` (key), ``POST /v1/generate`` (key), ``GET /metrics`` (key, like
``/v1/budget``). ``/docs``, ``/redoc`` and ``/openapi.json`` exist only with ``--docs`` (Swagger
UI and ReDoc load their scripts from a CDN: not served by default, since the page keeps the API
key in this origin's localStorage).

Every request first passes the Host/Origin guard (:mod:`dprdm.service.guard`).

Errors are one JSON object ``{"error": code, "message": text, ...}``:

=====  ======================  ====================================================
400    bad_json                the body is not JSON
400    host_not_allowed        the Host header is not one this server answers for
401    unauthorized            missing, unknown or revoked API key
403    origin_not_allowed      a state-changing request from another origin
403    public_only_disabled    "public_only": true but the operator did not enable it
413    body_too_large          body over the operator's limit
415    unsupported_media_type  the body is not ``application/json``
422    invalid_request         wrong types, ranges, unknown fields, blank/over-long prompt
422    mechanism_fixed         the client sent k, q, sigma or lam
429    budget_exhausted        the privacy budget is spent (with the budget figures)
429    quota_exceeded          the key's query quota is spent (with the key's figures)
=====  ======================  ====================================================

Every refusal is decided before anything is charged, except ``budget_exhausted``, which is the
ledger's own refusal (it charges nothing). No response, log line or error carries private data:
no neighbour ids, distances, counts of kept records or pre-noise values ever reach this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from dprdm import __version__
from dprdm.errors import BudgetExceededError, InvalidParameterError
from dprdm.privacy.sharded import ShardUnavailableError
from dprdm.rdm import MAX_PROMPT_CHARS, check_prompts, check_sampling
from dprdm.service.config import MECHANISM_KEYS, ServiceConfig
from dprdm.service.engine import GenerationEngine
from dprdm.service.guard import HostOriginGuard, HostPolicy
from dprdm.service.keys import KeyInfo, KeyStore
from dprdm.service.metrics import ServiceMetrics
from dprdm.service.schemas import (BudgetResponse, Error, GenerateRequest, GenerateResponse,
                                   Info)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
log = logging.getLogger("dprdm.service")


class ApiError(Exception):
    """A deliberate refusal: status, machine-readable code, message, extra figures."""

    def __init__(self, status: int, code: str, message: str, **extra) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass(frozen=True)
class Caller:
    name: str
    key: KeyInfo | None  # None in keyless local mode

    @property
    def ledger_caller(self) -> str:
        return f"key:{self.name}" if self.key is not None else "local"


def _key_figures(info: KeyInfo | None) -> dict | None:
    if info is None:
        return None
    return {"name": info.name, "quota": info.quota, "used": info.used,
            "quota_remaining": info.quota_remaining}


class _BodyLimit:
    """ASGI middleware: bodies over `max_bytes` get 413 before any route sees them."""

    def __init__(self, app, max_bytes: int, refused) -> None:
        self.app, self.max_bytes, self.refused = app, max_bytes, refused

    async def _refuse(self, send) -> None:
        self.refused("body_too_large")
        body = json.dumps({"error": "body_too_large",
                           "message": f"request bodies are limited to {self.max_bytes} bytes"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await self._refuse(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _RequestLog:
    """ASGI middleware: latency and status of every request into metrics and one log line
    (method, route template, status, milliseconds, key name; never a body or a prompt)."""

    def __init__(self, app, metrics: ServiceMetrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            path = getattr(route, "path", None) or (
                scope["path"] if scope["path"] in self.routes else
                ("/static" if scope["path"].startswith("/static/") else "unmatched"))
            self.metrics.requests.labels(path, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(path).observe(seconds)
            log.info("%s %s %d %.1fms key=%s", scope["method"], path, status[0],
                     1000 * seconds, scope.get("dprdm.key", "-"))


def create_app(config: ServiceConfig, engine: GenerationEngine | None = None) -> FastAPI:
    """The service for `config`; `engine` may be passed in (tests share one between apps)."""
    metrics = ServiceMetrics()
    if engine is None:
        engine = GenerationEngine(config, metrics)
    engine.metrics = metrics
    keys = KeyStore(config.index_dir)
    docs = config.docs
    app = FastAPI(title="dprdm", version=__version__,
                  description="Differentially private retrieval-augmented image generation. "
                              "Every private query is charged to the index's ledger first.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    policy = HostPolicy.for_server(config.host, config.port, config.allowed_hosts)
    app.state.config, app.state.engine, app.state.keys, app.state.metrics = \
        config, engine, keys, metrics

    def refuse(code: str) -> None:
        metrics.refusals.labels(code).inc()

    # -- errors ---------------------------------------------------------------------------------
    def error_response(status: int, code: str, message: str, headers=None, **extra):
        refuse(code)
        return JSONResponse({"error": code, "message": message, **extra}, status_code=status,
                            headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return error_response(error.status, error.code, error.message, headers, **error.extra)

    @app.exception_handler(ShardUnavailableError)
    async def _shard_down(request: Request, error: ShardUnavailableError):
        # a shard of a sharded index failed mid-release: nothing was released, the charge stands
        return error_response(503, error.code, str(error),
                              {"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        problems = error.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error_response(400, "bad_json", "the request body is not valid JSON")
        fixed = sorted({str(p["loc"][-1]) for p in problems if p.get("type") == "extra_forbidden"
                        and p["loc"] and p["loc"][-1] in MECHANISM_KEYS})
        if fixed:
            return error_response(
                422, "mechanism_fixed",
                f"{', '.join(fixed)}: the mechanism parameters (k, q, sigma, lam) are fixed by "
                "the operator and cannot be chosen per request")
        details = []
        for p in problems:  # never echo the input back
            field = ".".join(str(part) for part in p.get("loc", ()) if part != "body") or "body"
            details.append({"field": field, "message": p.get("msg", "invalid")})
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return error_response(422, "invalid_request", message, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse({"error": code, "message": str(error.detail)},
                            status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        log.error("internal error (%s) on %s", type(error).__name__, request.url.path)
        return JSONResponse({"error": "internal_error", "message": "internal error"},
                            status_code=500)

    # -- dependencies ---------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="An API key from `dprdm keys create`.")

    def require_key(request: Request,
                    credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
        if credentials is None:
            if config.keyless_local:
                request.scope["dprdm.key"] = "local"
                return Caller("local", None)
            raise ApiError(401, "unauthorized",
                           "an API key is required: send 'Authorization: Bearer <token>'")
        info = keys.verify(credentials.credentials)
        if info is None:
            raise ApiError(401, "unauthorized", "unknown or revoked API key")
        request.scope["dprdm.key"] = info.name
        return Caller(info.name, info)

    def require_json(request: Request) -> None:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")

    def budget_refusal() -> ApiError:
        hint = (" Public-only generation is still available: send \"public_only\": true."
                if config.allow_public_only else "")
        return ApiError(429, "budget_exhausted",
                        "the privacy budget of this index is spent: no more private queries "
                        "can be answered." + hint,
                        public_only_enabled=config.allow_public_only, **engine.budget())

    # -- routes ---------------------------------------------------------------------------------
    generation_slot = asyncio.Lock()  # one generation at a time per worker (see engine)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html",
                            headers={"Content-Security-Policy": PAGE_CSP,
                                     "Cache-Control": "no-store"})

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", response_model=Info, tags=["service"])
    def info() -> Info:
        return Info(service="dprdm", version=__version__, mechanism=engine.mechanism(),
                    public_only_enabled=config.allow_public_only,
                    keyless_local=config.keyless_local,
                    limits={"max_images": config.max_images, "max_steps": config.max_steps,
                            "default_steps": config.default_steps,
                            "max_prompt_chars": MAX_PROMPT_CHARS,
                            "max_body_bytes": config.max_body_bytes},
                    style_estimate_releases=engine.style_estimate_releases())

    @app.get("/v1/budget", response_model=BudgetResponse, tags=["privacy"],
             responses={401: {"model": Error}})
    def budget(who: Caller = Depends(require_key)) -> BudgetResponse:
        key = keys.get(who.name) if who.key is not None else None
        return BudgetResponse(**engine.budget(), mechanism=engine.mechanism(),
                              public_only_enabled=config.allow_public_only,
                              key=_key_figures(key))

    @app.post("/v1/generate", response_model=GenerateResponse, tags=["generation"],
              responses={s: {"model": Error} for s in (400, 401, 403, 413, 415, 422, 429)})
    async def generate(body: GenerateRequest, who: Caller = Depends(require_key),
                       _json: None = Depends(require_json)) -> GenerateResponse:
        """Generate `n` images for one prompt. In DP mode this is one private query, charged
        to the ledger before anything is computed; `seed` drives only the diffusion sampler."""
        steps = body.steps if body.steps is not None else config.default_steps
        if body.n > config.max_images:
            raise ApiError(422, "invalid_request", f"n: at most {config.max_images} images")
        if steps > config.max_steps:
            raise ApiError(422, "invalid_request", f"steps: at most {config.max_steps}")
        try:  # the library's own checks, before anything is charged
            check_prompts([body.prompt])
            check_sampling(body.n, body.guidance, steps)
        except InvalidParameterError as error:
            raise ApiError(422, "invalid_request", str(error)) from None
        if body.public_only and not config.allow_public_only:
            raise ApiError(403, "public_only_disabled",
                           "public-only generation is not enabled on this server")
        if not body.public_only:
            await run_in_threadpool(admit, who)
        # Blocking work runs in the threadpool; requests waiting for the generator hold no thread.
        async with generation_slot:
            try:
                result = await run_in_threadpool(
                    engine.generate, prompt=body.prompt, n=body.n, guidance=body.guidance,
                    steps=steps, seed=body.seed, public_only=body.public_only,
                    caller=who.ledger_caller)
            except BudgetExceededError:  # the ledger's own refusal: nothing was charged
                if who.key is not None:
                    await run_in_threadpool(keys.refund_quota, who.name, 1)
                raise await run_in_threadpool(budget_refusal) from None
        metrics.generations.labels(result.mode).inc()
        metrics.images.labels(result.mode).inc(len(result.images_png))
        return await run_in_threadpool(respond, result, who)

    def admit(who: Caller) -> None:
        """Before a private query: refuse at once if the budget is gone, then take the key's
        quota (atomically; given back if the ledger refuses)."""
        if not engine.can_afford():
            raise budget_refusal()
        if who.key is not None and not keys.charge_quota(who.name, 1):
            key = keys.get(who.name)
            if key.revoked is not None:
                raise ApiError(401, "unauthorized", "unknown or revoked API key")
            raise ApiError(429, "quota_exceeded", f"the query quota of key {who.name!r} is spent",
                           key=_key_figures(key))

    def respond(result, who: Caller) -> GenerateResponse:
        key = keys.get(who.name) if who.key is not None else None
        return GenerateResponse(
            **engine.budget(), mode=result.mode,
            images=[{"png_base64": data, "width": result.width, "height": result.height}
                    for data in result.images_base64()],
            steps=result.steps, guidance=result.guidance,
            content_guidance=result.content_guidance, seed=result.seed,
            key=_key_figures(key))

    @app.get("/favicon.svg", include_in_schema=False)
    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml",
                            headers={"Cache-Control": "max-age=86400"})

    @app.get("/metrics", include_in_schema=False)
    def prometheus(who: Caller = Depends(require_key)) -> Response:
        """Prometheus text format; the same key rule as /v1/budget (any valid key; a key made
        with --quota 0 can read but never spend)."""
        body, content_type = metrics.render(engine.budget)
        return Response(body, media_type=content_type)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes, refused=refuse)
    app.add_middleware(HostOriginGuard, policy=policy, refused=refuse)  # before everything else
    app.add_middleware(_RequestLog, metrics=metrics,
                       routes={"/", "/healthz", "/v1/info", "/v1/budget", "/v1/generate",
                               "/metrics", "/docs", "/redoc", "/openapi.json", "/favicon.svg",
                               "/favicon.ico"})
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: the config comes from DPRDM_SERVICE_CONFIG."""
    _configure_logging()
    return create_app(ServiceConfig.from_env())


def _configure_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler()  # stderr
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
