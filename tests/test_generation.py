"""The generator: models, pipeline, training stages (tiny, random data; no demo data needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dprdm.errors import InvalidParameterError
from dprdm.generation import (DEFAULT_DIR, Autoencoder, LatentDenoiser,
                              RetrievalDiffusionPipeline, default_scheduler)
from dprdm.generation.training import (ConditionBank, TrainConfig, make_conditions,
                                       same_source_neighbours, train_autoencoder,
                                       train_denoiser)

TINY_AE = {"channels": (8, 8, 16), "encoder_blocks": (1, 1, 1), "decoder_blocks": (1, 1, 1)}
TINY_DENOISER = {"channels": (16, 32), "emb_dim": 32, "cond_map_channels": 4, "heads": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pipeline(cond_dim: int = 12, seed: int = 0) -> RetrievalDiffusionPipeline:
    torch.manual_seed(seed)
    denoiser = LatentDenoiser(cond_dim=cond_dim, **TINY_DENOISER)
    with torch.no_grad():  # zero-initialised output layers would make every branch equal
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return RetrievalDiffusionPipeline(Autoencoder(**TINY_AE), denoiser, default_scheduler())


def conditions(n: int = 3, dim: int = 12, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_pipeline_output_shape_dtype_and_seed():
    pipe = tiny_pipeline().to("cpu")  # the usual nn.Module machinery (.to, .float) works
    pipe.denoiser.float()
    c = conditions()
    images = pipe(c, guidance=2.0, steps=4, generator=torch.Generator().manual_seed(7))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    again = pipe(c, guidance=2.0, steps=4, generator=torch.Generator().manual_seed(7))
    other = pipe(c, guidance=2.0, steps=4, generator=torch.Generator().manual_seed(8))
    assert np.array_equal(images, again)
    assert not np.array_equal(images, other)
    assert pipe(np.zeros((0, 12), np.float32), steps=2).shape == (0, 32, 32, 3)


def test_guidance_combines_branches_without_mixing_rows():
    pipe = tiny_pipeline()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor(500)
    c = torch.from_numpy(conditions())
    cond = pipe.denoiser(x, t, c)
    uncond = pipe.denoiser(x, t, c, drop=torch.ones(3, dtype=torch.bool))
    assert not torch.allclose(cond, uncond)
    assert torch.equal(pipe.predict(x, t, c, 1.0), cond)
    assert torch.allclose(pipe.predict(x, t, c, 0.0), uncond)
    assert torch.allclose(pipe.predict(x, t, c, 2.5), uncond + 2.5 * (cond - uncond), atol=1e-5)
    # the unconditional branch ignores the condition
    other = pipe.denoiser(x, t, -c, drop=torch.ones(3, dtype=torch.bool))
    assert torch.allclose(uncond, other)


def test_split_guidance_pulls_towards_the_prompt_and_from_it_towards_the_condition():
    pipe = tiny_pipeline()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor(500)
    c = torch.from_numpy(conditions())
    text = torch.from_numpy(conditions(seed=5))
    null = torch.ones(3, dtype=torch.bool)
    cond, prompt_only = pipe.denoiser(x, t, c), pipe.denoiser(x, t, text)
    uncond = pipe.denoiser(x, t, c, drop=null)
    split = pipe.predict(x, t, c, 2.0, text, 5.0)
    assert torch.allclose(split, uncond + 5.0 * (prompt_only - uncond)
                          + 2.0 * (cond - prompt_only), atol=1e-5)
    # equal scales are plain classifier-free guidance, whatever the content conditions (and
    # are run as it: the same two passes)
    assert torch.equal(pipe.predict(x, t, c, 2.5, text, 2.5), pipe.predict(x, t, c, 2.5))
    # and through the sampler: the same images as plain guidance (same seed)
    plain = pipe(c.numpy(), guidance=2.5, steps=3, generator=torch.Generator().manual_seed(3))
    same = pipe(c.numpy(), guidance=2.5, steps=3, generator=torch.Generator().manual_seed(3),
                content_conditions=text.numpy(), content_guidance=2.5)
    assert np.abs(plain.astype(int) - same.astype(int)).max() <= 1
    pulled = pipe(c.numpy(), guidance=2.5, steps=3, generator=torch.Generator().manual_seed(3),
                  content_conditions=text.numpy(), content_guidance=8.0)
    assert not np.array_equal(plain, pulled)
    for bad in ({"content_conditions": text.numpy()}, {"content_guidance": 4.0},
                {"content_conditions": text.numpy()[:2], "content_guidance": 4.0},
                {"content_conditions": text.numpy(), "content_guidance": -1.0},
                {"content_conditions": text.numpy(), "content_guidance": float("nan")}):
        with pytest.raises(InvalidParameterError, match="content"):
            pipe(c.numpy(), steps=2, **bad)


def test_invalid_arguments_are_refused():
    pipe = tiny_pipeline()
    with pytest.raises(InvalidParameterError):
        pipe(conditions(dim=5), steps=2)
    with pytest.raises(InvalidParameterError):
        pipe(np.full((1, 12), np.nan, np.float32), steps=2)
    with pytest.raises(InvalidParameterError):
        pipe(conditions(), guidance=-1.0, steps=2)
    with pytest.raises(InvalidParameterError):
        pipe(conditions(), steps=0)


def test_save_load_round_trip(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "denoiser" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((tmp_path / "denoiser" / "config.json").read_text())["cond_dim"] == 12
    loaded = RetrievalDiffusionPipeline.from_pretrained(tmp_path)
    for name in ("autoencoder", "denoiser"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    c = conditions()
    assert np.array_equal(pipe(c, steps=3, generator=torch.Generator().manual_seed(0)),
                          loaded(c, steps=3, generator=torch.Generator().manual_seed(0)))


def test_a_pipeline_records_the_content_guidance_it_was_chosen_at(tmp_path):
    from dprdm.generation.backends.demo import recorded_content_guidance
    from dprdm.generation.pipeline import export_weights

    pipe = tiny_pipeline()
    assert pipe.config.content_guidance is None and recorded_content_guidance(pipe) is None
    pipe.save_pretrained(tmp_path / "plain")
    plain = RetrievalDiffusionPipeline.from_pretrained(tmp_path / "plain")
    assert plain.config.content_guidance is None
    export_weights(tmp_path / "plain", tmp_path / "chosen", content_guidance=6)
    written = json.loads((tmp_path / "chosen" / "model_index.json").read_text())
    assert written["content_guidance"] == 6.0
    chosen = RetrievalDiffusionPipeline.from_pretrained(tmp_path / "chosen")
    assert chosen.config.content_guidance == 6.0 and recorded_content_guidance(chosen) == 6.0
    export_weights(tmp_path / "chosen", tmp_path / "again")  # kept by a later export
    assert RetrievalDiffusionPipeline.from_pretrained(
        tmp_path / "again").config.content_guidance == 6.0
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(InvalidParameterError, match="content_guidance"):
            export_weights(tmp_path / "plain", tmp_path / "bad", content_guidance=bad)
        assert not (tmp_path / "bad").exists()
    written["content_guidance"] = -2.0  # a hand-edited folder is refused when loaded
    (tmp_path / "chosen" / "model_index.json").write_text(json.dumps(written))
    with pytest.raises(InvalidParameterError, match="content_guidance"):
        RetrievalDiffusionPipeline.from_pretrained(tmp_path / "chosen")


def test_a_pipeline_records_the_public_only_mix_it_was_chosen_at(tmp_path):
    from dprdm.generation.backends.demo import recorded_public_lam
    from dprdm.generation.pipeline import export_weights

    pipe = tiny_pipeline()
    assert pipe.config.public_lam is None and recorded_public_lam(pipe) is None
    pipe.save_pretrained(tmp_path / "plain")
    export_weights(tmp_path / "plain", tmp_path / "chosen", public_lam=0.25)
    chosen = RetrievalDiffusionPipeline.from_pretrained(tmp_path / "chosen")
    assert recorded_public_lam(chosen) == 0.25
    export_weights(tmp_path / "chosen", tmp_path / "again")  # kept by a later export
    assert recorded_public_lam(RetrievalDiffusionPipeline.from_pretrained(tmp_path / "again")) \
        == 0.25
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidParameterError, match="lam"):
            export_weights(tmp_path / "plain", tmp_path / "bad", public_lam=bad)
        assert not (tmp_path / "bad").exists()


def test_half_precision_export_loads_as_float32(tmp_path):
    from dprdm.generation.pipeline import export_weights

    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "full")
    export_weights(tmp_path / "full", tmp_path / "half")
    full = (tmp_path / "full" / "denoiser" / "diffusion_pytorch_model.safetensors").stat().st_size
    half = (tmp_path / "half" / "denoiser" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert half < 0.6 * full
    for config in [tmp_path / "half" / "model_index.json",
                   *(tmp_path / "half").glob("*/config.json")]:  # no local path of the source
        assert "_name_or_path" not in json.loads(config.read_text()), config
    loaded = RetrievalDiffusionPipeline.from_pretrained(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in loaded.denoiser.parameters())
    c = conditions()
    a = pipe(c, steps=3, generator=torch.Generator().manual_seed(0)).astype(int)
    b = loaded(c, steps=3, generator=torch.Generator().manual_seed(0)).astype(int)
    assert np.abs(a - b).mean() < 2.0  # float16 rounding of the weights only


def test_same_source_neighbours_exclude_self_and_other_sources():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((12, 4))
    sources = np.array(["a"] * 6 + ["b"] * 6)
    nbrs = same_source_neighbours(emb, emb, sources, 3)
    for i, row in enumerate(nbrs):
        assert i not in row
        assert set(sources[row]) == {sources[i]}
        scores = emb[row] @ emb[i]
        assert np.all(np.diff(scores) <= 1e-12)  # nearest first


def test_make_conditions_follow_the_generation_recipe():
    rng = np.random.default_rng(0)
    n, d = 10, 6
    emb = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    text = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    nbrs = torch.from_numpy(np.stack([np.roll(np.arange(n), -i - 1)[:4] for i in range(n)]))
    bank = ConditionBank(torch.zeros(n, 4, 8, 8), torch.zeros(n, 4, 8, 8), emb, text, nbrs,
                         nbrs.flip(1), ["s"] * n, [""] * n, {})
    config = TrainConfig(k_choices=(1, 2, 4), neighbours=4, steps=1)
    index = torch.arange(n)
    c = make_conditions(bank, index, config, torch.Generator().manual_seed(0),
                        k=2, sigma=0.0, lam=1.0, by_text=False)
    assert torch.allclose(c, emb[nbrs[:, :2]].mean(1))
    c = make_conditions(bank, index, config, torch.Generator().manual_seed(0), lam=0.0)
    assert torch.allclose(c, text)
    c = make_conditions(bank, index, config, torch.Generator().manual_seed(0))
    assert c.shape == (n, d) and torch.isfinite(c).all()


def test_text_query_share_chooses_whose_neighbours_form_the_condition():
    rng = np.random.default_rng(1)
    n, d = 8, 5
    emb = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    by_image = torch.from_numpy(np.stack([np.roll(np.arange(n), -1 - i)[:2] for i in range(n)]))
    by_text = torch.from_numpy(np.stack([np.roll(np.arange(n), 1 + i)[:2] for i in range(n)]))
    bank = ConditionBank(torch.zeros(n, 4, 8, 8), torch.zeros(n, 4, 8, 8), emb, emb, by_image,
                         by_text, ["s"] * n, [""] * n, {})
    index = torch.arange(n)
    for share, expected in ((1.0, by_text), (0.0, by_image)):
        config = TrainConfig(k_choices=(2,), neighbours=2, steps=1, text_query_share=share)
        c = make_conditions(bank, index, config, torch.Generator().manual_seed(0), sigma=0.0,
                            lam=1.0)
        assert torch.allclose(c, emb[expected].mean(1))
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidParameterError, match="text_query_share"):
            TrainConfig(steps=1, text_query_share=bad).resolved()


def test_random_neighbours_come_uniformly_from_the_own_source_never_itself():
    from dprdm.generation.training import SameSourceDraws

    sources = ["a"] * 5 + ["b"] * 3 + ["a"] * 2 + ["c"] * 2  # sources need not be contiguous
    draws = SameSourceDraws(sources)
    gen = torch.Generator().manual_seed(0)
    for i, source in enumerate(sources):
        drawn = draws(torch.full((6000,), i), 4, gen).flatten().numpy()
        others = [j for j, s in enumerate(sources) if s == source and j != i]
        assert set(drawn) == set(others)  # its own source, never itself
        share = np.bincount(drawn, minlength=len(sources))[others] / drawn.size
        assert np.allclose(share, 1 / len(others), atol=0.02)
    with pytest.raises(InvalidParameterError, match="at least 2"):
        SameSourceDraws(["a", "a", "b"])


def test_random_neighbour_share_swaps_nearest_neighbours_for_random_same_source_images():
    n = 12
    sources = ["s"] * 6 + ["t"] * 6
    emb = torch.eye(n)  # one-hot embeddings: a condition shows which images it averaged
    nearest = torch.from_numpy(np.stack([[i ^ 1] for i in range(n)]))  # a fixed partner
    bank = ConditionBank(torch.zeros(n, 4, 8, 8), torch.zeros(n, 4, 8, 8), emb, emb, nearest,
                         nearest, sources, [""] * n, {})
    index = torch.arange(n).repeat(400)
    used = {}
    for share in (0.0, 0.5, 1.0):
        config = TrainConfig(k_choices=(1,), neighbours=1, steps=1,
                             random_neighbour_share=share)
        c = make_conditions(bank, index, config, torch.Generator().manual_seed(0), sigma=0.0,
                            lam=1.0)
        used[share] = c.argmax(1)
        assert torch.equal(c, emb[used[share]])  # still one unit-norm image per sample (k 1)
        assert all(sources[j] == sources[i] for i, j in zip(index.tolist(),
                                                             used[share].tolist()))
        assert not torch.any(used[share] == index)
    partner = index ^ 1
    assert torch.equal(used[0.0], partner)  # 0: the nearest neighbours, as before
    # 1: random others of the source: the partner is 1 of its 5 others
    assert abs((used[1.0] == partner).float().mean().item() - 0.2) < 0.03
    # 0.5: half nearest, half random (1/5 of which is the partner too): 0.5 + 0.5 * 0.2
    assert abs((used[0.5] == partner).float().mean().item() - 0.6) < 0.04
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidParameterError, match="random_neighbour_share"):
            TrainConfig(steps=1, random_neighbour_share=bad).resolved()


def test_text_only_share_conditions_that_share_of_real_style_images_on_their_caption_alone():
    n = 8
    sources = ["twemoji"] * 4 + ["twemoji+recipe0"] * 4  # 4 real-style images, 4 restyled
    emb = torch.eye(n)[:, :n]
    text = -torch.eye(n)  # text and image halves point different ways: lam 0 is recognisable
    nearest = torch.from_numpy(np.stack([[i ^ 1] for i in range(n)]))
    bank = ConditionBank(torch.zeros(n, 4, 8, 8), torch.zeros(n, 4, 8, 8), emb, text, nearest,
                         nearest, sources, [""] * n, {})
    index = torch.arange(n).repeat(500)
    real = index < 4
    for share in (0.0, 0.5, 1.0):
        config = TrainConfig(k_choices=(1,), neighbours=1, steps=1, text_only_share=share)
        c = make_conditions(bank, index, config, torch.Generator().manual_seed(0), sigma=0.0)
        alone = torch.isclose(c, text[index]).all(1)  # exactly the caption, no image part
        assert not alone[~real].any()  # restyled images keep lam ~ U[0, 1]
        assert abs(alone[real].float().mean().item() - share) < 0.04
    # a fixed lam (the preview grid) is never overridden
    config = TrainConfig(k_choices=(1,), neighbours=1, steps=1, text_only_share=1.0)
    c = make_conditions(bank, index, config, torch.Generator().manual_seed(0), sigma=0.0, lam=1.0)
    assert torch.equal(c, emb[index ^ 1])
    # 0 draws nothing extra: the same conditions as a config without the option
    plain = make_conditions(bank, index, TrainConfig(k_choices=(1,), neighbours=1, steps=1),
                            torch.Generator().manual_seed(3))
    zero = make_conditions(bank, index, TrainConfig(k_choices=(1,), neighbours=1, steps=1,
                                                    text_only_share=0.0),
                           torch.Generator().manual_seed(3))
    assert torch.equal(plain, zero)
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidParameterError, match="text_only_share"):
            TrainConfig(steps=1, text_only_share=bad).resolved()


def test_real_share_sets_each_batch_share_of_unrestyled_images():
    from dprdm.generation.training import batch_drawer, is_restyled

    sources = ["twemoji"] * 10 + ["twemoji+recipe0"] * 45 + ["google+outline"] * 45
    restyled = is_restyled(sources)
    assert restyled.sum() == 90
    gen = torch.Generator().manual_seed(0)
    proportional = batch_drawer(restyled, 0.0)(20000, gen)
    assert abs(float((proportional < 10).float().mean()) - 0.1) < 0.01  # sd 0.002
    quota = batch_drawer(restyled, 0.6)(20000, gen)
    assert abs(float((quota < 10).float().mean()) - 0.6) < 0.015  # sd 0.0035
    assert set(quota[quota < 10].tolist()) == set(range(10))  # uniform within the group
    assert set(quota[quota >= 10].tolist()) == set(range(10, 100))
    assert (batch_drawer(restyled, 1.0)(500, gen) < 10).all()
    assert (batch_drawer(is_restyled(["a"] * 5), 1.0)(50, gen) < 5).all()
    with pytest.raises(InvalidParameterError, match="real_share"):  # refused when built
        batch_drawer(is_restyled(["a"] * 5), 0.5)
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidParameterError, match="real_share"):
            TrainConfig(steps=1, real_share=bad).resolved()


def _tiny_folder(root, n_per_style: int = 10):
    rng = np.random.default_rng(0)
    folder = root / "public"
    folder.mkdir()
    rows = []
    for style in ("red", "blue"):
        for i in range(n_per_style):
            pixels = np.full((32, 32, 3), 255, np.uint8)
            x, y = rng.integers(2, 20, 2)
            pixels[y:y + 10, x:x + 10] = (200, 30, 30) if style == "red" else (30, 30, 200)
            name = f"{style}{i}.png"
            Image.fromarray(pixels).save(folder / name)
            rows.append({"file": name, "caption": f"square {i}", "style": style})
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_training_stages_run_change_weights_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr("dprdm.generation.training.style_augmentations", lambda: {})
    data = _tiny_folder(tmp_path)
    out = tmp_path / "run"
    common = dict(data=str(data), data_is_public=True, out=str(out), batch_size=4,
                  warmup_steps=1, log_every=1)
    result = train_autoencoder(TrainConfig(stage="autoencoder", steps=2,
                                           extra={"autoencoder": TINY_AE}, **common))
    assert result["steps"] == 2
    ae = Autoencoder.from_pretrained(out / "autoencoder", low_cpu_mem_usage=False)
    assert ae.config.scaling_factor > 0
    logged = [json.loads(line) for line in (out / "autoencoder.log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["loss"]) for row in logged)

    config = TrainConfig(stage="denoiser", steps=2, encoder="stand-in", k_choices=(1, 2),
                         neighbours=2, extra={"denoiser": TINY_DENOISER}, **common)
    train_denoiser(config)
    first = torch.load(out / "denoiser.state.pt", weights_only=False)
    fresh = LatentDenoiser(cond_dim=64, **TINY_DENOISER).state_dict()
    changed = [k for k, v in first["model"].items() if not torch.equal(v, fresh[k])]
    assert "conv_out.weight" in changed and "null_condition" in changed
    assert (out / "cache" / "denoiser.pt").is_file()

    config.steps, config.resume = 3, True
    assert train_denoiser(config)["steps_this_run"] == 1
    pipe = RetrievalDiffusionPipeline.from_pretrained(out)
    images = pipe(conditions(2, 64), steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 32, 32, 3)


def test_training_data_must_be_declared_public(tmp_path):
    """A plain folder trains the generator only with --data-is-public; the demo root's manifest
    marks its public splits and needs no flag (and its private split is never read)."""
    import typer
    from typer.testing import CliRunner

    from dprdm.cli.train import train
    from dprdm.generation.training import load_public

    folder = _tiny_folder(tmp_path)
    with pytest.raises(InvalidParameterError, match="nothing marks this folder as public"):
        load_public(folder, 16)
    assert len(load_public(folder, 16, data_is_public=True).images) == 20

    root = tmp_path / "demo"
    (root / "data").mkdir(parents=True)
    folder.rename(root / "data" / "twemoji")
    _tiny_folder(root / "data")  # a second folder, declared private in the manifest
    (root / "data" / "public").rename(root / "data" / "openmoji_private")
    (root / "data" / "manifest.json").write_text(json.dumps({"splits": {
        "twemoji": {"path": "data/twemoji", "role": "public"},
        "openmoji_private": {"path": "data/openmoji_private", "role": "private"}}}))
    assert len(load_public(root, 16).images) == 20

    # the CLI: refused with the reason and exit 2 before any training
    app = typer.Typer()
    app.command()(train)
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "run"), "--stage", "autoencoder",
                                      "--data", str(root / "data" / "twemoji"), "--steps", "1",
                                      "--json"])
    assert result.exit_code == 2
    assert "--data-is-public" in json.loads(result.stdout.splitlines()[-1])["message"]
    out_of_range = CliRunner().invoke(app, ["--out", str(tmp_path / "run"), "--steps", "1",
                                            "--random-neighbour-share", "1.5"])
    assert out_of_range.exit_code == 2 and "random-neighbour-share" in out_of_range.output
    out_of_range = CliRunner().invoke(app, ["--out", str(tmp_path / "run"), "--steps", "1",
                                            "--text-only-share", "-0.5"])
    assert out_of_range.exit_code == 2 and "text-only-share" in out_of_range.output


def test_load_public_reads_the_demo_public_splits_unless_others_are_named(tmp_path):
    """Public splits added to the demo later (Fluent, EmojiOne) are read only when named."""
    from dprdm.generation.training import load_public

    root = tmp_path / "demo"
    (root / "data").mkdir(parents=True)
    for name, n in (("twemoji", 3), ("fluent", 5), ("openmoji_private", 4)):
        _tiny_folder(root / "data", n_per_style=n).rename(root / "data" / name)
    (root / "data" / "manifest.json").write_text(json.dumps({"splits": {
        "twemoji": {"path": "data/twemoji", "role": "public"},
        "fluent": {"path": "data/fluent", "role": "public"},
        "openmoji_private": {"path": "data/openmoji_private", "role": "private"}}}))
    assert len(load_public(root, 16).images) == 6  # Twemoji only (Noto absent here)
    assert len(load_public(root, 16, splits=["fluent", "twemoji"]).images) == 16
    assert len(load_public(root, 16, splits=["data/fluent"]).images) == 10  # or by folder
    with pytest.raises(InvalidParameterError, match="not a public split"):
        load_public(root, 16, splits=["openmoji_private"])
    with pytest.raises(InvalidParameterError, match="not a public split"):
        load_public(root, 16, splits=["emojione"])


def test_training_refuses_an_unbounded_run():
    with pytest.raises(InvalidParameterError):
        TrainConfig(stage="denoiser").resolved()


@pytest.mark.skipif(not (DEFAULT_DIR / "model_index.json").is_file(),
                    reason="demo generator weights not shipped yet")
def test_shipped_weights_load_and_generate():
    pipe = RetrievalDiffusionPipeline.from_pretrained(DEFAULT_DIR)
    c = np.random.default_rng(0).standard_normal((2, pipe.cond_dim)).astype(np.float32)
    images = pipe(c, guidance=3.0, steps=5, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, pipe.image_size, pipe.image_size, 3)
    assert images.dtype == np.uint8 and images.std() > 0


def test_cli_train_reports_bad_settings_cleanly(tmp_path):
    import typer
    from typer.testing import CliRunner

    from dprdm.cli.train import train

    app = typer.Typer()
    app.command()(train)
    runner = CliRunner()
    bad_stage = runner.invoke(app, ["--out", str(tmp_path), "--stage", "nope", "--steps", "1"])
    assert bad_stage.exit_code == 2
    unbounded = runner.invoke(app, ["--out", str(tmp_path), "--stage", "autoencoder"])
    assert unbounded.exit_code == 2
    no_autoencoder = runner.invoke(app, ["--out", str(tmp_path), "--data", str(tmp_path),
                                         "--steps", "1", "--json"])
    assert no_autoencoder.exit_code == 2
    assert json.loads(no_autoencoder.stdout.splitlines()[-1])["error"] == "invalid_parameter"
    bad_share = runner.invoke(app, ["--out", str(tmp_path), "--steps", "1",
                                    "--text-query-share", "1.5"])
    assert bad_share.exit_code == 2 and not any(tmp_path.iterdir())
    for flags, says in ((["--decoder-blocks", "3,3,2"], "--decoder-only run"),
                        (["--decoder-only", "--decoder-blocks", "3,x"], "comma-separated"),
                        (["--decoder-only"], "init_from")):
        refused = runner.invoke(app, ["--out", str(tmp_path), "--stage", "autoencoder",
                                      "--steps", "1", "--json", *flags])
        assert refused.exit_code == 2 and says in refused.stdout, refused.stdout
        assert not any(tmp_path.iterdir())
    for flags, says in ((["--decoder-pair-starts", "300,x"], "comma-separated"),
                        (["--init-from", "gen", "--decoder-pair-starts", "0"],
                         "decoder_pair_starts"),
                        ([], "init_from")):
        refused = runner.invoke(app, ["--out", str(tmp_path), "--stage", "decoder",
                                      "--steps", "1", "--json", *flags])
        assert refused.exit_code == 2 and says in refused.stdout, refused.stdout
        assert not any(tmp_path.iterdir())


def test_cli_train_passes_the_loss_settings_and_refuses_negative_ones(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import dprdm.generation.training as training
    from dprdm.cli.train import train

    seen = []
    monkeypatch.setattr(training, "train_denoiser", lambda config: seen.append(config) or {})
    app = typer.Typer()
    app.command()(train)
    runner = CliRunner()
    cases = (([], (5.0, 0.0, 0.0)), (["--min-snr-gamma", "0"], (0.0, 0.0, 0.0)),
             (["--min-snr-gamma", "20", "--input-perturbation", "0.1",
               "--pixel-loss-weight", "4"], (20.0, 0.1, 4.0)))
    for flags, wanted in cases:
        result = runner.invoke(app, ["--out", str(tmp_path / "out"), "--steps", "1", *flags])
        assert result.exit_code == 0, result.output
        config = seen[-1]
        assert (config.min_snr_gamma, config.input_perturbation,
                config.pixel_loss_weight) == wanted
    for flag in ("--min-snr-gamma", "--input-perturbation", "--pixel-loss-weight"):
        refused = runner.invoke(app, ["--out", str(tmp_path / "refused"), "--steps", "1",
                                      flag, "-1"])
        assert refused.exit_code == 2 and not (tmp_path / "refused").exists()
    assert len(seen) == len(cases)
    result = runner.invoke(app, ["--out", str(tmp_path / "out"), "--steps", "1",
                                 "--condition-tokens", "4"])
    assert result.exit_code == 0 and seen[-1].extra == {"denoiser": {"condition_tokens": 4}}
    assert seen[0].extra == {}  # no tokens unless asked
    for flags in (["--condition-tokens", "-1"], ["--stage", "autoencoder", "--condition-tokens",
                                                  "4"]):
        refused = runner.invoke(app, ["--out", str(tmp_path / "refused"), "--steps", "1",
                                      *flags])
        assert refused.exit_code == 2 and not (tmp_path / "refused").exists(), refused.output
    for name in ("input_perturbation", "pixel_loss_weight"):  # the library refuses them too
        with pytest.raises(InvalidParameterError, match=name):
            TrainConfig(steps=1, **{name: float("nan")}).resolved()


def test_decoded_x0_l1_is_zero_for_the_true_v_grows_with_error_and_trains_only_the_denoiser():
    from dprdm.generation.training import decoded_x0_l1

    torch.manual_seed(0)
    autoencoder = Autoencoder(**TINY_AE).eval().requires_grad_(False)
    alphas = default_scheduler().alphas_cumprod.float()
    z0, noise = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    t = torch.tensor([10, 100, 300, 500, 700, 900, 950, 999])
    a, s = alphas[t].sqrt()[:, None, None, None], (1 - alphas[t]).sqrt()[:, None, None, None]
    zt = a * z0 + s * noise
    true_v = a * noise - s * z0
    assert decoded_x0_l1(autoencoder, alphas, zt, true_v, z0, t).item() < 1e-5
    assert decoded_x0_l1(autoencoder, alphas, zt, noise, z0, t,
                         v_prediction=False).item() < 1e-5  # epsilon prediction
    small = decoded_x0_l1(autoencoder, alphas, zt, true_v + 0.1, z0, t)
    large = decoded_x0_l1(autoencoder, alphas, zt, true_v + 1.0, z0, t)
    assert 0 < small.item() < large.item()
    pred = (true_v + torch.randn_like(true_v)).requires_grad_(True)
    decoded_x0_l1(autoencoder, alphas, zt, pred, z0, t).backward()
    assert pred.grad[:2].abs().sum() > 0  # the batch's first quarter (2 of 8 rows) ...
    assert pred.grad[2:].abs().sum() == 0  # ... and only it
    assert all(p.grad is None for p in autoencoder.parameters())  # the decoder stays frozen


def test_input_perturbation_and_pixel_loss_change_what_a_training_step_learns(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr("dprdm.generation.training.style_augmentations", lambda: {})
    data = _tiny_folder(tmp_path)
    common = dict(data=str(data), data_is_public=True, batch_size=8, warmup_steps=1,
                  log_every=1)
    first = tmp_path / "base"
    train_autoencoder(TrainConfig(stage="autoencoder", steps=1, out=str(first),
                                  extra={"autoencoder": TINY_AE}, **common))
    trained = {}
    for name, settings in (("base", {}), ("perturbed", {"input_perturbation": 0.1}),
                           ("pixel", {"pixel_loss_weight": 4.0})):
        out = tmp_path / name
        if name != "base":
            out.mkdir()
            (out / "autoencoder").symlink_to(first / "autoencoder")
        train_denoiser(TrainConfig(stage="denoiser", steps=1, out=str(out), encoder="stand-in",
                                   k_choices=(1, 2), neighbours=2,
                                   extra={"denoiser": TINY_DENOISER}, **common, **settings))
        trained[name] = torch.load(out / "denoiser.state.pt", weights_only=False)["model"]
        logged = json.loads((out / "denoiser.log.jsonl").read_text().splitlines()[-1])
        assert ("pixel" in logged) == (name == "pixel")
        assert np.isfinite(logged["loss"]) and np.isfinite(logged.get("pixel", 0.0))
    for name in ("perturbed", "pixel"):  # same seed, same batch: only the loss differs
        assert not torch.equal(trained[name]["conv_out.weight"],
                               trained["base"]["conv_out.weight"])


def test_learning_rate_warms_up_then_decays_linearly_to_zero_from_decay_start():
    from dprdm.generation.training import TrainConfig, learning_rate

    config = TrainConfig(steps=1000, lr=1e-3, warmup_steps=100, decay_start=600).resolved()
    assert learning_rate(config, 0) == pytest.approx(1e-5)
    assert learning_rate(config, 99) == pytest.approx(1e-3)
    assert learning_rate(config, 599) == pytest.approx(1e-3)
    assert learning_rate(config, 800) == pytest.approx(0.5e-3)
    assert learning_rate(config, 1000) == 0.0
    constant = TrainConfig(steps=1000, lr=1e-3, warmup_steps=100).resolved()
    assert learning_rate(constant, 999) == pytest.approx(1e-3)
    with pytest.raises(InvalidParameterError):
        TrainConfig(steps=1000, decay_start=1000).resolved()


def test_family_mode_sources_splits_and_fine_tuning(tmp_path):
    """Family mode: the public styles as they are + one source per procedural recipe; named
    splits must be public; --init-from starts a stage from a pipeline's weights."""
    from dprdm.generation.training import family_sources, load_public

    root = tmp_path / "demo"
    (root / "data").mkdir(parents=True)
    _tiny_folder(root / "data").rename(root / "data" / "twemoji")
    _tiny_folder(root / "data").rename(root / "data" / "openmoji_private")
    (root / "data" / "manifest.json").write_text(json.dumps({"splits": {
        "twemoji": {"path": "data/twemoji", "role": "public"},
        "openmoji_private": {"path": "data/openmoji_private", "role": "private"}}}))
    with pytest.raises(InvalidParameterError, match="not a public split"):
        load_public(root, 16, splits=("data/openmoji_private",))

    common = dict(data=str(root), out=str(tmp_path / "run"), batch_size=4, warmup_steps=1,
                  public_splits=("data/twemoji",), family_size=3, family_images_per_source=6,
                  k_choices=(1, 2), neighbours=2)
    config = TrainConfig(stage="denoiser", steps=1, encoder="stand-in",
                         extra={"denoiser": TINY_DENOISER}, **common).resolved()
    pixels, captions, sources = family_sources(config)
    assert pixels.shape == (20 + 3 * 6, 32, 32, 3) and len(captions) == len(sources) == 38
    assert set(sources) == {"red", "blue", "blue+recipe0", "red+recipe1", "blue+recipe2"}
    assert not np.array_equal(pixels[20:26], pixels[:6])  # restyled

    train_autoencoder(TrainConfig(stage="autoencoder", steps=1,
                                  extra={"autoencoder": TINY_AE}, **common))
    train_denoiser(config)
    first = RetrievalDiffusionPipeline.from_pretrained(tmp_path / "run")
    tuned = TrainConfig(stage="denoiser", steps=1, encoder="stand-in", lr=1e-12,
                        init_from=str(tmp_path / "run"), random_neighbour_share=0.5,
                        text_only_share=0.5,
                        extra={"denoiser": TINY_DENOISER},
                        **{**common, "out": str(tmp_path / "tuned")})
    train_autoencoder(TrainConfig(stage="autoencoder", steps=1, init_from=str(tmp_path / "run"),
                                  lr=1e-12, extra={"autoencoder": TINY_AE},
                                  **{**common, "out": str(tmp_path / "tuned")}))
    index = tmp_path / "run" / "model_index.json"  # settings chosen for the first generator
    index.write_text(json.dumps({**json.loads(index.read_text()), "content_guidance": 4.5,
                                 "public_lam": 0.3}))
    train_denoiser(tuned)
    saved = json.loads((tmp_path / "tuned" / "denoiser.train.json").read_text())
    assert saved["random_neighbour_share"] == 0.5  # the run's recipe is kept beside it
    assert saved["text_only_share"] == 0.5
    second = RetrievalDiffusionPipeline.from_pretrained(tmp_path / "tuned")
    assert first.config.content_guidance is None and first.config.public_lam is None
    # a fine-tuned generator keeps what was chosen for the one it started from
    assert (second.config.content_guidance, second.config.public_lam) == (4.5, 0.3)
    for name, value in first.denoiser.state_dict().items():  # started from the same weights
        torch.testing.assert_close(second.denoiser.state_dict()[name], value, atol=1e-6, rtol=0)
    with pytest.raises(InvalidParameterError, match="init-from"):
        train_denoiser(TrainConfig(stage="denoiser", steps=1, encoder="stand-in",
                                   init_from=str(tmp_path / "nowhere"),
                                   extra={"denoiser": TINY_DENOISER}, **common))


def test_recorded_generation_settings_are_read_or_refused_cleanly(tmp_path):
    from dprdm.generation.training import recorded_generation_settings

    assert recorded_generation_settings("") == {}
    assert recorded_generation_settings(str(tmp_path)) == {}  # no model index: nothing recorded
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"content_guidance": 0.0, "public_lam": None}))
    assert recorded_generation_settings(str(tmp_path)) == {"content_guidance": 0.0}
    for text, says in (("{", "not valid JSON"), ("[1]", "model index")):
        index.write_text(text)
        with pytest.raises(InvalidParameterError, match=says):
            recorded_generation_settings(str(tmp_path))


def test_decoder_only_training_keeps_the_encoder_and_its_latent_scale(tmp_path, monkeypatch):
    """A decoder-only run changes the decoder alone: the encoder's weights and the scaling factor
    (the latent space a denoiser was trained on) stay bit for bit."""
    monkeypatch.setattr("dprdm.generation.training.style_augmentations", lambda: {})
    data = _tiny_folder(tmp_path)
    torch.manual_seed(0)
    before = Autoencoder(**TINY_AE, scaling_factor=0.37)
    before.save_pretrained(tmp_path / "old" / "autoencoder")
    common = dict(stage="autoencoder", data=str(data), data_is_public=True, batch_size=4,
                  warmup_steps=1, log_every=1, lr=1e-2)
    train_autoencoder(TrainConfig(out=str(tmp_path / "new"), steps=3, decoder_only=True,
                                  init_from=str(tmp_path / "old"), **common))
    after = Autoencoder.from_pretrained(tmp_path / "new" / "autoencoder", low_cpu_mem_usage=False)
    assert after.config.scaling_factor == 0.37
    old, new = before.state_dict(), after.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith("encoder."))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))
    with pytest.raises(InvalidParameterError, match="decoder_only"):  # nothing to keep
        TrainConfig(out=str(tmp_path / "x"), steps=1, decoder_only=True, **common).resolved()
    with pytest.raises(InvalidParameterError, match="only --decoder-blocks may change"):
        train_autoencoder(TrainConfig(out=str(tmp_path / "y"), steps=1, decoder_only=True,
                                      init_from=str(tmp_path / "old"),
                                      extra={"autoencoder": {"latent_channels": 8}}, **common))
    assert not (tmp_path / "y" / "autoencoder").exists()


def test_a_deeper_decoder_starts_as_the_old_one(tmp_path):
    from dprdm.generation.training import load_autoencoder_to_keep

    torch.manual_seed(0)
    old = Autoencoder(**TINY_AE, scaling_factor=0.37)
    old.save_pretrained(tmp_path / "old" / "autoencoder")
    config = TrainConfig(stage="autoencoder", steps=1, init_from=str(tmp_path / "old"),
                         decoder_only=True, extra={"autoencoder": {"decoder_blocks": (3, 1, 2)}})
    deeper = load_autoencoder_to_keep(config)
    assert tuple(deeper.config.decoder_blocks) == (3, 1, 2)
    assert deeper.config.scaling_factor == 0.37
    assert sum(p.numel() for p in deeper.decoder.parameters()) > sum(
        p.numel() for p in old.decoder.parameters())
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(deeper.decode(deeper.encode(x)[0]), old.decode(old.encode(x)[0]))
    for bad in ({"decoder_blocks": (0, 1, 1)}, {"decoder_blocks": (2, 2)},
                {"latent_channels": 8}):
        config.extra = {"autoencoder": bad}
        with pytest.raises(InvalidParameterError, match="decoder"):
            load_autoencoder_to_keep(config)


def test_a_wider_latent_starts_as_the_narrower_autoencoder(tmp_path):
    from dprdm.generation.training import initialise_from

    torch.manual_seed(0)
    narrow = Autoencoder(**TINY_AE)
    narrow.save_pretrained(tmp_path / "run" / "autoencoder")
    wide = Autoencoder(**{**TINY_AE, "latent_channels": 8})
    initialise_from(wide, TrainConfig(stage="autoencoder", steps=1,
                                      init_from=str(tmp_path / "run")), "autoencoder")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean_n, logvar_n = narrow.encode(x)
        mean_w, logvar_w = wide.encode(x)
        torch.testing.assert_close(mean_w[:, :4], mean_n)
        torch.testing.assert_close(logvar_w[:, :4], logvar_n)
        torch.testing.assert_close(wide.decode(mean_w), narrow.decode(mean_n))
    narrower = Autoencoder(**{**TINY_AE, "latent_channels": 2})
    with pytest.raises(InvalidParameterError, match="wider"):
        initialise_from(narrower, TrainConfig(stage="autoencoder", steps=1,
                                              init_from=str(tmp_path / "run")), "autoencoder")


def _saved_plain_denoiser(run) -> LatentDenoiser:
    """A tiny denoiser (perturbed: its zero-initialised layers would hide differences), saved as
    the `run` folder's denoiser/ part for --init-from."""
    torch.manual_seed(0)
    denoiser = LatentDenoiser(cond_dim=12, **TINY_DENOISER)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    denoiser.save_pretrained(run / "denoiser")
    return denoiser


def test_a_denoiser_widened_to_a_wider_latent_predicts_the_old_channels_as_before(tmp_path):
    from dprdm.generation.training import initialise_from

    narrow = _saved_plain_denoiser(tmp_path / "run")
    wide = LatentDenoiser(cond_dim=12, latent_channels=8, **TINY_DENOISER)
    initialise_from(wide, TrainConfig(stage="denoiser", steps=1,
                                      init_from=str(tmp_path / "run")), "denoiser")
    z4 = torch.randn(2, 4, 8, 8)
    z8 = torch.cat([z4, torch.randn(2, 4, 8, 8)], dim=1)  # the new channels are not read
    c, t = torch.randn(2, 12), torch.tensor([10, 500])
    with torch.no_grad():
        old, new = narrow(z4, t, c), wide(z8, t, c)
    torch.testing.assert_close(new[:, :4], old)
    assert torch.count_nonzero(new[:, 4:]) == 0


def test_condition_tokens_start_at_zero_from_an_old_denoiser_then_read_each_pixels_share(
        tmp_path):
    from dprdm.generation.training import initialise_from

    old = _saved_plain_denoiser(tmp_path / "run")
    new = LatentDenoiser(cond_dim=12, condition_tokens=3, **TINY_DENOISER)
    config = TrainConfig(stage="denoiser", steps=1, init_from=str(tmp_path / "run"))
    initialise_from(new, config, "denoiser")
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    c, other = torch.randn(2, 12), torch.randn(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(new(z, t, c), old(z, t, c))  # the identity at init
        for name, p in new.named_parameters():  # now let the cross-attention speak
            if name.startswith("cross.") and ".out." in name:
                p.add_(0.2 * torch.randn_like(p))
        moved = new(z, t, c)
        assert not torch.allclose(moved, old(z, t, c), atol=1e-4)
        assert not torch.allclose(moved, new(z, t, other), atol=1e-4)
        torch.testing.assert_close(new(z[:1], t[:1], c[:1]), moved[:1])  # rows do not mix
    new.save_pretrained(tmp_path / "tokens" / "denoiser")
    again = LatentDenoiser.from_pretrained(tmp_path / "tokens" / "denoiser")
    assert again.config.condition_tokens == 3
    with torch.no_grad():
        torch.testing.assert_close(again(z, t, c), moved)
    # a token denoiser does not go back into a plain one: that is another architecture
    with pytest.raises(InvalidParameterError, match="another architecture"):
        initialise_from(LatentDenoiser(cond_dim=12, **TINY_DENOISER),
                        TrainConfig(stage="denoiser", steps=1,
                                    init_from=str(tmp_path / "tokens")), "denoiser")


def _perturbed(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised FiLM and residual layers make conditions equal
        for name, p in model.named_parameters():
            if name.startswith("decoder.") and (".film." in name or ".conv2." in name):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def test_a_conditioned_decoder_starts_as_the_old_one_and_then_reads_its_condition(tmp_path):
    from dprdm.generation.training import conditioned_decoder_from

    torch.manual_seed(0)
    old = Autoencoder(**TINY_AE, scaling_factor=0.37)
    new = conditioned_decoder_from(old, 12)
    assert new.conditioned and not old.conditioned and new.config.scaling_factor == 0.37
    z = torch.randn(3, 4, 8, 8)
    c = torch.from_numpy(conditions(3))
    with torch.no_grad():
        torch.testing.assert_close(new.decode(z), old.decode(z))
        torch.testing.assert_close(new.decode(z, c), old.decode(z))
        torch.testing.assert_close(old.decode(z, c), old.decode(z))  # ignored when unconditioned
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(new.encode(x), old.encode(x))  # the same latent space
        _perturbed(new)
        reads = new.decode(z, c)
        assert not torch.allclose(reads, new.decode(z, c.flip(0)))
        torch.testing.assert_close(new.decode(z, 5 * c), reads)  # only the direction counts
        drop = torch.tensor([True, False, True])
        dropped = new.decode(z, c, drop=drop)
        torch.testing.assert_close(dropped[drop], new.decode(z)[drop])  # no condition = null
        torch.testing.assert_close(dropped[~drop], reads[~drop])
    new.save_pretrained(tmp_path / "ae")
    again = Autoencoder.from_pretrained(tmp_path / "ae", low_cpu_mem_usage=False)
    assert again.config.condition_dim == 12
    with torch.no_grad():
        torch.testing.assert_close(again.decode(z, c), reads)


def test_the_pipeline_hands_its_condition_to_a_conditioned_decoder():
    from dprdm.generation.training import conditioned_decoder_from

    plain = tiny_pipeline()
    c1, c2 = conditions(2, seed=1), conditions(2, seed=2)

    def draw(pipe, c):  # guidance 0: the unconditional denoiser, the same latents for any c
        return pipe(c, guidance=0.0, steps=3, generator=torch.Generator().manual_seed(0))

    assert np.array_equal(draw(plain, c1), draw(plain, c2))
    conditioned = RetrievalDiffusionPipeline(
        _perturbed(conditioned_decoder_from(plain.autoencoder, 12)), plain.denoiser,
        plain.scheduler)
    assert not np.array_equal(draw(conditioned, c1), draw(conditioned, c2))
    with pytest.raises(InvalidParameterError, match="condition_dim"):
        RetrievalDiffusionPipeline(conditioned_decoder_from(plain.autoencoder, 8), plain.denoiser,
                                   plain.scheduler)


def test_the_decoder_stage_trains_the_decoder_alone_on_the_denoisers_drawings(tmp_path,
                                                                             monkeypatch):
    from dprdm.generation.training import DecoderPairs, train_conditioned_decoder

    monkeypatch.setattr("dprdm.generation.training.style_augmentations", lambda: {})
    data = _tiny_folder(tmp_path)
    gen_dir, out = tmp_path / "gen", tmp_path / "dec"
    common = dict(data=str(data), data_is_public=True, batch_size=4, warmup_steps=1,
                  log_every=1, encoder="stand-in", k_choices=(1, 2), neighbours=2)
    train_autoencoder(TrainConfig(stage="autoencoder", steps=1, out=str(gen_dir),
                                  extra={"autoencoder": TINY_AE}, **common))
    train_denoiser(TrainConfig(stage="denoiser", steps=1, out=str(gen_dir),
                               extra={"denoiser": TINY_DENOISER}, **common))
    before = RetrievalDiffusionPipeline.from_pretrained(gen_dir)
    with pytest.raises(InvalidParameterError, match="init_from"):
        TrainConfig(stage="decoder", steps=1, out=str(out), **common).resolved()
    with pytest.raises(InvalidParameterError, match="decoder_pairs"):
        TrainConfig(stage="decoder", steps=1, init_from=str(gen_dir), decoder_pairs=0).resolved()
    for starts in ((), (0,), (1000,)):
        with pytest.raises(InvalidParameterError, match="decoder_pair_starts"):
            TrainConfig(stage="decoder", steps=1, init_from=str(gen_dir),
                        decoder_pair_starts=starts).resolved()
    config = TrainConfig(stage="decoder", steps=2, out=str(out), init_from=str(gen_dir),
                         decoder_pairs=6, decoder_pair_starts=(150, 700), **common)
    assert train_conditioned_decoder(config)["steps"] == 2
    pairs = DecoderPairs(**torch.load(out / "cache" / "decoder-pairs.pt", weights_only=False))
    assert pairs.latents.shape == (6, 4, 8, 8) and pairs.conditions.shape == (6, 64)
    assert set(pairs.t.tolist()) == {150}  # one batch of drawings, from the first start
    after = RetrievalDiffusionPipeline.from_pretrained(out)
    assert after.autoencoder.conditioned and after.autoencoder.config.condition_dim == 64
    old_state, new_state = before.autoencoder.state_dict(), after.autoencoder.state_dict()
    for name, value in before.denoiser.state_dict().items():  # the denoiser is kept
        assert torch.equal(after.denoiser.state_dict()[name], value)
    for name, value in old_state.items():
        if name.startswith("encoder."):  # the encoder, and so the latent, is kept
            assert torch.equal(new_state[name], value)
    assert any(not torch.equal(new_state[name], old_state[name]) for name in old_state
               if name.startswith("decoder."))
    assert after.autoencoder.config.scaling_factor == before.autoencoder.config.scaling_factor
    logged = json.loads((out / "decoder.log.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(logged["l1"]) and np.isfinite(logged["edge"])
    images = after(conditions(2, 64), steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 32, 32, 3)
    config.steps, config.resume = 3, True  # resumes, and reuses the cached drawings
    assert train_conditioned_decoder(config)["steps_this_run"] == 1
    # a recorded content guidance of 0 is used as 0 (the prompt's branch off), not as "none"
    from dprdm.generation.training import sample_decoder_pairs

    bank = ConditionBank.load(out / "cache" / "denoiser.pt")
    drawn = {}
    for recorded in (None, 0.0):
        before.register_to_config(content_guidance=recorded)
        one = TrainConfig(stage="decoder", steps=1, out=str(tmp_path / f"cg{recorded}"),
                          init_from=str(gen_dir), decoder_pairs=4, **common).resolved()
        drawn[recorded] = sample_decoder_pairs(one, before, bank).latents
    assert not torch.allclose(drawn[None], drawn[0.0])
    again = TrainConfig(stage="decoder", steps=1, out=str(tmp_path / "twice"),
                        init_from=str(out), **common)
    with pytest.raises(InvalidParameterError, match="conditioned already"):
        train_conditioned_decoder(again)
