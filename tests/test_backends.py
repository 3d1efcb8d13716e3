"""Generator backends on tiny random weights (CPU, local folders only, no network).

For every backend: the folders are written with save_pretrained and loaded through dprdm's own
loader; a private index is embedded with the backend's image tower; the composition charges one
query per prompt; a hook on the UNet / pipeline call sees exactly to_model_scale(lam*r + (1-lam)*x);
a different release gives different images; an index from another tower is refused with nothing
charged; no socket is opened.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_backends as tb  # noqa: E402
from tiny_backends import one_torch_thread  # noqa: E402,F401  (autouse fixture)

from dprdm.conditioning import interpolate, pool_releases  # noqa: E402
from dprdm.errors import InvalidParameterError  # noqa: E402
from dprdm.generation.backends import (BackendLoadError, ConditioningSpace,  # noqa: E402
                                       RuntimeOptions, SpaceMismatchError, load_backend)
from dprdm.generation.backends.demo import DemoBackend  # noqa: E402
from dprdm.privacy import InMemoryLedger  # noqa: E402
from dprdm.rdm import MechanismSettings, RetrievalAugmentedGenerator  # noqa: E402
from dprdm.retrieval import build_index  # noqa: E402

NAMES = ("demo", "kandinsky-2.2", "stable-unclip", "ip-adapter")
PROMPTS = ["the cat", "an eon"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny-backends")
    clip = tb.clip_dir(root / "clip")
    decoder, prior = tb.kandinsky_dirs(root / "kandinsky")
    sd, adapter = tb.ip_adapter_dirs(root / "ip")
    return {"root": root, "clip": clip,
            "kandinsky-2.2": {"model": decoder, "prior": prior, "height": 32, "width": 32,
                              "prior_steps": 2},
            "stable-unclip": {"model": tb.unclip_dir(root / "unclip", clip), "encoder": clip,
                              "height": 32, "width": 32},
            "ip-adapter": {"model": sd, "adapter": adapter, "encoder": clip, "height": 32,
                           "width": 32}}


def load(name: str, folders: dict, options: RuntimeOptions | None = None):
    options = options or RuntimeOptions(device="cpu")
    if name == "demo":
        encoder, pipeline = tb.demo_parts(folders["clip"])
        return DemoBackend(encoder, pipeline.to(options.device), options)
    return load_backend(name, options, **folders[name])


_loaded: dict = {}


@pytest.fixture(params=NAMES)
def backend(request, folders):
    if request.param not in _loaded:
        _loaded[request.param] = load(request.param, folders)
    return _loaded[request.param]


@contextlib.contextmanager
def model_conditions(backend):
    """Record, for every pipeline call, the (B, d) positive conditions the model receives."""
    seen: list[np.ndarray] = []
    handles = []
    fresh = [True]  # only the first model call of each pipeline call is recorded
    call_pipeline = backend._call_pipeline

    def marked_call(kwargs):
        fresh[0] = True
        return call_pipeline(kwargs)
    backend._call_pipeline = marked_call

    def record(array: np.ndarray) -> None:
        if fresh[0]:
            seen.append(array)
            fresh[0] = False

    def positive_half(t: torch.Tensor) -> np.ndarray:
        t = t.detach().float().cpu().reshape(t.shape[0], -1)
        return t[t.shape[0] // 2:].numpy()  # guidance on: [negative; positive]

    if backend.name in ("kandinsky-2.2", "ip-adapter"):
        def hook(module, args, kwargs):
            embeds = kwargs["added_cond_kwargs"]["image_embeds"]
            record(positive_half(embeds[0] if isinstance(embeds, list) else embeds))
        handles.append(backend.pipeline.unet.register_forward_pre_hook(hook, with_kwargs=True))
    elif backend.name == "stable-unclip":
        original = backend.pipe.noise_image_embeddings

        def noise_image_embeddings(image_embeds, noise_level, **kwargs):
            record(image_embeds.detach().float().cpu().numpy())
            return original(image_embeds, noise_level, **kwargs)
        backend.pipe.noise_image_embeddings = noise_image_embeddings
    else:
        def hook(module, args, kwargs):
            cond = args[2] if len(args) > 2 else kwargs["cond"]
            record(cond.detach().float().cpu().numpy()[:cond.shape[0] // 2])
        handles.append(backend.pipeline.denoiser.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
        del backend._call_pipeline
        if backend.name == "stable-unclip":
            del backend.pipe.noise_image_embeddings


def private_index(backend, directory: Path, n: int = 12, seed: int = 0):
    images = np.random.default_rng(seed).integers(0, 256, (n, 40, 40, 3), dtype=np.uint8)
    embeddings = backend.embed_images(images, batch_size=5)
    assert embeddings.shape == (n, backend.dim) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    index = build_index(embeddings, directory)
    backend.space.save(directory)
    return index


def test_dp_generation_charges_one_query_per_prompt_and_the_model_sees_the_mix(backend, tmp_path):
    index = private_index(backend, tmp_path / "private")
    ledger = InMemoryLedger(epsilon=1e4, delta=1e-6)
    settings = MechanismSettings(sigma=0.5, q=0.5, k=3, lam=0.7)
    rag = RetrievalAugmentedGenerator(backend=backend, private_index=index, ledger=ledger,
                                      settings=settings)
    released = []
    release = rag.mechanism.release
    rag.mechanism.release = lambda x, caller="", receipts=None: released.append(
        release(x, caller, receipts)) or released[-1]
    with model_conditions(backend) as seen:
        result = rag.generate(PROMPTS, n=1, guidance=4.0, steps=2, seed=0)
    assert result.images.shape[:2] == (2, 1) and result.images.dtype == np.uint8
    assert ledger.summary().queries == 2 and result.report["ledger"]["queries_by_call"] == 2
    pooled, kept = pool_releases(released[0], 0.5)  # the default: the call's releases pooled
    assert result.report["pooling"] == {"releases": 2, "kept": round(kept, 4),
                                        "towards": "call mean"}
    expected = backend.to_model_scale(interpolate(pooled, backend.embed_prompts(PROMPTS), 0.7))
    assert seen, "the model was never called"
    np.testing.assert_allclose(np.concatenate(seen), expected, rtol=1e-5, atol=1e-5)
    if backend.name != "demo":  # raw CLIP scale from public statistics, not the unit sphere
        np.testing.assert_allclose(np.linalg.norm(np.concatenate(seen), axis=1), backend.raw_norm,
                                   rtol=1e-4)


def test_a_different_release_gives_different_images(backend):
    rng = np.random.default_rng(3)
    first, second = (rng.standard_normal((1, backend.dim)).astype(np.float32) for _ in range(2))
    kwargs = {"prompts": PROMPTS[:1], "n": 1, "guidance": 4.0, "steps": 2, "seed": 5}
    a, again, b = (backend.render(c, **kwargs) for c in (first, first, second))
    assert np.array_equal(a, again)  # same condition, same seed: same images
    assert not np.array_equal(a, b)


def test_an_index_from_another_tower_is_refused_with_nothing_charged(backend, tmp_path):
    index = private_index(backend, tmp_path / "private")
    ConditioningSpace("another tower", backend.dim, "0" * 64).save(tmp_path / "private")
    ledger = InMemoryLedger(epsilon=1e4, delta=1e-6)
    with pytest.raises(SpaceMismatchError, match="another image tower"):
        RetrievalAugmentedGenerator(backend=backend, private_index=index, ledger=ledger,
                                    settings=MechanismSettings(sigma=0.5, q=0.5, k=3))
    assert ledger.summary().queries == 0


def test_public_only_mode_needs_no_private_data(backend, tmp_path):
    public = private_index(backend, tmp_path / "public", seed=9)
    rag = RetrievalAugmentedGenerator(backend=backend, public_index=public,
                                      settings=MechanismSettings(sigma=0.5, q=0.5, k=3, lam=0.5))
    with model_conditions(backend) as seen:
        result = rag.generate(PROMPTS[:1], n=2, guidance=4.0, steps=2, seed=1, public_only=True)
    assert result.images.shape[:2] == (1, 2) and "ledger" not in result.report
    assert len(seen[0]) == 2 and np.allclose(seen[0][0], seen[0][1])


def test_demo_split_guidance_takes_the_prompts_text_embeddings_as_content(folders):
    encoder, pipeline = tb.demo_parts(folders["clip"])
    backend = DemoBackend(encoder, pipeline, content_guidance=6.0)
    c = np.random.default_rng(4).standard_normal((2, backend.dim)).astype(np.float32)
    inputs = backend.model_inputs(c, PROMPTS, 3, 2.0, 2)
    np.testing.assert_array_equal(inputs["content_conditions"],
                                  np.repeat(backend.embed_prompts(PROMPTS), 3, axis=0))
    assert inputs["content_guidance"] == 6.0 and inputs["guidance"] == 2.0
    split = backend.render(c, PROMPTS, n=1, guidance=2.0, steps=2, seed=0)
    plain = DemoBackend(encoder, pipeline).render(c, PROMPTS, n=1, guidance=2.0, steps=2, seed=0)
    assert split.shape == plain.shape and not np.array_equal(split, plain)
    with pytest.raises(InvalidParameterError, match="one prompt per condition"):
        backend.render(c, None, n=1, guidance=2.0, steps=2, seed=0)


def test_demo_backend_takes_the_content_guidance_its_generator_records(folders):
    encoder, pipeline = tb.demo_parts(folders["clip"])
    c = np.random.default_rng(4).standard_normal((2, encoder.dim)).astype(np.float32)
    assert DemoBackend(encoder, pipeline).content_guidance is None  # records none: plain
    pipeline.register_to_config(content_guidance=6.0)
    backend = DemoBackend(encoder, pipeline)
    assert backend.content_guidance == 6.0
    assert backend.model_inputs(c, PROMPTS, 1, 2.0, 2)["content_guidance"] == 6.0
    assert DemoBackend(encoder, pipeline, content_guidance=4.0).content_guidance == 4.0
    assert backend.model_inputs(c, PROMPTS, 1, 2.0, 2, content_guidance=2.0)[
        "content_guidance"] == 2.0  # a caller's own wins
    recorded = backend.render(c, PROMPTS, n=1, guidance=2.0, steps=2, seed=0)
    given = DemoBackend(encoder, pipeline, content_guidance=6.0).render(
        c, PROMPTS, n=1, guidance=2.0, steps=2, seed=0)
    np.testing.assert_array_equal(recorded, given)


@pytest.mark.parametrize("name", NAMES[1:])
def test_loading_and_generating_open_no_socket(name, folders, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    backend = load(name, folders)
    index = private_index(backend, tmp_path / "private", n=6)
    ledger = InMemoryLedger(epsilon=1e4, delta=1e-6)
    rag = RetrievalAugmentedGenerator(backend=backend, private_index=index, ledger=ledger,
                                      settings=MechanismSettings(sigma=0.5, q=0.5, k=2))
    assert rag.generate(PROMPTS[:1], steps=1, seed=0).images.shape[:2] == (1, 1)


@pytest.mark.parametrize("name", NAMES[1:])
def test_a_missing_folder_names_the_layout_and_the_download_command(name, folders, tmp_path):
    given = dict(folders[name], model=tmp_path / "nowhere")
    with pytest.raises(BackendLoadError, match="huggingface-cli download .* --local-dir"):
        load_backend(name, RuntimeOptions(device="cpu"), **given)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendLoadError, match="missing model_index.json"):
        load_backend(name, RuntimeOptions(device="cpu"), **dict(given, model=tmp_path / "empty"))


def test_unclip_refuses_a_clip_that_is_not_its_image_tower(folders, tmp_path):
    other = tb.clip_dir(tmp_path / "other-clip", seed=1)
    with pytest.raises(BackendLoadError, match="not the unCLIP pipeline's image encoder"):
        load_backend("stable-unclip", RuntimeOptions(device="cpu"),
                     **dict(folders["stable-unclip"], encoder=other))


def test_the_fingerprint_ignores_storage_dtype_and_follows_the_weights(folders):
    from transformers import CLIPModel

    from dprdm.generation.backends.base import clip_vision_space

    model = CLIPModel.from_pretrained(folders["clip"], local_files_only=True)
    full = clip_vision_space(model)
    assert clip_vision_space(tb.vision_tower_of(folders["clip"])).fingerprint == full.fingerprint
    assert clip_vision_space(model.half()).fingerprint == full.fingerprint
    with torch.no_grad():
        model.float().visual_projection.weight[0, 0] += 1.0
    assert clip_vision_space(model).fingerprint != full.fingerprint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 variants need a CUDA GPU")
@pytest.mark.parametrize("name", NAMES[1:])
def test_cuda_float16(name, folders, tmp_path):
    backend = load(name, folders, RuntimeOptions(device="cuda"))
    assert backend.options.dtype == "float16"
    index = private_index(backend, tmp_path / "private")
    ledger = InMemoryLedger(epsilon=1e4, delta=1e-6)
    rag = RetrievalAugmentedGenerator(backend=backend, private_index=index, ledger=ledger,
                                      settings=MechanismSettings(sigma=0.5, q=0.5, k=3, lam=0.7))
    with model_conditions(backend) as seen:
        result = rag.generate(PROMPTS, guidance=4.0, steps=2, seed=0)
    assert result.images.shape[:2] == (2, 1) and ledger.summary().queries == 2
    assert np.isfinite(seen[0]).all()


def test_noise_ratio_grows_with_sqrt_dim_and_matches_sampled_noise():
    from dprdm.conditioning import noise_ratio

    small, large = noise_ratio(0.05, 10, 64), noise_ratio(0.05, 10, 1280)
    assert large["ratio"] == pytest.approx(small["ratio"] * np.sqrt(20))
    assert small["noise_multiplier"] == pytest.approx(0.25) and small["sensitivity"] == 0.2
    noise = np.random.default_rng(0).standard_normal((4000, 1280)) * 0.05
    assert np.linalg.norm(noise, axis=1).mean() == pytest.approx(large["noise_norm_mean"],
                                                                 rel=2e-3)
    aggregate = np.zeros(1280)
    aggregate[0] = 1.0
    cosines = (noise + aggregate)[:, 0] / np.linalg.norm(noise + aggregate, axis=1)
    assert cosines.mean() == pytest.approx(large["cosine_at_best"], rel=1e-2)
    with pytest.raises(Exception, match="dim"):
        noise_ratio(0.05, 10, 0)


def test_cli_noise_ratio_json():
    import json

    from typer.testing import CliRunner

    from dprdm.cli import app

    result = CliRunner().invoke(app, ["privacy", "noise-ratio", "--sigma", "0.1", "--k", "20",
                                      "--dim", "1024", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ratio"] == pytest.approx(0.1 * 32) and report["noise_multiplier"] == 1.0
    bad = CliRunner().invoke(app, ["privacy", "noise-ratio", "--sigma", "0.1", "--k", "0",
                                   "--dim", "1024", "--json"])
    assert bad.exit_code != 0
