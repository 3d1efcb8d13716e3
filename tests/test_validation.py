"""The validation domains (a public style held out) and their style judges, on tiny fixtures
(no npm).

* ``dprdm eval --demo --validation [--validation-domain NAME]`` builds the domain's indexes and
  held-out set from a fake demo root, scores with that domain's judge under its own labels, and
  rebuilds an index embedded with another image tower or holding another style;
* a judge's training (``train_classifiers --target NAME``) for a few steps on synthetic images:
  what it writes, that it reloads, and that the family recipes reach its negatives.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dprdm.data import emoji
from dprdm.data.style_family import StyleRecipe

CAPTIONS = ["grinning face", "red apple", "cat face", "house", "rocket", "sun", "red heart",
            "ghost", "dog face", "tree", "star", "moon", "car", "fish", "bird", "cake"]
HELD = 8  # the first HELD concepts are the OpenMoji held-out ones
# a held-out concept each style has no image of (as EmojiOne stops at Unicode 9)
LACKS = {"emojione": 3, "fluent_hc": 5}
COLOURS = {"twemoji": (220, 60, 60), "google": (60, 160, 60), "fluent": (60, 60, 220),
           "emojione": (200, 160, 40), "openmoji": (120, 40, 160), "fluent3d": (40, 180, 200),
           "blob": (230, 120, 180), "fluent_hc": (0, 0, 0)}


def _concept(i: int) -> str:
    return f"1F6{i:02X}"


def _fake_demo(root: Path, size: int = 64) -> None:
    """Every split of the emoji demo, a few drawn squares each, with a matching manifest."""
    rng = np.random.default_rng(0)
    splits = {}
    for name, (folder, style, role) in emoji.SPLITS.items():
        indices = {"holdout": range(HELD), "openmoji_private": range(HELD, len(CAPTIONS)),
                   **{lacking: [i for i in range(len(CAPTIONS)) if i != gap]
                      for lacking, gap in LACKS.items()}}.get(name, range(len(CAPTIONS)))
        (root / folder).mkdir(parents=True)
        rows = []
        for i in indices:
            pixels = np.full((size, size, 3), 255, np.uint8)
            x, y = rng.integers(4, size // 2, 2)
            pixels[y:y + size // 3, x:x + size // 3] = COLOURS[style.name]
            file = f"{_concept(i).lower()}.png"
            Image.fromarray(pixels).save(root / folder / file)
            rows.append({"file": file, "caption": CAPTIONS[i], "concept": _concept(i),
                         "category": "Objects", "style": style.name})
        (root / folder / "captions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
        splits[name] = {"path": folder, "style": style.name, "role": role, "count": len(rows),
                        "made_from": emoji.made_from(name, size, 0, emoji.HOLDOUT_FRACTION)}
    manifest = {"config": emoji._config(size, 0, emoji.HOLDOUT_FRACTION), "splits": splits}
    (root / emoji.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture()
def demo_root(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    _fake_demo(root)
    monkeypatch.setenv("DPRDM_DEMO_ROOT", str(root))

    def no_install(prefix, needed=None):
        raise AssertionError("the fake demo is complete: nothing to install")

    monkeypatch.setattr(emoji, "install_packages", no_install)
    return root


@pytest.mark.parametrize("name", ["fluent_hc", "emojione"])
def test_eval_validation_builds_the_domain_and_scores_with_its_judge(demo_root, tmp_path, name):
    from dprdm.cli import app
    from dprdm.privacy import SqliteLedger
    from dprdm.retrieval import EmbeddingIndex
    from dprdm.validation import DEFAULT_DOMAIN, DOMAINS

    domain = DOMAINS[name]
    out = tmp_path / "report"
    chosen = [] if name == DEFAULT_DOMAIN else ["--validation-domain", name]
    result = CliRunner().invoke(app, ["eval", "--demo", "--validation", *chosen, "--out",
                                      str(out), "--epsilons", "8", "--queries", "100",
                                      "--steps", "2", "--guidance", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    label = domain.title.lower().replace(" ", "_") + "_like_strict"  # emojione_like_strict
    assert data["style_target"] == domain.title and "Validation domain" in data["domain"]
    from dprdm.demo import DEMO_K, DEMO_NON_PRIVATE_K

    ks = {run["setting"]: run["k"] for run in data["runs"]}  # non-private: the demo's own k
    assert (ks["dp"], ks["non-private"]) == (DEMO_K, DEMO_NON_PRIVATE_K)
    assert f"{domain.title} held out" in data["domain"] and domain.public_titles in data["domain"]
    for run in data["runs"]:
        assert 0.0 <= run[label] <= 1.0 and np.isfinite(run["kid_strict"])
        assert not any(key.startswith("openmoji") for key in run), run.keys()
        assert "fid_style" not in run  # the judge has no non-strict counterpart
    assert label in data["reference"]
    markdown = (out / "results.md").read_text()
    assert f"{domain.title}-like (strict)" in markdown and "OpenMoji-like" not in markdown
    assert "Validation domain" in markdown
    with (out / "runs.csv").open() as f:
        header = next(csv.reader(f))
    assert label in header and "openmoji_like_strict" not in header

    validation = demo_root / "validation" / name
    held = [json.loads(line) for line in (validation / "holdout" / "captions.jsonl").open()]
    # the held-out set: the style's images of the OpenMoji held-out concepts that it draws
    # (the fake lacks one), copied as they are
    assert [r["concept"] for r in held] == [_concept(i) for i in range(HELD)
                                            if i != LACKS[name]]
    assert {r["style"] for r in held} == {name}
    assert (validation / "holdout" / held[0]["file"]).read_bytes() == (
        demo_root / "data" / name / held[0]["file"]).read_bytes()
    private = EmbeddingIndex.open(validation / "private")
    assert {m["concept"] for m in private.metadata} == {_concept(i) for i in
                                                        range(HELD, len(CAPTIONS))}
    assert {m["style"] for m in private.metadata} == {name}
    public = EmbeddingIndex.open(validation / "public")
    # everything a generator may train on while the style is held out; not it, no OpenMoji
    assert {m["style"] for m in public.metadata} == set(domain.public_splits)
    assert name not in domain.public_splits
    # the mechanism is pinned like the demo's own; eval never charged the index's ledger
    ledger = SqliteLedger(validation / "private")
    assert ledger.summary().queries == 0
    from dprdm.demo import DEMO_LAM, DEMO_Q

    assert (ledger.mechanism.k, ledger.mechanism.q, ledger.lam) == (DEMO_K, DEMO_Q, DEMO_LAM)
    others = [other for other in DOMAINS if other != name]
    assert not any((demo_root / "validation" / other).exists() for other in others)


def test_validation_indexes_are_reused_and_rebuilt_when_the_encoder_changes(demo_root):
    from dprdm.encoders import load_encoder
    from dprdm.generation.backends.demo import DemoBackend
    from dprdm.validation import prepare_validation

    class Pipeline:
        cond_dim = 64

    backend = DemoBackend(load_encoder("demo"), Pipeline())
    said: list[str] = []
    first = prepare_validation(backend, say=said.append)
    assert first["domain"] == "fluent_hc" and first["judge"].endswith("validation-judge-fluent-hc")
    assert first["n_private"] == len(CAPTIONS) - HELD and first["n_holdout"] == HELD - 1
    # six public collections, EmojiOne lacking one concept
    assert first["n_public"] == 6 * len(CAPTIONS) - 1
    assert len(said) == 3  # held-out set, private index, public index
    said.clear()
    prepare_validation(backend, say=said.append)
    assert said == []  # everything reused
    private = Path(first["private"])
    space = json.loads((private / "conditioning_space.json").read_text())
    space["fingerprint"] = "0" * 64  # as if embedded with another encoder
    (private / "conditioning_space.json").write_text(json.dumps(space))
    prepare_validation(backend, say=said.append)
    assert len(said) == 2 and "another image tower" in said[0] and "new ledger" in said[0]
    assert json.loads((private / "conditioning_space.json").read_text())["fingerprint"] == (
        backend.space.fingerprint)


def test_a_domain_built_for_another_held_out_style_is_rebuilt(demo_root, monkeypatch):
    from dprdm import validation
    from dprdm.encoders import load_encoder
    from dprdm.generation.backends.demo import DemoBackend
    from dprdm.retrieval import EmbeddingIndex

    class Pipeline:
        cond_dim = 64

    backend = DemoBackend(load_encoder("demo"), Pipeline())
    with monkeypatch.context() as old:  # the domain as it was built when Noto was held out
        old.setitem(validation.DOMAINS, "emojione", validation.ValidationDomain(
            "google", ("twemoji", "fluent", "fluent_hc"), "validation-judge"))
        validation.prepare_validation(backend, say=lambda line: None, domain="emojione")
    said: list[str] = []
    built = validation.prepare_validation(backend, say=said.append, domain="emojione")
    assert len(said) == 5, said  # held-out set written; both indexes deleted, then built
    assert any("private" in line and "google" in line and "new ledger" in line for line in said)
    assert any("public" in line and "fluent_hc" in line for line in said)
    assert {m["style"] for m in EmbeddingIndex.open(Path(built["private"])).metadata} == {
        "emojione"}
    assert {m["style"] for m in EmbeddingIndex.open(Path(built["public"])).metadata} == {
        "twemoji", "google", "fluent"}
    held = [json.loads(line) for line in Path(built["holdout"], "captions.jsonl").open()]
    assert {r["style"] for r in held} == {"emojione"}


def test_validation_needs_the_demo_flag_and_a_known_domain(demo_root, tmp_path):
    from dprdm.cli import app

    for args, said in ((["--validation"], "--demo"),
                       (["--demo", "--validation-domain", "emojione"], "--validation"),
                       (["--demo", "--validation", "--validation-domain", "noto"], "fluent_hc")):
        result = CliRunner().invoke(app, ["eval", *args, "--out", str(tmp_path / "r"),
                                          "--json"])
        assert result.exit_code == 2 and said in result.stdout, result.stdout
    assert not (demo_root / "validation").exists() and not (tmp_path / "r").exists()


def test_family_recipes_reach_the_judges_negatives():
    from dprdm.evaluation.train_classifiers import style_batches

    target = np.full((4, 16, 16, 3), 255, np.uint8)
    target[:, 4:12, 4:12] = (0, 200, 0)
    public = np.full((4, 16, 16, 3), 255, np.uint8)
    public[:, 4:12, 4:12] = (200, 0, 0)
    tinted = StyleRecipe(background=(200, 200, 255))
    batch = style_batches(target, public, None, recipes=[tinted], family_share=1.0)
    x, y = batch(20, np.random.default_rng(0), None)
    pixels = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round()
    negatives = y["openmoji"].numpy() == 0
    assert negatives.sum() == 10
    assert np.all(pixels[negatives, 0, 0] == (200, 200, 255))  # every negative in the recipe
    assert np.all(pixels[~negatives, 0, 0] == 255)  # the target's images as they are
    # without recipes the draws are the yardsticks' (same generator state -> same batch)
    plain = style_batches(target, public, None)(20, np.random.default_rng(0), None)[0]
    again = style_batches(target, public, None, recipes=(), family_share=0.5)(
        20, np.random.default_rng(0), None)[0]
    assert np.array_equal(plain.numpy(), again.numpy())


@pytest.mark.parametrize("name", ["fluent_hc", "emojione"])
def test_a_tiny_judge_trains_saves_and_reloads(demo_root, tmp_path, name):
    from dprdm.evaluation.judge import JudgedClassifiers, StyleJudge
    from dprdm.evaluation.metrics import style_scores
    from dprdm.evaluation.train_classifiers import Settings, run
    from dprdm.validation import DOMAINS

    domain = DOMAINS[name]
    out = tmp_path / "judge"
    record = run(Settings(data=str(demo_root), out=str(out), target=name, judge_steps=3,
                          batch_size=16, warmup_steps=1, family_size=5, log_every=1))
    assert record["target"] == domain.title and record["against"] == list(domain.public_splits)
    assert record["train"]["n_target"] == len(CAPTIONS) - HELD  # held-out concepts left out
    report = record["judge"]
    # every negative collection draws every held-out concept but EmojiOne (it lacks one)
    assert report["n_target"] == HELD - 1
    assert report["n_negatives"] == len(domain.public_splits) * HELD - (
        "emojione" in domain.public_splits)
    for key in ("recall_target", "specificity_raw_all", "specificity_family",
                "specificity_augmented_all"):
        assert 0.0 <= report[key] <= 1.0
    assert set(report["specificity_per_augmentation"]) == {
        "outline", "flat", "thick_stroke", "line_art", "greyscale", "hue_shift", "soft"}
    assert sum(f.stat().st_size for f in out.iterdir()) < 2_000_000
    judge = StyleJudge.from_pretrained(out)
    assert judge.target == domain.title and json.loads((out / "training.json").read_text())["judge"]
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    p = judge.probability(images)
    assert p.shape == (5,) and np.all((p > 0) & (p < 1))
    # the harness's view: the judge is the only style network, under its own name
    from dprdm.evaluation.classifiers import EvalClassifiers

    judged = JudgedClassifiers(EvalClassifiers.from_pretrained(), judge)
    scores = style_scores(images, judged)
    assert set(scores) >= {"openmoji_like_strict", "openmoji_probability_mean_strict"}
    assert "openmoji_like" not in scores
    assert scores["openmoji_probability_mean_strict"] == pytest.approx(float(p.mean()), abs=1e-6)
    assert judged.concepts == judged.base.concepts


def test_the_shipped_judges_and_the_validation_domains_agree():
    from dprdm.errors import InvalidParameterError
    from dprdm.evaluation.judge import VALIDATION_JUDGE_DIR, StyleJudge
    from dprdm.evaluation.train_classifiers import JUDGE_TARGETS, Settings, run
    from dprdm.validation import DEFAULT_DOMAIN, DOMAINS

    # the judge `eval --validation` scores with recognises the held-out style and was trained
    # against exactly the public collections a generator may train on while it is held out
    assert set(DOMAINS) == {"fluent_hc", "emojione"} and DEFAULT_DOMAIN == "fluent_hc"
    assert VALIDATION_JUDGE_DIR == DOMAINS[DEFAULT_DOMAIN].judge_dir
    for name, domain in DOMAINS.items():
        judge = StyleJudge.from_pretrained(domain.judge_dir)
        assert judge.target == domain.title
        assert [entry.split(" ")[0] for entry in judge.against] == list(domain.public_splits)
        assert JUDGE_TARGETS[name] == (domain.split, domain.title, domain.public_splits)
        assert domain.split not in domain.public_splits
    assert DOMAINS["emojione"].title == "EmojiOne"
    assert DOMAINS["fluent_hc"].title == "Fluent High Contrast"
    # Noto is a training style now (every shipped network saw it): no judge of it
    with pytest.raises(InvalidParameterError, match="emojione"):
        run(Settings(target="noto"))


def test_unjittered_share_shows_images_as_they_are_and_zero_keeps_the_old_draws():
    import torch

    from dprdm.evaluation.train_classifiers import Settings, jitter, train_network

    x = torch.linspace(-1, 1, 6 * 3 * 8 * 8).reshape(6, 3, 8, 8)
    seen: list[torch.Tensor] = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1, 1))

        def forward(self, inputs):
            seen.append(inputs.detach().clone())
            return {"target": inputs.mean(dim=(1, 2, 3))[:, None] * self.w}

    def batches(n, rng, generator):
        return x, {"target": torch.zeros(len(x))}

    def loss(out, targets):
        return out["target"].mean(), {"loss": 0.0}

    def shown(share):
        seen.clear()
        settings = Settings(batch_size=6, warmup_steps=1, log_every=1, unjittered_share=share)
        train_network(Recorder(), batches, loss, 1, settings, "test", seed=3)
        return seen[0]

    generator = torch.Generator().manual_seed(3)
    assert torch.equal(shown(0.0), jitter(x, generator))  # the yardsticks' draws, unchanged
    assert torch.equal(shown(1.0), x)  # every image as it is
    half = shown(0.5)
    as_is = torch.tensor([torch.equal(half[i], x[i]) for i in range(len(x))])
    assert 0 < int(as_is.sum()) < len(x)  # seed 3: some of each


def test_encoder_measures_of_a_held_out_validation_style(demo_root):
    from dprdm.encoders.evaluate import embedded, held_out_style

    class MeanColour:  # an "encoder" that sees colour only: each style is one point
        def encode_images(self, images, progress=False):
            x = images.reshape(len(images), -1, 3).mean(axis=1) + 1.0
            return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    held = {_concept(i) for i in range(HELD)}
    pool = embedded(MeanColour(), demo_root, {}, ["twemoji", "google"], held, False)
    target = embedded(MeanColour(), demo_root, {}, ["fluent_hc"], held, False)["fluent_hc"]
    knn, probe = held_out_style(pool, target, "fluent_hc", 0)
    # pool: 16 + 16 public images and the 8 Fluent High Contrast images of other concepts
    assert knn["pool"] == ["twemoji", "google", "fluent_hc"]
    assert knn["chance"] == pytest.approx(8 / 40)
    assert knn["fluent_hc_fraction_top10"] == pytest.approx(8 / 10)  # all 8 of its style, first
    assert set(probe) and all(0.0 <= v <= 1.0 for v in probe.values() if isinstance(v, float))
