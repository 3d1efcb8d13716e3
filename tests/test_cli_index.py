"""`dprdm index build | info | quantize`: one JSON object on stdout with --json, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dprdm.cli.index import app
from dprdm.retrieval import EmbeddingIndex, PublicQuantizer

runner = CliRunner()


def invoke_json(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, [*args, "--json"])
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture()
def embeddings(tmp_path: Path) -> Path:
    path = tmp_path / "emb.npy"
    np.save(path, np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    return path


def test_build_and_info(tmp_path: Path, embeddings: Path) -> None:
    out = tmp_path / "idx"
    code, built = invoke_json("build", str(embeddings), "--out", str(out), "--dtype", "float16")
    assert code == 0
    assert (built["n"], built["dim"], built["dtype"]) == (40, 8, "float16")
    assert built["has_ledger"] is False and built["quantizer"] is None
    code, info = invoke_json("info", str(out))
    assert code == 0 and info == built
    assert EmbeddingIndex.open(out).n == 40


def test_build_with_ids_files(tmp_path: Path, embeddings: Path) -> None:
    (tmp_path / "ids.txt").write_text("".join(f"doc-{i}\n" for i in range(40)))
    code, _ = invoke_json("build", str(embeddings), "--out", str(tmp_path / "a"),
                          "--ids", str(tmp_path / "ids.txt"))
    assert code == 0
    assert EmbeddingIndex.open(tmp_path / "a").ids[:2] == ["doc-0", "doc-1"]
    (tmp_path / "ids.json").write_text(json.dumps(list(range(100, 140))))
    code, _ = invoke_json("build", str(embeddings), "--out", str(tmp_path / "b"),
                          "--ids", str(tmp_path / "ids.json"))
    assert code == 0 and EmbeddingIndex.open(tmp_path / "b").ids[0] == 100


def test_errors_are_one_json_object_and_exit_2(tmp_path: Path, embeddings: Path) -> None:
    out = tmp_path / "idx"
    assert invoke_json("build", str(embeddings), "--out", str(out))[0] == 0
    code, error = invoke_json("build", str(embeddings), "--out", str(out))
    assert code == 2 and error["error"] == "EmbeddingIndexError"
    assert "already exists" in error["message"]

    (out / "ledger.sqlite").write_bytes(b"")
    code, error = invoke_json("build", str(embeddings), "--out", str(out), "--overwrite")
    assert code == 2 and "privacy ledger" in error["message"]
    assert invoke_json("info", str(out))[1]["has_ledger"] is True

    bad = np.ones((5, 8), np.float32)
    bad[[1, 3]] = 0
    np.save(tmp_path / "bad.npy", bad)
    code, error = invoke_json("build", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "x"))
    assert code == 2 and error["error"] == "InvalidParameterError"
    assert "rows 1, 3" in error["message"]

    code, error = invoke_json("info", str(tmp_path / "missing"))
    assert code == 2 and "no embedding index" in error["message"]


def test_quantize(tmp_path: Path, embeddings: Path) -> None:
    out = tmp_path / "idx"
    assert invoke_json("build", str(embeddings), "--out", str(out))[0] == 0
    public = tmp_path / "public.npy"
    np.save(public, np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32))
    code, result = invoke_json("quantize", str(out), "--public", str(public), "--nlist", "4")
    assert code == 0
    assert result["trained_on"] == "public" and result["nlist"] == 4 and result["n_train"] == 200
    assert PublicQuantizer.load(out).nlist == 4
    assert invoke_json("info", str(out))[1]["quantizer"]["nlist"] == 4

    code, error = invoke_json("quantize", str(out), "--public", str(embeddings), "--nlist", "4")
    assert code == 2 and "2/k sensitivity" in error["message"]


def test_human_output(tmp_path: Path, embeddings: Path) -> None:
    result = runner.invoke(app, ["build", str(embeddings), "--out", str(tmp_path / "idx")])
    assert result.exit_code == 0 and "index built" in result.stdout
    result = runner.invoke(app, ["info", str(tmp_path / "idx")])
    assert result.exit_code == 0 and "float32" in result.stdout


def test_info_reports_the_noise_of_the_saved_mechanism(tmp_path: Path, embeddings: Path) -> None:
    from dprdm.privacy.noise import OPENDP_SAMPLER, noise_grid

    out = tmp_path / "idx"
    code, built = invoke_json("build", str(embeddings), "--out", str(out))
    assert code == 0 and built["noise"] is None  # no mechanism saved yet
    (out / "mechanism.json").write_text(json.dumps({"sigma": 0.05, "q": 0.01, "k": 10, "lam": 1}))
    code, info = invoke_json("info", str(out))
    assert code == 0
    assert info["noise"] == {"sampler": OPENDP_SAMPLER, "grid": noise_grid(0.05, 10, 8)}
    assert info["noise"]["grid"] == 2.0**-15  # sigma / 1000 = 5e-5 binds (slack bound 7.0e-5)
