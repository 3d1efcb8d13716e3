"""The encoder contract, the CLIP backend (a tiny random CLIP on disk) and the demo encoder."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dprdm.encoders import (ClipEncoder, DemoEncoder, DemoEncoderConfig, Encoder,  # noqa: E402
                            EncoderLoadError, load_encoder, shipped_weights_dir)
from dprdm.encoders.clip import ClipPreprocessing  # noqa: E402
from dprdm.errors import InvalidParameterError  # noqa: E402

TEXTS = ["grinning face", "red apple", "a cat", "rocket", "", "thumbs up " * 40]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is faster on a busy machine. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(n: int = 5, h: int = 40, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_demo() -> DemoEncoder:
    torch.manual_seed(0)
    return DemoEncoder(DemoEncoderConfig(dim=8, channels=(4, 8))).eval()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP (2-layer towers, 16-d projection) + a hand-made byte-level BPE tokenizer."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in sorted(ByteLevel.alphabet()):
            vocab[char + suffix] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    bos, eos = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = bos, eos
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=24, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3}))
    return directory


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir) -> Encoder:
    return load_encoder(tiny_clip_dir)


@pytest.fixture(scope="module")
def shipped() -> Encoder:
    return load_encoder("demo")


# ---------------------------------------------------------------------------------------------
# the contract, for every backend


@pytest.fixture(params=["tiny_demo", "tiny_clip"])
def encoder(request) -> Encoder:
    return request.getfixturevalue(request.param)


def test_shapes_dtypes_unit_norm(encoder):
    t = encoder.encode_text(TEXTS)
    x = encoder.encode_images(images())
    for emb, n in ((t, len(TEXTS)), (x, 5)):
        assert emb.dtype == np.float32 and emb.shape == (n, encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_batching_equals_unbatched_and_is_deterministic(encoder):
    np.testing.assert_allclose(encoder.encode_text(TEXTS, batch_size=2),
                               encoder.encode_text(TEXTS, batch_size=100), atol=1e-5)
    pics = images(7)
    full = encoder.encode_images(pics)
    np.testing.assert_allclose(encoder.encode_images(pics, batch_size=3), full, atol=1e-5)
    np.testing.assert_array_equal(encoder.encode_images(pics), full)
    np.testing.assert_allclose(encoder.encode_images(pics[2:3])[0], full[2], atol=1e-5)


def test_any_image_size_and_empty_inputs(encoder):
    assert encoder.encode_images(images(2, 17, 50)).shape == (2, encoder.dim)
    assert encoder.encode_images(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, encoder.dim)
    assert encoder.encode_text([]).shape == (0, encoder.dim)


@pytest.mark.parametrize("bad", [
    images().astype(np.float32),  # wrong dtype
    images()[..., 0],  # no channel axis
    np.zeros((2, 8, 8, 4), np.uint8),  # RGBA
    images()[0],  # one image without the batch axis
    [[0, 0, 0]],  # not an array
])
def test_bad_images_are_refused(tiny_demo, bad):
    with pytest.raises(InvalidParameterError):
        tiny_demo.encode_images(bad)


@pytest.mark.parametrize("bad", ["a single string", ["ok", 3], None])
def test_bad_texts_are_refused(tiny_demo, bad):
    with pytest.raises(InvalidParameterError):
        tiny_demo.encode_text(bad)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_bad_batch_size(tiny_demo, batch_size):
    with pytest.raises(InvalidParameterError):
        tiny_demo.encode_text(["x"], batch_size=batch_size)


def test_progress_bar_does_not_change_results(tiny_demo):
    pics = images(3)
    np.testing.assert_array_equal(tiny_demo.encode_images(pics, progress=True),
                                  tiny_demo.encode_images(pics, progress=False))


# ---------------------------------------------------------------------------------------------
# load_encoder


def test_load_encoder_errors(tmp_path):
    with pytest.raises(EncoderLoadError, match="does not exist"):
        load_encoder(tmp_path / "nowhere")
    with pytest.raises(EncoderLoadError, match="no config.json"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EncoderLoadError, match="not a supported encoder"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EncoderLoadError, match="not valid JSON"):
        load_encoder(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(EncoderLoadError, match="not a directory"):
        load_encoder(tmp_path / "file.txt")
    with pytest.raises(InvalidParameterError):
        load_encoder(3)


# ---------------------------------------------------------------------------------------------
# CLIP


def test_clip_loads_through_load_encoder(tiny_clip, tiny_clip_dir):
    assert isinstance(tiny_clip, ClipEncoder) and tiny_clip.dim == 16
    assert tiny_clip.describe()["encoder"] == "clip"


def test_clip_matches_the_model_it_wraps(tiny_clip):
    """Our embedding is exactly the normalised projected features of CLIPModel."""
    pics = images(3, 32, 32)
    pixels = tiny_clip.preprocessing(pics)
    batch = tiny_clip.tokenizer(["a cat", "red"], padding=True, return_tensors="pt")
    with torch.no_grad():
        img = tiny_clip.model.get_image_features(pixel_values=pixels)
        txt = tiny_clip.model.get_text_features(input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    np.testing.assert_allclose(tiny_clip.encode_images(pics),
                               torch.nn.functional.normalize(img, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(tiny_clip.encode_text(["a cat", "red"]),
                               torch.nn.functional.normalize(txt, dim=-1).numpy(), atol=1e-5)


def test_clip_preprocessing_matches_transformers(tiny_clip_dir):
    """Our Pillow/numpy preprocessing equals transformers' own (PIL backend) processor."""
    clip_pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    reference = clip_pil.CLIPImageProcessorPil.from_pretrained(tiny_clip_dir)
    ours = ClipPreprocessing.from_dir(tiny_clip_dir, 32)
    pics = images(3, 40, 57)
    expected = reference(images=list(pics), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours(pics).numpy(), expected, atol=1e-4)


def test_hub_cache_layout_resolves(tiny_clip_dir, tmp_path):
    entry = tmp_path / "models--tiny--clip"
    snapshot = entry / "snapshots" / "abc123"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(tiny_clip_dir, target_is_directory=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    assert load_encoder(entry).dim == 16


# ---------------------------------------------------------------------------------------------
# the demo encoder


def test_demo_save_load_round_trip(tiny_demo, tmp_path):
    tiny_demo.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_encoder(tmp_path)
    assert isinstance(loaded, DemoEncoder) and loaded.config == tiny_demo.config
    pics = images(4)
    np.testing.assert_array_equal(loaded.encode_images(pics), tiny_demo.encode_images(pics))
    np.testing.assert_array_equal(loaded.encode_text(TEXTS), tiny_demo.encode_text(TEXTS))


def test_demo_checkpoint_errors(tiny_demo, tmp_path):
    tiny_demo.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(EncoderLoadError):
        load_encoder(tmp_path)
    DemoEncoder(DemoEncoderConfig(dim=4, channels=(4, 8))).save_pretrained(tmp_path / "other")
    (tmp_path / "model.safetensors").write_bytes(
        (tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(EncoderLoadError, match="does not match"):
        load_encoder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(EncoderLoadError, match="no model.safetensors"):
        load_encoder(tmp_path)
    with pytest.raises(InvalidParameterError):
        DemoEncoderConfig(dim=0)


def test_demo_text_tower_is_minilm_mean_pooled(tiny_demo):
    """The frozen features are all-MiniLM-L6-v2 sentence embeddings: unit norm, 384-d, and
    paraphrases closer than unrelated sentences."""
    f = tiny_demo.sentence_features(["a smiling face", "a happy grinning face", "a fire truck"])
    assert f.shape == (3, 384)
    np.testing.assert_allclose(f.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    assert f[0] @ f[1] > f[0] @ f[2] + 0.2


def test_shipped_demo_weights(shipped):
    assert isinstance(shipped, DemoEncoder)
    config = json.loads((shipped_weights_dir() / "config.json").read_text())
    assert shipped.dim == config["dim"]
    size = (shipped_weights_dir() / "model.safetensors").stat().st_size
    assert size < 8_000_000
    pics = images(3, 64, 64)
    for emb in (shipped.encode_images(pics), shipped.encode_text(TEXTS)):
        assert emb.dtype == np.float32 and emb.shape[1] == shipped.dim
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # the projection keeps MiniLM's sense: related captions closer than unrelated ones
    t = shipped.encode_text(["red apple", "green apple", "airplane"])
    assert t[0] @ t[1] > t[0] @ t[2]


# ---------------------------------------------------------------------------------------------
# the CLI sub-app


def test_cli_info_embed_and_errors(tiny_demo, tmp_path):
    from typer.testing import CliRunner

    from dprdm.cli.encoders import app

    model_dir = tiny_demo.save_pretrained(tmp_path / "enc")
    runner = CliRunner()
    result = runner.invoke(app, ["info", "--encoder", str(model_dir), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["dim"] == 8
    texts = tmp_path / "prompts.txt"
    texts.write_text("red apple\ngrinning face\n")
    out = tmp_path / "emb.npy"
    result = runner.invoke(app, ["embed", "--texts", str(texts), "--out", str(out),
                                 "--encoder", str(model_dir), "--json"])
    assert result.exit_code == 0, result.output
    emb = np.load(out)
    assert emb.shape == (2, 8)
    np.testing.assert_allclose(emb, tiny_demo.encode_text(["red apple", "grinning face"]),
                               atol=1e-6)
    assert json.loads((tmp_path / "emb.ids.json").read_text()) == ["0", "1"]
    result = runner.invoke(app, ["info", "--encoder", str(tmp_path / "missing"), "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout)["error"] == "model_unavailable"


def _png(path, colour, fmt="PNG"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 18), colour).save(path, format=fmt)


def test_cli_embed_plain_nested_folder_reports_skips(tiny_demo, tmp_path):
    """No captions needed; nested files found; corrupt and unsupported files named and counted."""
    from typer.testing import CliRunner

    from dprdm.cli.encoders import app
    from dprdm.data import decode_image
    from dprdm.provenance import file_sha256, read_sidecar

    model_dir = tiny_demo.save_pretrained(tmp_path / "enc")
    folder = tmp_path / "photos"
    _png(folder / "a.png", (200, 0, 0))
    _png(folder / "trip" / "b.jpg", (0, 200, 0), "JPEG")
    _png(folder / "trip" / "day2" / "c.webp", (0, 0, 200), "WEBP")
    (folder / "trip" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "logo.svg").write_text("<svg/>")
    out = tmp_path / "emb.npy"
    runner = CliRunner()
    args = ["embed", "--images", str(folder), "--out", str(out), "--encoder", str(model_dir),
            "--size", "32"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["rows"], report["embedded"], report["skipped"]) == (3, 3, 2)
    assert report["skipped_by_reason"] == {
        "unsupported_type": {"count": 1, "examples": ["logo.svg"]},
        "corrupt": {"count": 1, "examples": ["trip/corrupt.jpg"]},
    }
    ids = json.loads((tmp_path / "emb.ids.json").read_text())
    assert ids == ["a.png", "trip/b.jpg", "trip/day2/c.webp"]
    expected = tiny_demo.encode_images(np.stack([decode_image(folder / i, 32) for i in ids]))
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    # provenance: not public unless --public, and bound to the file by its digest
    record, _ = read_sidecar(out)
    assert record["public"] is False and record["source"] == str(folder.resolve())
    assert record["sha256"] == file_sha256(out) and record["rows"] == 3
    assert report["public"] is False and report["provenance"] == str(tmp_path /
                                                                     "emb.provenance.json")
    result = runner.invoke(app, [*args, "--public"])  # the human table names the skips too
    assert result.exit_code == 0, result.output
    assert "skipped: corrupt" in result.stdout and "1 (trip/corrupt.jpg)" in result.stdout
    assert read_sidecar(out)[0]["public"] is True


def test_cli_embed_ignores_captions_it_does_not_need(tiny_demo, tmp_path):
    """A datasets-imagefolder metadata.jsonl, even with columns dprdm does not know, and images it
    does not list: image embeddings need no captions, so every image is embedded."""
    from typer.testing import CliRunner

    from dprdm.cli.encoders import app

    model_dir = tiny_demo.save_pretrained(tmp_path / "enc")
    folder = tmp_path / "hf"
    for i in range(3):
        _png(folder / "train" / f"{i}.png", (60 * i, 10, 10))
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "train/0.png", "description": "x"}) + "\n")
    out = tmp_path / "hf.npy"
    result = CliRunner().invoke(app, ["embed", "--images", str(folder), "--out", str(out),
                                      "--encoder", str(model_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["embedded"] == 3 and report["skipped"] == 0  # metadata.jsonl is not "skipped"
    assert np.load(out).shape == (3, 8)


def test_cli_embed_with_nothing_embeddable_exits_2_and_writes_nothing(tiny_demo, tmp_path):
    from typer.testing import CliRunner

    from dprdm.cli.encoders import app

    model_dir = tiny_demo.save_pretrained(tmp_path / "enc")
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"garbage")
    (folder / "readme.txt").write_text("no images here")
    out = tmp_path / "out" / "emb.npy"
    runner = CliRunner()
    for target in (folder, tmp_path / "empty"):
        target.mkdir(exist_ok=True)
        result = runner.invoke(app, ["embed", "--images", str(target), "--out", str(out),
                                     "--encoder", str(model_dir), "--json"])
        assert result.exit_code == 2
        error = json.loads(result.stdout)
        assert error["error"] == "invalid_parameter"
        assert "nothing to embed" in error["message"]
        assert not (tmp_path / "out").exists()
    assert "1 corrupt (a.png)" in json.loads(runner.invoke(app, [
        "embed", "--images", str(folder), "--out", str(out), "--encoder", str(model_dir),
        "--json"]).stdout)["message"]


# ---------------------------------------------------------------------------------------------
# training (a few steps of a tiny model on a made-up data root)


def fake_demo_root(root):
    """data/twemoji, data/google and holdout/ with a few coloured squares each."""
    from PIL import Image

    names = ["red apple", "blue car", "green leaf", "yellow sun", "black cat", "white cloud"]
    colours = [(220, 30, 30), (30, 60, 220), (30, 180, 60), (240, 220, 20), (10, 10, 10),
               (200, 200, 210)]
    for split, shift in (("data/twemoji", 0), ("data/google", 8), ("holdout", 4)):
        folder = root / split
        folder.mkdir(parents=True)
        rows = []
        for i, (caption, colour) in enumerate(zip(names, colours)):
            if split == "holdout" and i > 1:
                break
            pixels = np.full((64, 64, 3), 255, np.uint8)
            pixels[12 + shift:44 + shift, 12:44 + i] = colour
            Image.fromarray(pixels).save(folder / f"c{i}.png")
            rows.append({"file": f"c{i}.png", "caption": caption, "concept": f"C{i}"})
        (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_train_demo_is_seeded_resumable_and_leaves_holdout_out(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from dprdm.encoders import train_demo as training

    root = fake_demo_root(tmp_path / "demo")
    config = training.TrainConfig(dim=8, channels=(4, 8), steps=4, batch_size=3,
                                  warmup_steps=1, checkpoint_every=2)
    sources = training.load_sources(root, config)
    assert sources.n == 8 and len(sources.captions) == 4  # concepts C0, C1 are held out
    assert "red apple" not in sources.captions
    assert len(sources.images) == 8 * (len(sources.names) - 1)  # originals + one block an aug

    summary = training.train_demo(root, tmp_path / "a", config, show_progress=False)
    assert summary["steps"] == 4 and not (tmp_path / "a" / training.STATE_NAME).exists()
    straight = load_file(str(tmp_path / "a" / "model.safetensors"))

    # interrupted after its step-2 checkpoint, then resumed: the very same weights
    real_lr_at = training.lr_at

    def crash_at_step_3(step, cfg):
        if step == 3:
            raise KeyboardInterrupt
        return real_lr_at(step, cfg)

    monkeypatch.setattr(training, "lr_at", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        training.train_demo(root, tmp_path / "b", config, show_progress=False)
    assert (tmp_path / "b" / training.STATE_NAME).exists()
    monkeypatch.setattr(training, "lr_at", real_lr_at)
    training.train_demo(root, tmp_path / "b", config, show_progress=False)
    resumed = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=0)
    assert load_encoder(tmp_path / "b").dim == 8


# ---------------------------------------------------------------------------------------------
# the evaluation helpers


def test_evaluation_helpers():
    from dprdm.encoders.evaluate import (linear_probe, noisy_aggregates, retrieval_accuracy,
                                         style_knn)

    eye = np.eye(4, dtype=np.float32)
    # text i matches image i, except text 3 whose best image is 0 (and its own is 2nd)
    texts = eye.copy()
    texts[3] = np.array([0.8, 0, 0, 0.6], np.float32)
    acc = retrieval_accuracy(texts, eye, list("abcd"), list("abcd"), ks=(1, 2))
    assert acc == {"top1": 0.75, "top2": 1.0}
    pool = np.concatenate([eye, eye])
    is_target = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
    assert style_knn(eye[:1], pool, is_target, k=2) == 0.5
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(60, 3)) + np.array([3.0, 0, 0])
    neg = rng.normal(size=(60, 3)) - np.array([3.0, 0, 0])
    probe = linear_probe(pos, neg)
    assert probe["accuracy"] > 0.95 and probe["n_test"] == 60
    agg = noisy_aggregates(eye[:2], eye, 0.0, 1, rng)
    np.testing.assert_array_equal(agg, eye[:2])


def test_supervised_contrastive_loss_rewards_grouping_by_label():
    from dprdm.encoders.train_demo import supervised_contrastive_loss

    labels = torch.tensor([0, 0, 1, 1])
    grouped = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.05], [1.0, -0.05], [-1.0, 0.05], [-1.0, -0.05]]), dim=-1)
    mixed = grouped[[0, 2, 1, 3]]
    good = supervised_contrastive_loss(grouped, labels, 0.1)
    bad = supervised_contrastive_loss(mixed, labels, 0.1)
    assert good < 0.01 < 1.0 < bad
    # an anchor without positives is left out, not a NaN
    assert torch.isfinite(supervised_contrastive_loss(grouped, torch.tensor([0, 0, 1, 2]), 0.1))


def test_train_demo_family_mode_draws_styles_per_source(tmp_path):
    from dprdm.encoders import train_demo as training

    root = fake_demo_root(tmp_path / "demo")
    config = training.TrainConfig(dim=8, channels=(4, 8), steps=2, batch_size=4,
                                  sources_per_batch=2, family_size=5,
                                  family_images_per_source=3, warmup_steps=1)
    sources = training.load_family_sources(root, config)
    assert len(sources.names) == 2 + 5 and sources.names[2].startswith("twemoji+recipe0")
    assert len(sources.captions) == 4 and "red apple" not in sources.captions
    assert all(len(m) == (4 if i < 2 else 3) for i, m in enumerate(sources.members))
    rows, concepts, labels = training.sample_family_batch(sources, config,
                                                          np.random.default_rng(0))
    assert len(rows) == 4 and len(set(labels[:2])) == 1 and len(set(labels[2:])) == 1
    assert len(set(rows[:2])) == 2  # distinct images within a source
    summary = training.train_demo(root, tmp_path / "f", config, show_progress=False)
    assert "5 procedural styles" in summary["sources"][-1]
    assert load_encoder(tmp_path / "f").dim == 8
    with pytest.raises(InvalidParameterError):
        training.TrainConfig(family_size=5, batch_size=6, sources_per_batch=4)

    # fine-tuning starts from the given weights (a vanishing learning rate keeps them)
    from safetensors.torch import load_file
    tuned = dataclasses.replace(config, steps=1, lr=1e-12, init_from=str(tmp_path / "f"))
    training.train_demo(root, tmp_path / "g", tuned, show_progress=False)
    before, after = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("f", "g"))
    weights = [k for k in before if "running_" not in k and "num_batches" not in k]
    assert len(weights) > 4  # (batch-norm statistics move with any forward pass in training)
    for key in weights:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)
    with pytest.raises(InvalidParameterError, match="architecture"):
        training.train_demo(root, tmp_path / "h", dataclasses.replace(tuned, dim=16),
                            show_progress=False)
