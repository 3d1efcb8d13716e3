"""The service's front door: Host names (DNS rebinding), Origins (cross-site requests), the
API docs (off by default) and who may read /metrics."""

from __future__ import annotations

import http.client
import json

import pytest

from _service_support import ID_PREFIX, SETTINGS, Service, ThreadedServer
from dprdm.errors import InvalidParameterError
from dprdm.service.config import ServiceConfig
from dprdm.service.guard import HostPolicy, same_origin, split_host

FAST = {"n": 1, "steps": 2}
ATTACKER = "attacker.example"


def post(service, host=None, origin=None, auth=True):
    headers = dict(service.auth) if auth else {}
    if host is not None:
        headers["Host"] = host
    if origin is not None:
        headers["Origin"] = origin
    return service.client.post("/v1/generate", json={"prompt": "red apple", **FAST},
                               headers=headers)


@pytest.fixture()
def keyless(tmp_path):
    return Service(tmp_path, keyless_local=True)


def test_dns_rebinding_host_is_refused_in_keyless_mode_and_charges_nothing(keyless):
    port = keyless.config.port
    for host, origin in ((f"{ATTACKER}:{port}", f"http://{ATTACKER}:{port}"),
                         (f"{ATTACKER}:{port}", None), (ATTACKER, None)):
        response = post(keyless, host=host, origin=origin, auth=False)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"] == "host_not_allowed" and "rebinding" in body["message"]
        for path in ("/v1/budget", "/v1/info", "/", "/metrics"):
            assert keyless.client.get(path, headers={"Host": host}).status_code == 400
    assert keyless.queries == 0


def test_dns_rebinding_is_refused_over_a_real_socket(keyless):
    """The reproduced attack, byte for byte over TCP (no test client in between)."""
    with ThreadedServer(keyless.app) as server:
        body = json.dumps({"prompt": "red apple", **FAST})
        evil = f"http://{ATTACKER}:{server.port}"
        attacks = [{"Host": f"{ATTACKER}:{server.port}", "Origin": evil},
                   {"Host": f"localhost:{server.port}", "Origin": evil}]
        statuses = []
        for headers in attacks:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.putrequest("POST", "/v1/generate", skip_host=True)
            for name, value in {**headers, "Content-Type": "application/json",
                                "Content-Length": str(len(body))}.items():
                conn.putheader(name, value)
            conn.endheaders(body.encode())
            response = conn.getresponse()
            statuses.append((response.status, json.loads(response.read())["error"]))
            conn.close()
    assert statuses == [(400, "host_not_allowed"), (403, "origin_not_allowed")]
    assert keyless.queries == 0


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}",
                                  "LOCALHOST:{port}"])
def test_the_loopback_names_on_the_servers_port_work(keyless, host):
    host = host.format(port=keyless.config.port)
    assert post(keyless, host=host, auth=False).status_code == 200
    assert keyless.queries == 1


@pytest.mark.parametrize("host", ["localhost:1", "localhost", "127.0.0.1", "127.0.0.2:{port}",
                                  "[::1]", "::1:{port}", "localhost.:{port}", "", "a b:{port}",
                                  "localhost:{port}@evil", "localhost:99999"])
def test_other_ports_and_names_are_refused(keyless, host):
    response = post(keyless, host=host.format(port=keyless.config.port), auth=False)
    assert response.status_code == 400 and response.json()["error"] == "host_not_allowed"
    assert keyless.queries == 0


def test_a_foreign_origin_is_refused_on_post_in_every_mode(tmp_path):
    keyed = Service(tmp_path / "keyed", quota=10)
    keyless = Service(tmp_path / "keyless", keyless_local=True)
    for service, auth in ((keyed, True), (keyless, False)):
        port = service.config.port
        for origin in (f"http://{ATTACKER}:{port}", f"http://{ATTACKER}", "null",
                       f"http://localhost:{port + 1}", f"https://127.0.0.1:{port}.evil",
                       f"file://localhost:{port}", "not a url"):
            response = post(service, origin=origin, auth=auth)
            assert response.status_code == 403, (origin, response.text)
            assert response.json()["error"] == "origin_not_allowed"
        assert service.queries == 0
    assert keyed.keys.get("alice").used == 0


def test_same_origin_and_no_origin_requests_work(tmp_path):
    keyed = Service(tmp_path / "keyed")
    keyless = Service(tmp_path / "keyless", keyless_local=True)
    for service, auth in ((keyed, True), (keyless, False)):
        port = service.config.port
        assert post(service, auth=auth).status_code == 200  # curl: no Origin
        assert post(service, origin=f"http://127.0.0.1:{port}", auth=auth).status_code == 200
        assert post(service, host=f"localhost:{port}", origin=f"http://localhost:{port}",
                    auth=auth).status_code == 200
        assert service.queries == 3
    # A cross-origin GET is not state-changing; the browser does not let the page read it.
    assert keyed.client.get("/v1/info", headers={"Origin": f"http://{ATTACKER}"}).status_code \
        == 200


def test_allowed_hosts_open_the_names_of_a_deployment(tmp_path):
    service = Service(tmp_path, allowed_hosts=("dprdm.example.org", "api.example.org:8443"))
    assert post(service, host="dprdm.example.org",
                origin="https://dprdm.example.org").status_code == 200
    assert post(service, host="dprdm.example.org:443").status_code == 200
    assert post(service, host="api.example.org:8443",
                origin="https://api.example.org:8443").status_code == 200
    assert post(service, host="api.example.org").status_code == 400
    assert post(service, host="other.example.org").status_code == 400
    assert post(service, host="dprdm.example.org",
                origin="https://api.example.org:8443").status_code == 403
    assert service.queries == 3
    anything = Service(tmp_path / "any", allowed_hosts=("*",))
    assert post(anything, host=f"{ATTACKER}:1").status_code == 200  # the key still guards it


@pytest.mark.parametrize("options,needle", [
    ({"keyless_local": True, "allowed_hosts": ("dprdm.example.org",)}, "keyless"),
    ({"keyless_local": True, "allowed_hosts": ("*",)}, "keyless"),
    ({"host": "0.0.0.0"}, "--allowed-host"),
    ({"host": "::"}, "--allowed-host"),
    ({"allowed_hosts": ("http://x.org",)}, "not a host name"),
    ({"allowed_hosts": ("x.org:0",)}, "not a host name"),
    ({"allowed_hosts": "x.org"}, "list"),
])
def test_host_settings_that_would_open_the_door_are_refused(tmp_path, options, needle):
    with pytest.raises(InvalidParameterError, match=needle):
        ServiceConfig(index_dir=tmp_path, settings=SETTINGS, **options)


def test_host_policy_and_origin_parsing():
    policy = HostPolicy.for_server("0.0.0.0", 8000, ("box.lan", "[fd00::1]:8000"))
    assert policy.allows("localhost:8000") and policy.allows("box.lan:1234")
    assert policy.allows("[fd00::1]:8000") and not policy.allows("[fd00::1]:8001")
    assert not policy.allows("0.0.0.0:8000") and not policy.allows(None)
    assert HostPolicy.for_server("::1", 80).allows("[::1]")  # no port = 80
    assert split_host("[::1]:8000") == ("[::1]", 8000) and split_host("::1") is None
    assert same_origin("http://localhost:8000", "localhost:8000")
    assert same_origin("https://a.org", "a.org:443") and same_origin("http://a.org:80", "a.org")
    assert not same_origin("https://a.org", "a.org:80")
    assert not same_origin("http://localhost:8000/path", "localhost:8000")
    assert not same_origin("http://u@localhost:8000", "localhost:8000")


def test_api_docs_are_off_by_default_and_on_with_docs(tmp_path):
    default = Service(tmp_path / "default")
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        response = default.client.get(path)
        assert response.status_code == 404 and response.json()["error"] == "not_found"
    enabled = Service(tmp_path / "enabled", docs=True)
    docs = enabled.client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert "cdn.jsdelivr.net" in docs.text  # what --docs documents: the assets come from a CDN
    assert enabled.client.get("/redoc").status_code == 200
    schema = enabled.client.get("/openapi.json").json()
    assert "/v1/generate" in schema["paths"]


def test_metrics_need_the_same_key_as_the_budget(tmp_path):
    service = Service(tmp_path)
    for headers in ({}, {"Authorization": "Bearer dprdm_wrong"}):
        response = service.client.get("/metrics", headers=headers)
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
        assert "dprdm_budget" not in response.text
    text = service.client.get("/metrics", headers=service.auth).text
    assert "dprdm_budget_queries_remaining" in text and ID_PREFIX not in text
    # A scraper's key: quota 0 reads the metrics and the budget, and can spend nothing.
    scraper, _ = service.keys.create("prometheus", quota=0)
    scrape = {"Authorization": f"Bearer {scraper}"}
    assert service.client.get("/metrics", headers=scrape).status_code == 200
    assert service.client.get("/v1/budget", headers=scrape).status_code == 200
    refused = service.client.post("/v1/generate", json={"prompt": "red apple", **FAST},
                                  headers=scrape)
    assert refused.status_code == 429 and refused.json()["error"] == "quota_exceeded"
    assert service.queries == 0


def test_keyless_metrics_are_open_on_loopback_only(keyless):
    assert keyless.client.get("/metrics").status_code == 200
    host = f"{ATTACKER}:{keyless.config.port}"
    assert keyless.client.get("/metrics", headers={"Host": host}).status_code == 400


def test_refusals_at_the_door_are_counted(keyless):
    post(keyless, host=f"{ATTACKER}:1", auth=False)
    post(keyless, origin=f"http://{ATTACKER}", auth=False)
    text = keyless.client.get("/metrics").text
    assert 'dprdm_refusals_total{reason="host_not_allowed"} 1.0' in text
    assert 'dprdm_refusals_total{reason="origin_not_allowed"} 1.0' in text


def test_the_favicon_is_a_local_svg(keyless):
    for path in ("/favicon.svg", "/favicon.ico"):
        response = keyless.client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("image/svg+xml")
        assert response.text.startswith("<svg") and "http://www.w3.org/2000/svg" in response.text
