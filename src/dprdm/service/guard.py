"""Which Host names the service answers for, and which Origins may change state: DNS rebinding
and cross-site request protection (:class:`HostPolicy`, :class:`HostOriginGuard`).

A page on ``http://attacker.example:8000`` whose name is re-pointed (DNS rebinding) at 127.0.0.1
talks to a local server as if it were its own origin: the browser sends ``Host:
attacker.example:8000``. A server that answers any Host name lets that page spend the budget (in
keyless local mode, without a key). So:

* **Host.** Every request's ``Host`` must be one the operator meant. Always allowed: the loopback
  names ``localhost``, ``127.0.0.1`` and ``[::1]`` with the server's port, and the ``--host``
  address with the port when it is a specific address. In keyed modes the operator adds the names
  clients use (``--allowed-host NAME`` for any port, ``NAME:PORT`` for one port; ``*`` accepts
  any name, not allowed in keyless mode). A server bound to a wildcard address (0.0.0.0, ::)
  must be given its names. A missing or other Host gets ``400 host_not_allowed``.
* **Origin.** A state-changing request (any method but GET, HEAD, OPTIONS) that carries an
  ``Origin`` header is refused with ``403 origin_not_allowed`` unless that origin is the server's
  own: ``http(s)://`` + the request's (already allowed) Host. Requests without ``Origin`` (curl,
  scripts, same-origin GETs) are not affected. This holds in every mode.

Both checks run before routing, authentication, the body limit and the ledger: a refused request
spends nothing. This module has no private data in it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANY_HOST = "*"
DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(value: str) -> tuple[str, int | None] | None:
    """(lower-case name, port or None) of a Host header value or an --allowed-host entry;
    None if it is not of the form ``name``, ``name:port``, ``[v6]`` or ``[v6]:port``."""
    value = value.strip().lower()
    if not value or any(c.isspace() or c in "/?#@\\" for c in value):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[:end + 1], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, _, port_text = value.partition(":")
        if ":" in port_text:
            return None
        port_text = port_text if ":" in value else None
    if not name:
        return None
    if port_text is None:
        return name, None
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        return None
    return name, int(port_text)


def bracketed(host: str) -> str:
    """An address as it appears in a Host header (IPv6 in brackets)."""
    host = host.lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class HostPolicy:
    """The Host names one server answers for."""

    exact: frozenset[tuple[str, int]]  # (name, port)
    any_port: frozenset[str]           # names allowed with any port
    any_host: bool = False

    @classmethod
    def for_server(cls, host: str, port: int, allowed: tuple[str, ...] = ()) -> HostPolicy:
        exact = {(name, port) for name in LOOPBACK_NAMES}
        if host not in WILDCARD_BINDS:
            exact.add((bracketed(host), port))
        any_port, any_host = set(), False
        for entry in allowed:
            if entry == ANY_HOST:
                any_host = True
                continue
            name, entry_port = split_host(entry)  # validated by the config
            if entry_port is None:
                any_port.add(name)
            else:
                exact.add((name, entry_port))
        return cls(frozenset(exact), frozenset(any_port), any_host)

    def allows(self, host_header: str | None) -> bool:
        if self.any_host:
            return True
        parsed = split_host(host_header) if host_header else None
        if parsed is None:
            return False
        name, port = parsed
        if name in self.any_port:
            return True
        return (name, 80 if port is None else port) in self.exact

    def names(self) -> list[str]:
        """The allowed names, for error messages and the start-up summary."""
        if self.any_host:
            return [ANY_HOST]
        return sorted(f"{name}:{port}" for name, port in self.exact) + sorted(self.any_port)


def same_origin(origin: str, host_header: str) -> bool:
    """Whether an Origin header names the server reached through `host_header`."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    if parts.scheme not in DEFAULT_PORTS or parts.path or parts.query or parts.fragment \
            or parts.username is not None:
        return False
    origin_host = split_host(parts.netloc)
    request_host = split_host(host_header)
    if origin_host is None or request_host is None:
        return False
    default = DEFAULT_PORTS[parts.scheme]
    return ((origin_host[0], origin_host[1] or default)
            == (request_host[0], request_host[1] or default))


class HostOriginGuard:
    """ASGI middleware: the Host check on every request, the Origin check on state-changing
    ones; refusals are one JSON error object and reach nothing behind this middleware."""

    def __init__(self, app, policy: HostPolicy, refused) -> None:
        self.app, self.policy, self.refused = app, policy, refused

    async def _refuse(self, send, status: int, code: str, message: str) -> None:
        self.refused(code)
        body = json.dumps({"error": code, "message": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value.decode("latin-1"))
        host = headers.get(b"host")
        if not self.policy.allows(host):
            return await self._refuse(
                send, 400, "host_not_allowed",
                "this server does not answer for that Host name (DNS rebinding protection); "
                f"it answers for: {', '.join(self.policy.names())}. The operator adds names "
                "with --allowed-host")
        origin = headers.get(b"origin")
        if scope["method"] not in SAFE_METHODS and origin is not None \
                and not same_origin(origin, host):
            return await self._refuse(
                send, 403, "origin_not_allowed",
                "cross-origin request refused: a state-changing request must come from this "
                "server's own pages (or carry no Origin header)")
        return await self.app(scope, receive, send)
