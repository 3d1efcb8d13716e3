"""API keys: hashed storage, revocation, atomic quotas (threads and processes), the keys CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from typer.testing import CliRunner

from _service_support import make_index
from dprdm.cli import app as cli_app
from dprdm.errors import InvalidParameterError
from dprdm.service.keys import KEYS_FILENAME, KeyStore, hash_token

runner = CliRunner()


@pytest.fixture()
def index(tmp_path):
    return make_index(tmp_path / "private", 2.0, n=20)


def test_tokens_are_stored_only_as_hashes_and_verify(index):
    store = KeyStore(index)
    token, info = store.create("alice", quota=5)
    assert token.startswith("dprdm_") and len(token) > 40
    assert info.quota == 5 and info.used == 0 and info.revoked is None
    assert store.verify(token).name == "alice"
    for bad in ("", "dprdm_", token[:-1], token + "x", "x" * 300, None, 42):
        assert store.verify(bad) is None
    raw = b"".join(p.read_bytes() for p in index.glob(KEYS_FILENAME + "*"))
    assert token.encode() not in raw and hash_token(token).encode() in raw
    other, _ = store.create("bob")
    assert other != token and store.verify(other).name == "bob"


def test_names_are_checked_and_unique(index):
    store = KeyStore(index)
    store.create("alice")
    with pytest.raises(InvalidParameterError, match="already exists"):
        store.create("alice")
    for bad in ("", "-x", "a b", "x" * 65, "é"):
        with pytest.raises(InvalidParameterError):
            store.create(bad)
    with pytest.raises(InvalidParameterError):
        store.create("carol", quota=-1)


def test_revoked_keys_are_refused_and_keep_their_record(index):
    store = KeyStore(index)
    token, _ = store.create("alice", quota=3)
    assert store.charge_quota("alice")
    info = store.revoke("alice")
    assert info.revoked is not None and info.used == 1
    assert store.verify(token) is None
    assert not store.charge_quota("alice")


def test_a_quota_is_never_overspent_by_concurrent_threads(index):
    store = KeyStore(index)
    store.create("alice", quota=25)
    granted = []

    def worker():
        granted.extend(store.charge_quota("alice") for _ in range(10))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 25 and store.get("alice").used == 25
    store.refund_quota("alice")
    assert store.get("alice").quota_remaining == 1


CHARGER = """
import sys
from dprdm.service.keys import KeyStore
store = KeyStore(sys.argv[1])
print(sum(store.charge_quota("alice") for _ in range(int(sys.argv[2]))))
"""


def test_a_quota_is_never_overspent_by_concurrent_processes(index):
    KeyStore(index).create("alice", quota=30)
    processes = [subprocess.Popen([sys.executable, "-c", CHARGER, str(index), "20"],
                                  stdout=subprocess.PIPE, text=True) for _ in range(4)]
    granted = [int(p.communicate(timeout=120)[0]) for p in processes]
    assert all(p.returncode == 0 for p in processes)
    assert sum(granted) == 30 and KeyStore(index).get("alice").used == 30


def keys_cli(*args):
    result = runner.invoke(cli_app, ["keys", *args, "--json"])
    return result, (json.loads(result.stdout) if result.stdout.strip() else None)


def test_keys_cli_create_list_revoke(index):
    result, created = keys_cli("create", "alice", "--index", str(index), "--quota", "7")
    assert result.exit_code == 0, result.output
    assert created["name"] == "alice" and created["quota"] == 7
    assert KeyStore(index).verify(created["token"]).name == "alice"
    result, listed = keys_cli("list", "--index", str(index))
    assert result.exit_code == 0
    assert [k["name"] for k in listed["keys"]] == ["alice"]
    assert created["token"] not in result.stdout and "sha256" not in result.stdout
    result, revoked = keys_cli("revoke", "alice", "--index", str(index))
    assert result.exit_code == 0 and revoked["revoked"] is not None
    assert KeyStore(index).verify(created["token"]) is None


@pytest.mark.parametrize("args", [
    ["create", "alice", "--index", "{index}"],  # a duplicate
    ["create", "bad name", "--index", "{index}"],
    ["revoke", "nobody", "--index", "{index}"],
    ["list", "--index", "{tmp}"],  # no ledger there
    ["list"],
])
def test_keys_cli_errors_are_one_json_object(index, tmp_path, args):
    KeyStore(index).create("alice")
    args = [a.replace("{index}", str(index)).replace("{tmp}", str(tmp_path)) for a in args]
    result, error = keys_cli(*args)
    assert result.exit_code == 2
    assert set(error) == {"error", "message"}
