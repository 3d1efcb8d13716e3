"""The HTTP API through FastAPI's TestClient: auth, generation, budget, quotas, validation."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from _service_support import (ID_PREFIX, LAM, MECHANISM_FLAGS, PARAMS, SETTINGS, Service,
                              ServerProcess, ThreadedServer, free_port, make_index)
from dprdm.cli import app as cli_app
from dprdm.errors import DprdmError, InvalidParameterError
from dprdm.privacy import SqliteLedger
from dprdm.rdm import MechanismSettings
from dprdm.retrieval import build_index
from dprdm.service.config import ServiceConfig, build_config
from dprdm.service.engine import Generation

FAST = {"n": 1, "steps": 2}
RESPONSE_FIELDS = {"epsilon_budget", "delta", "epsilon_spent", "epsilon_remaining",
                   "queries_spent", "queries_remaining", "mode", "images", "steps", "guidance",
                   "content_guidance", "seed", "key"}


@pytest.fixture()
def service(tmp_path):
    return Service(tmp_path)


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory):
    """One service for the table of bad requests: none of them may charge anything."""
    return Service(tmp_path_factory.mktemp("shared"))


def decode_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_generate_charges_one_query_and_returns_images_and_figures(service):
    response = service.generate(prompt="red apple", n=2, steps=2, seed=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == RESPONSE_FIELDS
    assert body["mode"] == "dp" and len(body["images"]) == 2
    for image in body["images"]:
        png = decode_png(image["png_base64"])
        assert png.format == "PNG" and png.size == (image["width"], image["height"]) == (32, 32)
    summary = SqliteLedger(service.index).summary()
    assert summary.queries == body["queries_spent"] == 1
    assert body["epsilon_spent"] == pytest.approx(summary.epsilon_spent)
    assert 0 < body["epsilon_spent"] < body["epsilon_budget"] == 2.0
    assert body["queries_remaining"] == SqliteLedger(service.index).remaining_queries(PARAMS)
    assert body["key"] == {"name": "alice", "quota": None, "used": 1, "quota_remaining": None}
    assert ID_PREFIX not in response.text
    conn = sqlite3.connect(service.index / "ledger.sqlite")
    assert conn.execute("SELECT caller FROM releases").fetchall() == [("key:alice",)]


def test_the_seed_drives_only_the_diffusion_sampler(tmp_path):
    service = Service(tmp_path, allow_public_only=True)
    public = [service.generate(prompt="red apple", seed=5, public_only=True, **FAST).json()
              for _ in range(2)]
    assert public[0]["images"] == public[1]["images"]  # same seed, no noise: same image
    assert public[0]["epsilon_spent"] == 0.0 and service.queries == 0
    private = [service.generate(prompt="red apple", seed=5, **FAST).json() for _ in range(2)]
    # Same seed, fresh OS-entropy privacy noise each time (sigma = 2): different conditions.
    assert private[0]["images"] != private[1]["images"]
    assert service.queries == 2


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer dprdm_not-a-real-token"}, {"Authorization": "Bearer "},
    {"Authorization": "Basic YWxpY2U6c2VjcmV0"}, {"Authorization": "dprdm_xyz"},
], ids=["missing", "unknown", "empty", "basic", "no-scheme"])
def test_missing_or_unknown_keys_get_401_and_nothing_is_charged(service, headers):
    response = service.generate(headers=headers, prompt="red apple", **FAST)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert service.client.get("/v1/budget", headers=headers).status_code == 401
    assert service.queries == 0


def test_a_revoked_key_is_refused(service):
    assert service.generate(prompt="red apple", **FAST).status_code == 200
    service.keys.revoke("alice")
    response = service.generate(prompt="red apple", **FAST)
    assert response.status_code == 401 and service.queries == 1


BAD_REQUESTS = [
    # (name, body (dict -> JSON, bytes -> raw), content type, status, error code)
    ("empty prompt", {"prompt": ""}, None, 422, "invalid_request"),
    ("blank prompt", {"prompt": "   \n "}, None, 422, "invalid_request"),
    ("over-long prompt", {"prompt": "a" * 501}, None, 422, "invalid_request"),
    ("control characters", {"prompt": "red\x00apple"}, None, 422, "invalid_request"),
    ("prompt not a string", {"prompt": 123}, None, 422, "invalid_request"),
    ("prompt null", {"prompt": None}, None, 422, "invalid_request"),
    ("prompt missing", {"n": 1}, None, 422, "invalid_request"),
    ("n = 0", {"prompt": "x", "n": 0}, None, 422, "invalid_request"),
    ("n over the operator's limit", {"prompt": "x", "n": 5}, None, 422, "invalid_request"),
    ("n over the hard limit", {"prompt": "x", "n": 1000}, None, 422, "invalid_request"),
    ("n as a string", {"prompt": "x", "n": "2"}, None, 422, "invalid_request"),
    ("n as a float", {"prompt": "x", "n": 1.5}, None, 422, "invalid_request"),
    ("n as a bool", {"prompt": "x", "n": True}, None, 422, "invalid_request"),
    ("negative guidance", {"prompt": "x", "guidance": -1}, None, 422, "invalid_request"),
    ("guidance as text", {"prompt": "x", "guidance": "high"}, None, 422, "invalid_request"),
    ("NaN guidance", b'{"prompt": "x", "guidance": NaN}', None, 422, "invalid_request"),
    ("steps = 0", {"prompt": "x", "steps": 0}, None, 422, "invalid_request"),
    ("steps over the limit", {"prompt": "x", "steps": 101}, None, 422, "invalid_request"),
    ("negative seed", {"prompt": "x", "seed": -1}, None, 422, "invalid_request"),
    ("seed as text", {"prompt": "x", "seed": "abc"}, None, 422, "invalid_request"),
    ("unknown field", {"prompt": "x", "style": "openmoji"}, None, 422, "invalid_request"),
    ("client-chosen sigma", {"prompt": "x", "sigma": 0.001}, None, 422, "mechanism_fixed"),
    ("client-chosen k and q", {"prompt": "x", "k": 1, "q": 1.0}, None, 422, "mechanism_fixed"),
    ("public-only disabled", {"prompt": "x", "public_only": True}, None, 403,
     "public_only_disabled"),
    ("bad JSON", b'{"prompt": "x"', None, 400, "bad_json"),
    ("JSON array", b'["x"]', None, 422, "invalid_request"),
    ("JSON string", b'"red apple"', None, 422, "invalid_request"),
    ("empty body", b"", None, 422, "invalid_request"),
    ("not JSON", b"prompt=x", "application/x-www-form-urlencoded", 415,
     "unsupported_media_type"),
    ("oversized body", b'{"prompt": "' + b"a" * 20000 + b'"}', None, 413, "body_too_large"),
]


@pytest.mark.parametrize("name,body,content_type,status,code", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_malformed_requests_get_the_right_4xx_and_charge_nothing(shared_service, name, body,
                                                                 content_type, status, code):
    service = shared_service
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = dict(service.auth, **{"Content-Type": content_type or "application/json"})
    response = service.client.post("/v1/generate", content=raw, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error"] == code and error["message"]
    assert service.queries == 0
    assert service.keys.get("alice").used == 0
    if isinstance(body, dict) and isinstance(body.get("prompt"), str) and len(body["prompt"]) > 1:
        assert body["prompt"] not in response.text  # the input is not echoed back


def test_an_exhausted_budget_answers_429_and_keeps_serving_budget_and_public_only(tmp_path):
    service = Service(tmp_path, allow_public_only=True, quota=100)
    ledger = SqliteLedger(service.index)
    ledger.charge(PARAMS, ledger.remaining_queries(PARAMS) - 1, caller="test")
    assert service.generate(prompt="red apple", **FAST).status_code == 200
    spent = service.queries
    for _ in range(3):
        response = service.generate(prompt="red apple", **FAST)
        assert response.status_code == 429
        body = response.json()
        assert body["error"] == "budget_exhausted" and body["public_only_enabled"] is True
        assert body["queries_remaining"] == 0 and body["queries_spent"] == spent
        assert body["epsilon_spent"] <= body["epsilon_budget"]
    assert service.queries == spent
    assert service.keys.get("alice").used == 1  # refusals cost no quota
    budget = service.client.get("/v1/budget", headers=service.auth)
    assert budget.status_code == 200 and budget.json()["queries_remaining"] == 0
    public = service.generate(prompt="red apple", public_only=True, **FAST)
    assert public.status_code == 200 and public.json()["mode"] == "public-only"
    assert service.queries == spent


def test_the_ledger_refusal_itself_is_mapped_and_refunds_the_quota(tmp_path, monkeypatch):
    service = Service(tmp_path, quota=10)
    ledger = SqliteLedger(service.index)
    ledger.charge(PARAMS, ledger.remaining_queries(PARAMS), caller="test")
    monkeypatch.setattr(service.engine, "can_afford", lambda: True)  # lose the race on purpose
    response = service.generate(prompt="red apple", **FAST)
    assert response.status_code == 429 and response.json()["error"] == "budget_exhausted"
    assert service.keys.get("alice").used == 0


def test_a_key_quota_is_enforced_with_its_own_code(tmp_path):
    service = Service(tmp_path, quota=2)
    assert [service.generate(prompt="a", **FAST).status_code for _ in range(2)] == [200, 200]
    response = service.generate(prompt="a", **FAST)
    assert response.status_code == 429
    assert response.json()["error"] == "quota_exceeded"
    assert response.json()["key"]["quota_remaining"] == 0
    assert service.queries == 2


def test_budget_info_health_and_metrics(service):
    assert service.client.get("/healthz").json() == {"status": "ok"}
    info = service.client.get("/v1/info").json()
    assert info["mechanism"] == {"sigma": PARAMS.sigma, "q": PARAMS.q, "k": PARAMS.k, "lam": LAM}
    assert info["limits"]["max_images"] == 4 and info["public_only_enabled"] is False
    assert info["style_estimate_releases"] is None  # the operator made none: releases as drawn
    assert service.generate(prompt="red apple", **FAST).status_code == 200
    assert service.generate(headers={}, prompt="red apple", **FAST).status_code == 401
    budget = service.client.get("/v1/budget", headers=service.auth).json()
    assert budget["queries_spent"] == 1 and budget["key"]["used"] == 1
    text = service.client.get("/metrics", headers=service.auth).text
    assert ('dprdm_http_requests_total{method="POST",route="/v1/generate",status="200"} 1.0'
            in text)
    assert 'dprdm_refusals_total{reason="unauthorized"} 1.0' in text
    assert 'dprdm_generations_total{mode="dp"} 1.0' in text
    assert "dprdm_ledger_charge_seconds_count 1.0" in text
    assert "dprdm_budget_queries_spent 1.0" in text
    assert f"dprdm_budget_queries_remaining {budget['queries_remaining']}.0" in text
    assert ID_PREFIX not in text


def test_logs_and_responses_carry_no_private_data_or_tokens(service, caplog):
    with caplog.at_level(logging.INFO, logger="dprdm.service"):
        texts = [service.generate(prompt="red apple", **FAST).text,
                 service.client.get("/v1/budget", headers=service.auth).text,
                 service.client.get("/metrics", headers=service.auth).text]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "POST /v1/generate 200" in logged and "key=alice" in logged
    for text in (*texts, logged):
        assert ID_PREFIX not in text and service.token not in text and "red apple" not in text


def test_keyless_local_mode_needs_no_key_and_only_listens_on_loopback(tmp_path):
    service = Service(tmp_path, keyless_local=True)
    response = service.generate(headers={}, prompt="red apple", **FAST)
    assert response.status_code == 200 and response.json()["key"] is None
    conn = sqlite3.connect(service.index / "ledger.sqlite")
    assert conn.execute("SELECT caller FROM releases").fetchall() == [("local",)]
    assert service.generate(headers={"Authorization": "Bearer dprdm_wrong"},
                            prompt="x", **FAST).status_code == 401
    with pytest.raises(InvalidParameterError, match="loopback"):
        ServiceConfig(index_dir=service.index, settings=SETTINGS, keyless_local=True,
                      host="0.0.0.0")


def test_the_page_is_served_with_nothing_from_elsewhere(service):
    page = service.client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path in ("/static/app.js", "/static/style.css"):
        asset = service.client.get(path)
        assert asset.status_code == 200
        assert "http://" not in asset.text and "https://" not in asset.text
    assert "http://" not in page.text and "https://" not in page.text


def test_config_takes_the_pinned_mechanism_and_refuses_another(tmp_path):
    index = make_index(tmp_path / "private", 2.0)
    assert build_config({"index_dir": index}).settings == SETTINGS  # from the ledger
    config_file = tmp_path / "service.toml"
    config_file.write_text(f'k = {PARAMS.k}\nq = {PARAMS.q}\nallow_public_only = true\n'
                           'port = 9001\nlam = 0.25\n')
    config = build_config({"index_dir": index, "port": 9002}, config_file)
    assert config.settings == MechanismSettings(PARAMS.sigma, PARAMS.q, PARAMS.k, 0.25)
    assert config.allow_public_only is True and config.port == 9002
    config = build_config({"index_dir": index, "lam": 0.5}, config_file)  # flags over the file
    assert config.settings.lam == 0.5
    for other in ({"k": PARAMS.k + 1}, {"q": 0.25}, {"sigma": 3.0}):
        with pytest.raises(InvalidParameterError, match="differs from the mechanism pinned"):
            build_config({"index_dir": index, **other})
    config_file.write_text('{"sigma": 3.0, "epsilon": 100}')
    config_file = config_file.rename(tmp_path / "service.json")
    with pytest.raises(InvalidParameterError, match="unknown keys"):
        build_config({"index_dir": index}, config_file)


def test_content_guidance_is_the_operators_split_guidance_for_every_request(tmp_path,
                                                                             monkeypatch):
    from _pipeline_spy import spy_on_pipeline
    from _service_support import models

    calls = spy_on_pipeline(monkeypatch)
    split = Service(tmp_path / "split", content_guidance=6)
    body = split.generate(prompt="red apple", n=2, steps=2).json()
    assert body["content_guidance"] == 6.0 and split.queries == 1
    (call,) = calls
    assert call["content_guidance"] == 6.0  # the prompt's own (public) text, once per image
    text = models()[0].encode_text(["red apple"])
    np.testing.assert_allclose(call["content_conditions"], np.repeat(text, 2, axis=0),
                               atol=1e-6)
    calls.clear()
    # none given: the one the generator records it was chosen at (the shipped one's: 6)
    default = Service(tmp_path / "default").generate(prompt="red apple", **FAST).json()
    assert models()[1].config.content_guidance == 6.0
    assert default["content_guidance"] == 6.0 and calls[0]["content_guidance"] == 6.0
    calls.clear()
    # equal to the request's guidance (3 by default): plain classifier-free guidance
    plain = Service(tmp_path / "plain", content_guidance=3.0).generate(
        prompt="red apple", **FAST).json()
    assert plain["content_guidance"] == 3.0 and calls[0]["guidance"] == 3.0
    # the operator's setting, from a config file too; a client has no field for it
    index = make_index(tmp_path / "private", 2.0)
    config_file = tmp_path / "service.toml"
    config_file.write_text("content_guidance = 4\n")
    assert build_config({"index_dir": index}, config_file).content_guidance == 4.0
    response = split.generate(prompt="red apple", content_guidance=0, **FAST)
    assert response.status_code == 422 and split.queries == 1
    for bad in (-1.0, 31.0, float("nan"), float("inf"), True, "6"):
        with pytest.raises(InvalidParameterError, match="content_guidance"):
            ServiceConfig(index_dir=index, settings=SETTINGS, content_guidance=bad)
    # the generator the service loads itself (as `dprdm serve` does) gets it too
    from dprdm.service.engine import GenerationEngine

    engine = GenerationEngine(build_config({"index_dir": index}, config_file))
    assert engine.rag.backend.content_guidance == 4.0


def test_the_engine_refuses_a_mechanism_changed_after_the_config(tmp_path):
    from dprdm.privacy import MechanismParams
    from dprdm.service.engine import GenerationEngine
    from _service_support import models

    index = make_index(tmp_path / "private", 2.0)
    config = build_config({"index_dir": index})
    SqliteLedger(index).set_mechanism(MechanismParams(PARAMS.sigma, PARAMS.q, PARAMS.k + 1))
    encoder, pipeline = models()
    with pytest.raises(DprdmError, match="restart the service"):
        GenerationEngine(config, encoder=encoder, pipeline=pipeline)


@pytest.mark.parametrize("args,needle", [
    (["--index", "{tmp}/missing", "--k", "5", "--q", "0.5", "--sigma", "2"], "no embedding index"),
    (["--index", "{tmp}/private", "--k", "6"], "differs from the mechanism pinned"),
    (["--index", "{tmp}/unbound"], "no privacy ledger"),
    (["--index", "{tmp}/private", "--k", "5", "--q", "0.5", "--sigma", "2",
      "--keyless-local", "--host", "0.0.0.0"], "loopback"),
    (["--index", "{tmp}/private", "--k", "5", "--q", "0.5", "--sigma", "2",
      "--max-images", "0"], "max_images"),
    (["--index", "{tmp}/private", "--k", "5", "--q", "0.5", "--sigma", "2",
      "--host", "0.0.0.0"], "--allowed-host"),
    (["--index", "{tmp}/private", "--k", "5", "--q", "0.5", "--sigma", "2",
      "--keyless-local", "--allowed-host", "example.org"], "keyless"),
    (["--index", "{tmp}/private", "--content-guidance", "-1"], "content_guidance must be"),
    (["--index", "{tmp}/private", "--content-guidance", "3", "--generator", "kandinsky-2.2"],
     "needs the demo generator"),
])
def test_serve_refuses_a_bad_start_with_one_json_error(tmp_path, args, needle):
    make_index(tmp_path / "private", 2.0)
    build_index(np.ones((3, 4), dtype=np.float32), tmp_path / "unbound")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli_app, ["serve", *args, "--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)
    assert set(error) == {"error", "message"} and needle in error["message"]


def test_demo_flags_point_at_what_make_demo_prepared(tmp_path, monkeypatch):
    monkeypatch.setenv("DPRDM_DEMO_ROOT", str(tmp_path / "nowhere"))
    for args in (["serve", "--demo"], ["keys", "list", "--demo"]):
        result = CliRunner().invoke(cli_app, [*args, "--json"])
        assert result.exit_code == 2
        assert "make demo" in json.loads(result.stdout)["message"]


def test_requests_waiting_for_the_generator_hold_no_thread(tmp_path, monkeypatch):
    """45 requests queue behind a blocked generation (more than the 40 threads of the pool);
    the budget endpoint still answers at once (a sync endpoint would starve it)."""
    service = Service(tmp_path)
    release, admitted, lock = threading.Event(), [], threading.Lock()
    can_afford = service.engine.can_afford

    def counted() -> bool:
        with lock:
            admitted.append(1)
        return can_afford()

    def blocked(**kwargs) -> Generation:
        assert release.wait(60)
        return Generation("dp", [b"png"], 1, 1, None, kwargs["steps"], kwargs["guidance"])

    monkeypatch.setattr(service.engine, "can_afford", counted)
    monkeypatch.setattr(service.engine, "generate", blocked)
    with ThreadedServer(service.app) as server, ThreadPoolExecutor(45) as pool:
        futures = [pool.submit(httpx.post, server.url + "/v1/generate", timeout=120,
                               json={"prompt": "a", **FAST}, headers=service.auth)
                   for _ in range(45)]
        deadline = time.monotonic() + 60
        while len(admitted) < 45 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(admitted) == 45
        try:
            budget = httpx.get(server.url + "/v1/budget", headers=service.auth, timeout=10)
        finally:
            release.set()
        assert budget.status_code == 200
        assert [f.result().status_code for f in futures] == [200] * 45


def test_serve_on_a_taken_port_is_a_clear_error_before_anything_loads(tmp_path):
    make_index(tmp_path / "private", 2.0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.perf_counter()
        result = CliRunner().invoke(cli_app, [
            "serve", "--index", str(tmp_path / "private"), *MECHANISM_FLAGS,
            "--port", str(port), "--json"])
        elapsed = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)
    assert set(error) == {"error", "message"} and "already in use" in error["message"]
    assert str(port) in error["message"]
    assert elapsed < 5  # refused before the models load
    assert SqliteLedger(tmp_path / "private").summary().queries == 0


def test_serve_json_announces_only_once_bound_and_healthy(tmp_path):
    """The ready object is the first stdout line; the moment it appears, /healthz answers."""
    index = make_index(tmp_path / "private", 2.0)
    server = ServerProcess(index, free_port(), tmp_path)
    server.starts += 1
    server.stdout = tmp_path / "serve.out"
    with open(server.stdout, "wb") as out:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "dprdm", "serve", "--index", str(index), *MECHANISM_FLAGS,
             "--port", str(server.port), "--json"],
            stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
            start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not server.stdout.read_text() and time.monotonic() < deadline:
            assert server.process.poll() is None, "the server exited"
            time.sleep(0.05)
        ready = json.loads(server.stdout.read_text().splitlines()[0])
        health = httpx.get(server.url + "/healthz", timeout=5)  # at once: no retry
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert ready["url"] == f"http://127.0.0.1:{server.port}/"
        assert f"localhost:{server.port}" in ready["allowed_hosts"]
        assert ready["docs"] is False and ready["budget"]["queries_spent"] == 0
        assert ready["content_guidance"] == 6.0  # none given: the shipped generator's own
    finally:
        server.stop()


def test_a_shard_down_is_503_with_retry_after_and_the_charge_stands(service, monkeypatch):
    from dprdm.privacy.sharded import ShardUnavailableError

    def shard_down(**kwargs):
        SqliteLedger(service.index).charge(PARAMS, 1, caller="test")  # charged, as release does
        raise ShardUnavailableError("shard 1 timed out; nothing was released")

    monkeypatch.setattr(service.engine, "generate", shard_down)
    before = service.queries
    response = service.generate(prompt="red apple")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == str(ShardUnavailableError.retry_after_s)
    body = response.json()
    assert body["error"] == "shard_unavailable" and "nothing was released" in body["message"]
    assert "images" not in body and ID_PREFIX not in response.text
    assert service.queries == before + 1
