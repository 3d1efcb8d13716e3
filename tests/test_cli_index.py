"""`dprdm index build | info | quantize`: one JSON object on stdout with --json, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dprdm.cli.index import app
from dprdm.provenance import file_sha256, write_sidecar
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
    assert code == 2 and error["error"] == "index_error"
    assert "already exists" in error["message"]

    (out / "ledger.sqlite").write_bytes(b"")
    code, error = invoke_json("build", str(embeddings), "--out", str(out), "--overwrite")
    assert code == 2 and "privacy ledger" in error["message"]
    assert invoke_json("info", str(out))[1]["has_ledger"] is True

    bad = np.ones((5, 8), np.float32)
    bad[[1, 3]] = 0
    np.save(tmp_path / "bad.npy", bad)
    code, error = invoke_json("build", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "x"))
    assert code == 2 and error["error"] == "invalid_parameter"
    assert "rows 1, 3" in error["message"]

    code, error = invoke_json("info", str(tmp_path / "missing"))
    assert code == 2 and "no embedding index" in error["message"]


def test_quantize(tmp_path: Path, embeddings: Path) -> None:
    out = tmp_path / "idx"
    assert invoke_json("build", str(embeddings), "--out", str(out))[0] == 0
    public = tmp_path / "public.npy"
    np.save(public, np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32))
    args = ("quantize", str(out), "--public", str(public), "--nlist", "4")
    # nothing marks the file public: refused, nothing written
    code, error = invoke_json(*args)
    assert code == 2 and "nothing marks it as public" in error["message"]
    assert "--data-is-public" in error["message"]
    assert not (out / "quantizer.json").exists()

    code, result = invoke_json(*args, "--data-is-public")
    assert code == 0
    assert result["trained_on"] == "public" and result["nlist"] == 4 and result["n_train"] == 200
    assert result["source"] == {"file": "public.npy", "sha256": file_sha256(public),
                                "public": True, "declared_by": "--data-is-public", "rows": 200}
    assert PublicQuantizer.load(out).nlist == 4
    assert PublicQuantizer.load(out).source == result["source"]
    info = invoke_json("info", str(out))[1]["quantizer"]
    assert info["nlist"] == 4 and info["source"]["sha256"] == file_sha256(public)

    # an existing quantizer is replaced only with --overwrite
    before = (out / "quantizer.npy").read_bytes()
    code, error = invoke_json("quantize", str(out), "--public", str(public), "--nlist", "5",
                              "--data-is-public")
    assert code == 2 and "--overwrite" in error["message"]
    assert (out / "quantizer.npy").read_bytes() == before
    code, result = invoke_json("quantize", str(out), "--public", str(public), "--nlist", "5",
                               "--data-is-public", "--overwrite")
    assert code == 0 and PublicQuantizer.load(out).nlist == 5

    code, error = invoke_json("quantize", str(out), "--public", str(embeddings), "--nlist", "4",
                              "--data-is-public", "--overwrite")
    assert code == 2 and "2/k sensitivity" in error["message"]


def test_quantize_reads_the_provenance_file_embed_writes(tmp_path: Path, embeddings: Path) -> None:
    out = tmp_path / "idx"
    assert invoke_json("build", str(embeddings), "--out", str(out))[0] == 0
    public = tmp_path / "public.npy"
    np.save(public, np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32))
    args = ("quantize", str(out), "--public", str(public), "--nlist", "4", "--overwrite")

    write_sidecar(public, public=True, source="/data/public-icons", tool="dprdm encoders embed "
                  "--public")
    code, result = invoke_json(*args)
    assert code == 0
    assert result["source"]["declared_by"] == "dprdm encoders embed --public"
    assert result["source"]["source"] == "/data/public-icons"

    # embedded without --public: recorded as private, and no flag overrides that
    write_sidecar(public, public=False, source="/data/mine", tool="dprdm encoders embed")
    code, error = invoke_json(*args, "--data-is-public")
    assert code == 2 and "NOT public" in error["message"]

    # the file replaced after its sidecar was written: the sidecar no longer vouches for it
    write_sidecar(public, public=True, source="/data/public-icons", tool="dprdm encoders embed")
    np.save(public, np.random.default_rng(2).standard_normal((200, 8)).astype(np.float32))
    code, error = invoke_json(*args)
    assert code == 2 and "SHA-256 differs" in error["message"]


@pytest.mark.parametrize("noise", [1e-6, 5e-3])
def test_quantize_refuses_near_copies_of_private_rows(tmp_path: Path, noise: float) -> None:
    rng = np.random.default_rng(7)
    private = rng.standard_normal((300, 16)).astype(np.float32)
    np.save(tmp_path / "p.npy", private)
    out = tmp_path / "idx"
    assert invoke_json("build", str(tmp_path / "p.npy"), "--out", str(out))[0] == 0
    unit = private / np.linalg.norm(private, axis=1, keepdims=True)
    near = unit[:10] + noise * rng.standard_normal((10, 16)).astype(np.float32)  # cos > 0.999
    public = np.concatenate([rng.standard_normal((190, 16)).astype(np.float32), near])
    np.save(tmp_path / "public.npy", public)
    code, error = invoke_json("quantize", str(out), "--public", str(tmp_path / "public.npy"),
                              "--nlist", "4", "--data-is-public")
    assert code == 2
    assert "10 of the 200 public vectors (5.0 %) nearly duplicate" in error["message"]
    assert not (out / "quantizer.json").exists()
    # one near-copy in 200 (0.5 %) is tolerated: public collections may share an image or two
    np.save(tmp_path / "public.npy", public[:191])
    code, result = invoke_json("quantize", str(out), "--public", str(tmp_path / "public.npy"),
                               "--nlist", "4", "--data-is-public")
    assert code == 0, result


def test_human_output(tmp_path: Path, embeddings: Path) -> None:
    result = runner.invoke(app, ["build", str(embeddings), "--out", str(tmp_path / "idx")])
    assert result.exit_code == 0 and "index built" in result.stdout
    result = runner.invoke(app, ["info", str(tmp_path / "idx")])
    assert result.exit_code == 0 and "float32" in result.stdout


def test_info_reports_the_noise_of_the_pinned_mechanism(tmp_path: Path, embeddings: Path) -> None:
    from dprdm.privacy import MechanismParams, init_budget
    from dprdm.privacy.noise import EXACT_SAMPLER, noise_grid

    out = tmp_path / "idx"
    code, built = invoke_json("build", str(embeddings), "--out", str(out))
    assert code == 0 and built["noise"] is None  # no mechanism saved yet
    init_budget(out, 10.0, 1e-5, MechanismParams(0.05, 0.01, 10))
    code, info = invoke_json("info", str(out))
    assert code == 0
    assert info["noise"] == {"sampler": EXACT_SAMPLER, "grid": noise_grid(0.05, 10, 8)}
    assert info["noise"]["grid"] == 2.0**-15  # sigma / 1000 = 5e-5 binds (slack bound 7.0e-5)
