"""The index <-> ledger binding: the budget cannot be re-armed by ordinary file operations.

Each reproducer of issue 13 item 1 is a regression test here: delete the ledger and init again,
restore an older ledger, tamper with the embeddings; plus the explicit new-budget flag, a ledger
moved between indexes, and the demo's refusal to re-create a ledger.
"""

import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
from typer.testing import CliRunner

from dprdm import demo
from dprdm.cli import app
from dprdm.errors import DprdmError, EmbeddingIndexError, LedgerBindingError
from dprdm.privacy import MechanismParams, SqliteLedger, init_budget, open_private_index
from dprdm.privacy.binding import NEW_BUDGET_FLAG, SAMPLE_BLOCK, SAMPLE_BLOCKS, binding_of
from dprdm.retrieval import build_index

runner = CliRunner()
PARAMS = MechanismParams(1.0, 0.5, 5)
EPSILON, DELTA = 5.0, 1e-5
PINNED = ["--k", "5", "--q", "0.5", "--sigma", "1.0"]


def invoke(*args):
    result = runner.invoke(app, [*args, "--json"])
    return result, (json.loads(result.stdout) if result.stdout.strip() else None)


def make_index(path, n=300, dim=16):
    vectors = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    build_index(vectors, path)
    return path


@pytest.fixture()
def bound(tmp_path):
    """An index with a bound ledger (the pinned PARAMS) and a query file."""
    index = make_index(tmp_path / "index")
    init_budget(index, EPSILON, DELTA, PARAMS)
    np.save(tmp_path / "q.npy", np.ones((1, 16), dtype=np.float32))
    return index


def retrieve(index, tmp_path):
    return invoke("retrieve", str(index), "--query-emb", str(tmp_path / "q.npy"),
                  "--out", str(tmp_path / "r.npy"))


def test_init_binds_the_ledger_to_the_index(bound):
    index, ledger = open_private_index(bound)
    binding = binding_of(bound)
    assert len(ledger.ledger_id) == 32 and binding["ledger_id"] == ledger.ledger_id
    assert ledger.embeddings_sha256 == binding["embeddings"]["sha256"]
    assert ledger.mechanism == PARAMS and index.n == 300
    assert [entry["ledger_id"] for entry in binding["ledger_history"]] == [ledger.ledger_id]


def test_deleting_the_ledger_does_not_re_arm_the_budget(bound, tmp_path):
    SqliteLedger(bound).charge(PARAMS, 2)
    for path in bound.glob("ledger.sqlite*"):
        path.unlink()
    result, error = invoke("budget", "init", str(bound), "--epsilon", "5", "--delta", "1e-5",
                           *PINNED)
    assert result.exit_code == 2 and NEW_BUDGET_FLAG in error["message"]
    assert not (bound / "ledger.sqlite").exists()
    for command in (("budget", "show", str(bound)),
                    ("generate", "x", "--index", str(bound), "--out", str(tmp_path / "g")),
                    ("eval", "--index", str(bound), "--holdout", str(tmp_path),
                     "--out", str(tmp_path / "e"))):
        result, error = invoke(*command)
        assert result.exit_code == 2 and "missing" in error["message"], result.output
    result, error = retrieve(bound, tmp_path)
    assert result.exit_code == 2 and error["error"] == "ledger_binding"
    assert not (tmp_path / "r.npy").exists() and not (bound / "ledger.sqlite").exists()
    # Nor can the index be rebuilt in place to drop the binding.
    with pytest.raises(EmbeddingIndexError, match="held"):
        build_index(np.ones((3, 16), dtype=np.float32), bound, overwrite=True)


def test_the_new_budget_flag_recreates_it_and_records_why(bound):
    old_id = SqliteLedger(bound).ledger_id
    for path in bound.glob("ledger.sqlite*"):
        path.unlink()
    result, created = invoke("budget", "init", str(bound), "--epsilon", "5", "--delta", "1e-5",
                             *PINNED, NEW_BUDGET_FLAG)
    assert result.exit_code == 0, result.output
    assert "voids the guarantee" in created["voids_guarantee"]
    history = binding_of(bound)["ledger_history"]
    assert [entry["ledger_id"] for entry in history] == [old_id, created["ledger_id"]]
    assert history[1]["replaces"] == old_id and history[1]["voids_guarantee"] is True
    _, ledger = open_private_index(bound)
    assert old_id in ledger.events()[0]["detail"]
    # The flag never replaces a ledger that still exists.
    result, _ = invoke("budget", "init", str(bound), "--epsilon", "5", "--delta", "1e-5",
                       *PINNED, NEW_BUDGET_FLAG)
    assert result.exit_code == 2 and open_private_index(bound)[1].ledger_id == ledger.ledger_id


def test_a_restored_backup_of_the_ledger_is_refused(bound, tmp_path):
    ledger = SqliteLedger(bound)
    ledger.charge(PARAMS, 2)
    backup = tmp_path / "backup"
    backup.mkdir()
    for path in bound.glob("ledger.sqlite*"):
        shutil.copy2(path, backup / path.name)
    ledger.charge(PARAMS, 3)
    for path in bound.glob("ledger.sqlite*"):
        path.unlink()
    for path in backup.iterdir():
        shutil.copy2(path, bound / path.name)
    with pytest.raises(DprdmError, match="rolled back"):
        open_private_index(bound)
    result, error = retrieve(bound, tmp_path)
    assert result.exit_code == 2 and "rolled back" in error["message"]
    result, _ = invoke("budget", "show", str(bound))
    assert result.exit_code == 2
    total = sqlite3.connect(bound / "ledger.sqlite").execute(
        "SELECT SUM(count) FROM totals").fetchone()[0]
    assert total == 2  # nothing was charged by the refused commands


def test_another_indexs_ledger_is_refused(bound, tmp_path):
    other = make_index(tmp_path / "other")
    init_budget(other, EPSILON, DELTA, PARAMS)
    for path in bound.glob("ledger*"):
        path.unlink()
    for path in other.glob("ledger*"):
        shutil.copy2(path, bound / path.name)
    with pytest.raises(LedgerBindingError, match="not the index's ledger"):
        open_private_index(bound)


def test_embeddings_rewritten_x50_are_refused(bound, tmp_path):
    path = bound / "embeddings.npy"
    np.save(path, np.load(path) * 50)  # same shape and dtype: same size, new mtime
    with pytest.raises(LedgerBindingError, match="changed"):
        open_private_index(bound)
    result, error = retrieve(bound, tmp_path)
    assert result.exit_code == 2 and "changed" in error["message"]
    assert SqliteLedger(bound).summary().queries == 0


def test_a_same_size_rewrite_keeping_the_mtime_is_caught(bound):
    path = bound / "embeddings.npy"
    stat = os.stat(path)
    np.save(path, np.load(path) * 50)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(LedgerBindingError, match="sampled blocks"):
        open_private_index(bound)
    result, _ = invoke("index", "verify", str(bound))
    assert result.exit_code == 2


def test_a_change_between_sampled_blocks_is_caught_by_index_verify(tmp_path):
    index = make_index(tmp_path / "big", n=60_000, dim=16)  # 3.8 MB: gaps between the samples
    init_budget(index, EPSILON, DELTA, PARAMS)
    path = index / "embeddings.npy"
    size, stat = os.path.getsize(path), os.stat(path)
    last = size - SAMPLE_BLOCK
    offset = last // (SAMPLE_BLOCKS - 1) // 2 + SAMPLE_BLOCK  # between samples 0 and 1
    assert SAMPLE_BLOCK < offset < last // (SAMPLE_BLOCKS - 1)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(np.float32(50.0).tobytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    open_private_index(index)  # the cheap check cannot see it (documented) ...
    result, error = invoke("index", "verify", str(index))
    assert result.exit_code == 2 and "SHA-256 differs" in error["message"]  # ... verify does
    os.utime(path)  # and once the mtime differs, every open recomputes the full hash
    with pytest.raises(LedgerBindingError, match="SHA-256"):
        open_private_index(index)


def test_index_verify_passes_and_rerecords_a_touched_mtime(bound):
    os.utime(bound / "embeddings.npy")  # e.g. a copy that did not keep the times
    result, report = invoke("index", "verify", str(bound))
    assert result.exit_code == 0, result.output
    assert report["sha256"] == "ok" and report["mtime_rerecorded"] is True
    assert binding_of(bound)["embeddings"]["mtime_ns"] == os.stat(bound / "embeddings.npy").st_mtime_ns


def test_a_request_with_other_parameters_is_refused(bound, tmp_path):
    result = runner.invoke(app, ["retrieve", str(bound), "--query-emb", str(tmp_path / "q.npy"),
                                 "--out", str(tmp_path / "r.npy"), "--sigma", "0.1"])
    assert result.exit_code == 2
    _, ledger = open_private_index(bound)
    with pytest.raises(DprdmError, match="pinned"):
        ledger.charge(MechanismParams(0.1, 0.5, 5))
    assert ledger.summary().queries == 0 and not (tmp_path / "r.npy").exists()


def test_set_mechanism_and_budget_show_report_the_accountant(bound):
    result, shown = invoke("budget", "show", str(bound))
    assert result.exit_code == 0, result.output
    assert shown["accountant"] == "pld" and shown["mechanism"]["k"] == 5
    assert shown["queries_remaining"] > 0
    result, changed = invoke("budget", "set-mechanism", str(bound), "--k", "10", "--q", "0.5",
                             "--sigma", "1.0")
    assert result.exit_code == 0, result.output
    result, shown = invoke("budget", "show", str(bound))
    assert shown["accountant"] == "rdp-filter" and "Feldman" in shown["accountant_reason"]
    assert shown["mechanism"]["k"] == 10 and shown["rdp_filter"]["order"] > 1
    assert [m["k"] for m in shown["mechanism_history"]] == [5, 10]
    assert shown["queries_remaining"] == changed["queries_remaining"] > 0


def test_the_demo_rebuilds_instead_of_recreating_a_ledger(bound, tmp_path):
    assert demo._usable_private_index(bound)  # intact: reused
    for path in bound.glob("ledger.sqlite*"):
        path.unlink()
    assert not demo._usable_private_index(bound)  # ledger gone: the index is deleted ...
    assert not bound.exists()  # ... to be built from scratch, never given a new ledger
    fresh = make_index(tmp_path / "fresh")
    assert demo._usable_private_index(fresh) and binding_of(fresh) is None  # then budget init
