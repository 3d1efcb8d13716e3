"""The non-demo generator backends through the command line and the service (tiny random models,
CPU, local folders only): `encoders embed` with a backend's own image tower (resumable, sharded,
corrupt files counted) -> `index build` (records the tower) -> `generate` / `serve` / `eval`, one
private query charged per prompt; an index from another tower is refused with nothing charged;
no socket is opened by the CLI paths."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_backends as tb  # noqa: E402
from tiny_backends import one_torch_thread  # noqa: E402,F401  (autouse fixture)

from dprdm.cli import app  # noqa: E402
from dprdm.privacy import MechanismParams, SqliteLedger, init_budget  # noqa: E402

runner = CliRunner()
PARAMS = MechanismParams(sigma=0.5, q=0.5, k=3)
FAST = ["--steps", "2", "--image-size", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny-backends-cli")
    clip = tb.clip_dir(root / "clip")
    decoder, prior = tb.kandinsky_dirs(root / "kandinsky")
    sd, adapter = tb.ip_adapter_dirs(root / "ip")
    unclip = tb.unclip_dir(root / "unclip", clip)
    return {"kandinsky-2.2": ["--model", str(decoder), "--prior", str(prior)],
            "stable-unclip": ["--model", str(unclip), "--encoder", str(clip)],
            "ip-adapter": ["--model", str(sd), "--adapter", str(adapter), "--encoder", str(clip)]}


def photos(folder: Path, n: int = 9, corrupt: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    if corrupt:
        (folder / "b" / "broken.png").write_bytes(b"\x89PNG not an image")
    return folder


def invoke(*args: str):
    result = runner.invoke(app, [*args, "--json"])
    data = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    return result, data


@pytest.fixture(scope="module")
def indexes(folders, tmp_path_factory) -> dict:
    """Per backend: a private index embedded with its own tower via the CLI, ledger pinned."""
    root = tmp_path_factory.mktemp("indexes")
    images = photos(root / "photos")
    out = {}
    for name, flags in folders.items():
        emb = root / f"{name}.npy"
        result, data = invoke("encoders", "embed", "--generator", name, *flags, "--device", "cpu",
                              "--images", str(images), "--out", str(emb))
        assert result.exit_code == 0, result.output
        assert data["rows"] == 9 and data["skipped"] == 1
        assert data["skipped_by_reason"]["corrupt"]["examples"] == ["b/broken.png"]
        result, built = invoke("index", "build", str(emb), "--out", str(root / name))
        assert result.exit_code == 0, result.output
        assert built["conditioning_space"] == data["conditioning_space"]
        out[name] = root / name
    return out


def fresh_ledger(index: Path, tmp_path: Path) -> Path:
    """A copy of `index` with a fresh ledger (the module's indexes stay unspent)."""
    import shutil

    copy = tmp_path / "private"
    shutil.copytree(index, copy)
    init_budget(copy, 50.0, 1e-6, PARAMS, lam=0.7)
    return copy


@pytest.mark.parametrize("name", ["kandinsky-2.2", "stable-unclip", "ip-adapter"])
def test_cli_generate_with_each_backend_charges_one_query_per_prompt_and_opens_no_socket(
        name, folders, indexes, tmp_path, monkeypatch):
    index = fresh_ledger(indexes[name], tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    out = tmp_path / "out"
    result, report = invoke("generate", "the cat", "an eon", "--index", str(index),
                            "--generator", name, *folders[name], *FAST, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert report["generator"] == name and len(report["files"]) == 2
    assert report["ledger"]["queries_by_call"] == 2
    assert SqliteLedger(index).summary().queries == 2
    assert Image.open(report["files"][0]).size == (32, 32)
    # public-only: the same backend, nothing charged
    result, report = invoke("generate", "the cat", "--index", str(index), "--public-only",
                            "--generator", name, *folders[name], *FAST, "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert report["mode"] == "public-only" and SqliteLedger(index).summary().queries == 2


def test_an_index_from_another_tower_is_refused_by_every_command_with_nothing_charged(
        folders, indexes, tmp_path):
    # same dimension (32), another tower: unCLIP's CLIP index given to Kandinsky
    index = fresh_ledger(indexes["stable-unclip"], tmp_path)
    kandinsky = ["--generator", "kandinsky-2.2", *folders["kandinsky-2.2"], *FAST]
    result, error = invoke("generate", "the cat", "--index", str(index), *kandinsky,
                           "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "another image tower" in error["message"]
    assert not list((tmp_path / "out").glob("*.png"))
    holdout = tmp_path / "holdout"
    photos(holdout, n=3, corrupt=False)
    (holdout / "captions.jsonl").write_text("".join(
        json.dumps({"file": f"{d}/{i}.png", "caption": "the cat"}) + "\n"
        for i, d in ((0, "b"), (1, "a"), (2, "b"))))
    result, error = invoke("eval", "--index", str(index), "--holdout", str(holdout),
                           "--out", str(tmp_path / "report"), *kandinsky)
    assert result.exit_code == 2 and "another image tower" in error["message"]
    from dprdm.cli.serve import _check_index
    from dprdm.service.config import build_config

    config = build_config({"index_dir": index, "generator": "kandinsky-2.2",
                           "model_dir": folders["kandinsky-2.2"][1],
                           "prior_dir": folders["kandinsky-2.2"][3], "device": "cpu"})
    with pytest.raises(Exception, match="another image tower"):
        _check_index(config)  # multi-worker start-up check
    from dprdm.service.engine import GenerationEngine

    with pytest.raises(Exception, match="another image tower"):
        GenerationEngine(config)
    # an index with no recorded tower is refused by a non-demo generator too
    (index / "conditioning_space.json").unlink()
    result, error = invoke("generate", "the cat", "--index", str(index), *kandinsky,
                           "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "records no encoder" in error["message"]
    assert SqliteLedger(index).summary().queries == 0


def test_serve_end_to_end_with_kandinsky(folders, indexes, tmp_path):
    from fastapi.testclient import TestClient

    from _service_support import free_port
    from dprdm.rdm import MechanismSettings
    from dprdm.service.app import create_app
    from dprdm.service.config import ServiceConfig

    index = fresh_ledger(indexes["kandinsky-2.2"], tmp_path)
    flags = folders["kandinsky-2.2"]
    config = ServiceConfig(index_dir=index, settings=MechanismSettings(0.5, 0.5, 3, 0.7),
                           generator="kandinsky-2.2", model_dir=flags[1], prior_dir=flags[3],
                           device="cpu", image_size=32, keyless_local=True, port=free_port(),
                           default_steps=2)
    assert ServiceConfig.from_json(config.to_json()) == config  # travels to worker processes
    client = TestClient(create_app(config), base_url=f"http://127.0.0.1:{config.port}")
    response = client.post("/v1/generate", json={"prompt": "the cat", "n": 2, "steps": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["images"]) == 2 and body["mode"] == "dp"
    assert SqliteLedger(index).summary().queries == 1


def test_eval_end_to_end_with_kandinsky(folders, indexes, tmp_path):
    index = fresh_ledger(indexes["kandinsky-2.2"], tmp_path)
    holdout = tmp_path / "holdout"
    captions = ["the cat", "an eon", "the eon", "a cat", "the ant", "an ant", "a tan cat"]
    photos(holdout, n=len(captions), corrupt=False)  # PRDC needs more than 5 images
    (holdout / "captions.jsonl").write_text("".join(
        json.dumps({"file": f"{'a' if i % 2 else 'b'}/{i}.png", "caption": c}) + "\n"
        for i, c in enumerate(captions)))
    result, data = invoke("eval", "--index", str(index), "--holdout", str(holdout),
                          "--out", str(tmp_path / "report"), "--epsilons", "8", "--queries",
                          "100", "--guidance", "1", "--generator", "kandinsky-2.2",
                          *folders["kandinsky-2.2"], *FAST)
    assert result.exit_code == 0, result.output
    labels = [row["label"] for row in data["runs"]]
    assert labels == ["public-only", "DP eps=8 T=100", "non-private"]
    assert data["runs"][1]["queries_charged"] == len(captions)
    assert "kandinsky-2.2" in data["feature_space"]
    assert SqliteLedger(index).summary().queries == 0  # experiment ledgers only


def test_embed_is_resumable_and_sharded(folders, tmp_path):
    from dprdm.encoders.collection import embed_collection, journal_dir
    from dprdm.generation.backends import GeneratorChoice

    images = photos(tmp_path / "photos", n=11)
    tower = GeneratorChoice("kandinsky-2.2", prior=folders["kandinsky-2.2"][3],
                            device="cpu").load_image_tower()
    whole = embed_collection(tower, images, tmp_path / "whole.npy", batch_size=2, chunk_files=3)
    assert whole["rows"] == 11 and whole["report"].n_skipped == 1

    class Interrupted(Exception):
        pass

    calls = {"n": 0, "limit": 3}
    embed = tower.embed_images

    def flaky(pixels, batch_size):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise Interrupted
        return embed(pixels, batch_size)

    tower.embed_images = flaky
    out = tmp_path / "resumed.npy"
    with pytest.raises(Interrupted):
        embed_collection(tower, images, out, batch_size=2, chunk_files=3)
    assert not out.exists() and journal_dir(out).is_dir()  # finished chunks are journaled
    calls.update(n=0, limit=10 ** 6)
    resumed = embed_collection(tower, images, out, batch_size=2, chunk_files=3)
    assert resumed["chunks_resumed"] == 1 and calls["n"] == 5  # 12 files: 4 chunks, 1 done
    assert not journal_dir(out).exists()
    np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "whole.npy"))
    assert json.loads((tmp_path / "resumed.ids.json").read_text()) == \
        json.loads((tmp_path / "whole.ids.json").read_text())
    assert resumed["report"].by_kind()["corrupt"]["count"] == 1  # counted across the restart
    # a journal of another job is refused, not mixed in
    tower.embed_images = lambda *a: (_ for _ in ()).throw(Interrupted())
    with pytest.raises(Interrupted):
        embed_collection(tower, images, out, batch_size=2, chunk_files=3)
    with pytest.raises(Exception, match="partial run of another job"):
        embed_collection(tower, images, out, batch_size=2, chunk_files=4)
    tower.embed_images = embed

    # shards through the CLI, then one index from all of them equals the whole folder's
    parts = []
    for shard in ("0/3", "1/3", "2/3"):
        part = tmp_path / f"part{shard[0]}.npy"
        result, data = invoke("encoders", "embed", "--generator", "kandinsky-2.2",
                              *folders["kandinsky-2.2"], "--device", "cpu", "--images",
                              str(images), "--out", str(part), "--shard", shard)
        assert result.exit_code == 0, result.output
        parts.append(str(part))
    result, built = invoke("index", "build", *parts, "--out", str(tmp_path / "index"))
    assert result.exit_code == 0, result.output
    from dprdm.retrieval import EmbeddingIndex

    index = EmbeddingIndex.open(tmp_path / "index")
    assert index.n == 11
    np.testing.assert_allclose(index.rows_float32(np.arange(11)), np.load(tmp_path / "whole.npy"),
                               atol=1e-6)
    result, error = invoke("encoders", "embed", "--generator", "kandinsky-2.2",
                           *folders["kandinsky-2.2"], "--images", str(images),
                           "--out", str(tmp_path / "x.npy"), "--shard", "3/3")
    assert result.exit_code == 2 and "0 <= i < n" in error["message"]
