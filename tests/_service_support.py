"""Shared helpers of the service tests: a synthetic private index, a real server process."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from dprdm.privacy import MechanismParams, SqliteLedger, init_budget
from dprdm.rdm import MechanismSettings
from dprdm.retrieval import build_index
from dprdm.service.keys import KeyStore

SIGMA, Q, K, LAM = 2.0, 0.5, 5, 0.8
PARAMS = MechanismParams(SIGMA, Q, K)
SETTINGS = MechanismSettings(SIGMA, Q, K, LAM)
MECHANISM_FLAGS = ["--k", str(K), "--q", str(Q), "--sigma", str(SIGMA), "--lam", str(LAM)]
ID_PREFIX = "private-record-"  # must never appear in a response or a log line
DIM = 64  # the demo encoder's


def make_index(path: Path, epsilon: float, n: int = 200, ledger: str | None = None,
               params: MechanismParams = PARAMS, lam: float = LAM) -> Path:
    """A synthetic private index (random unit vectors, named ids) with a fresh ledger (SQLite, or
    the PostgreSQL URL `ledger`), the mechanism PARAMS (and LAM) pinned in it."""
    vectors = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float32)
    build_index(vectors, path, ids=[f"{ID_PREFIX}{i:04d}" for i in range(n)])
    init_budget(path, epsilon, 1e-5, params, lam, ledger=ledger)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def release_times(index: Path) -> list[str]:
    """Times (ISO, UTC) of the ledger's release rows (read-only; for ordering checks)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{index / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute("SELECT time FROM releases ORDER BY id")]
    finally:
        conn.close()


class ServerProcess:
    """`dprdm serve` in its own process group (so that SIGKILL reaches every worker)."""

    def __init__(self, index: Path, port: int, log_dir: Path, *extra: str) -> None:
        self.index, self.port, self.log_dir, self.extra = index, port, log_dir, extra
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 150.0) -> dict:
        self.starts += 1
        self.stdout = self.log_dir / f"server-{self.port}-{self.starts}.out"
        self.stderr = self.log_dir / f"server-{self.port}-{self.starts}.err"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dprdm", "serve", "--index", str(self.index),
                 *MECHANISM_FLAGS, "--port", str(self.port), "--json", *self.extra],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.stderr.read_text()[-3000:]}")
            lines = self.stdout.read_text().splitlines()
            if lines:  # `serve --json` prints its ready object once /healthz answers
                return json.loads(lines[0])
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not come up: {self.stderr.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to the whole process group: no clean-up runs anywhere."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        return "".join(path.read_text() for path in self.log_dir.glob(f"server-{self.port}-*"))


class ThreadedServer:
    """uvicorn serving an app object in a thread of this process (no model reload)."""

    def __init__(self, app, port: int | None = None) -> None:
        import uvicorn

        self.port = port or app.state.config.port  # the app answers only for its own port
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@functools.cache
def models():
    """The demo encoder and generator, loaded once for every app of the test session."""
    from dprdm.encoders import load_encoder
    from dprdm.generation.pipeline import load_default

    return load_encoder("demo"), load_default()


class Service:
    """A fresh index + ledger + key "alice", and an app over them (shared models) with a
    TestClient."""

    def __init__(self, tmp_path, epsilon=2.0, quota=None, **options):
        from fastapi.testclient import TestClient

        from dprdm.service.app import create_app
        from dprdm.service.config import ServiceConfig
        from dprdm.service.engine import GenerationEngine

        settings = options.setdefault("settings", SETTINGS)  # pinned in the ledger it makes
        self.index = make_index(tmp_path / "private", epsilon, params=settings.params,
                                lam=settings.lam)
        options.setdefault("default_steps", 2)
        options.setdefault("port", free_port())  # the Host guard answers for this port only
        self.config = ServiceConfig(index_dir=self.index, **options)
        encoder, pipeline = models()
        self.engine = GenerationEngine(self.config, encoder=encoder, pipeline=pipeline)
        self.app = create_app(self.config, engine=self.engine)
        self.client = TestClient(self.app, base_url=f"http://127.0.0.1:{self.config.port}")
        self.keys = KeyStore(self.index)
        self.token, _ = self.keys.create("alice", quota=quota)
        self.auth = {"Authorization": f"Bearer {self.token}"}

    @property
    def queries(self) -> int:
        return SqliteLedger(self.index).summary().queries

    def generate(self, headers=None, **body):
        return self.client.post("/v1/generate", json=body,
                                headers=self.auth if headers is None else headers)
