"""The validation domain (EmojiOne held out) and its style judge, on tiny fixtures (no npm).

* ``dprdm eval --demo --validation`` builds the validation indexes and held-out set from a fake
  demo root, scores with the EmojiOne judge under its own labels, and rebuilds an index embedded
  with another image tower;
* the judge's training (``train_classifiers --target emojione``) for a few steps on synthetic
  images: what it writes, that it reloads, and that the family recipes reach its negatives.
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
EMOJIONE_LACKS = 3  # a held-out concept EmojiOne has no image of (as for post-Unicode-9 ones)
COLOURS = {"twemoji": (220, 60, 60), "google": (60, 160, 60), "fluent": (60, 60, 220),
           "emojione": (200, 160, 40), "openmoji": (120, 40, 160), "fluent3d": (40, 180, 200),
           "blob": (230, 120, 180)}


def _concept(i: int) -> str:
    return f"1F6{i:02X}"


def _fake_demo(root: Path, size: int = 64) -> None:
    """Every split of the emoji demo, a few drawn squares each, with a matching manifest."""
    rng = np.random.default_rng(0)
    splits = {}
    for name, (folder, style, role) in emoji.SPLITS.items():
        indices = {"holdout": range(HELD), "openmoji_private": range(HELD, len(CAPTIONS)),
                   "emojione": [i for i in range(len(CAPTIONS)) if i != EMOJIONE_LACKS]
                   }.get(name, range(len(CAPTIONS)))
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


def test_eval_validation_builds_the_domain_and_scores_with_the_emojione_judge(demo_root,
                                                                             tmp_path):
    from dprdm.cli import app
    from dprdm.privacy import SqliteLedger
    from dprdm.retrieval import EmbeddingIndex

    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", "--demo", "--validation", "--out", str(out),
                                      "--epsilons", "8", "--queries", "100", "--steps", "2",
                                      "--guidance", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["style_target"] == "EmojiOne" and "Validation domain" in data["domain"]
    assert "EmojiOne held out" in data["domain"] and "Twemoji + Noto + Fluent" in data["domain"]
    for run in data["runs"]:
        assert 0.0 <= run["emojione_like_strict"] <= 1.0 and np.isfinite(run["kid_strict"])
        assert not any(key.startswith("openmoji") for key in run), run.keys()
        assert "fid_style" not in run  # the judge has no non-strict counterpart
    assert "emojione_like_strict" in data["reference"]
    markdown = (out / "results.md").read_text()
    assert "EmojiOne-like (strict)" in markdown and "OpenMoji-like" not in markdown
    assert "Validation domain" in markdown
    with (out / "runs.csv").open() as f:
        header = next(csv.reader(f))
    assert "emojione_like_strict" in header and "openmoji_like_strict" not in header

    validation = demo_root / "validation"
    held = [json.loads(line) for line in (validation / "holdout" / "captions.jsonl").open()]
    # the held-out set: EmojiOne images of the OpenMoji held-out concepts that EmojiOne draws
    # (it stops at Unicode 9: the fake lacks one), copied as they are
    assert [r["concept"] for r in held] == [_concept(i) for i in range(HELD)
                                            if i != EMOJIONE_LACKS]
    assert {r["style"] for r in held} == {"emojione"}
    assert (validation / "holdout" / held[0]["file"]).read_bytes() == (
        demo_root / "data" / "emojione" / held[0]["file"]).read_bytes()
    private = EmbeddingIndex.open(validation / "private")
    assert {m["concept"] for m in private.metadata} == {_concept(i) for i in
                                                        range(HELD, len(CAPTIONS))}
    assert {m["style"] for m in private.metadata} == {"emojione"}
    public = EmbeddingIndex.open(validation / "public")
    # everything a generator may train on while EmojiOne is held out; no EmojiOne, no OpenMoji
    assert {m["style"] for m in public.metadata} == {"twemoji", "google", "fluent"}
    # the mechanism is pinned like the demo's own; eval never charged the index's ledger
    ledger = SqliteLedger(validation / "private")
    assert ledger.summary().queries == 0
    from dprdm.demo import DEMO_K, DEMO_LAM, DEMO_Q

    assert (ledger.mechanism.k, ledger.mechanism.q, ledger.lam) == (DEMO_K, DEMO_Q, DEMO_LAM)


def test_validation_indexes_are_reused_and_rebuilt_when_the_encoder_changes(demo_root):
    from dprdm.encoders import load_encoder
    from dprdm.generation.backends.demo import DemoBackend
    from dprdm.validation import prepare_validation

    class Pipeline:
        cond_dim = 64

    backend = DemoBackend(load_encoder("demo"), Pipeline())
    said: list[str] = []
    first = prepare_validation(backend, say=said.append)
    assert first["n_private"] == len(CAPTIONS) - HELD and first["n_holdout"] == HELD - 1
    assert first["n_public"] == 3 * len(CAPTIONS)
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
        old.setattr(validation, "VALIDATION_SPLIT", "google")
        old.setattr(validation, "VALIDATION_PUBLIC_SPLITS", ("twemoji", "fluent", "emojione"))
        validation.prepare_validation(backend, say=lambda line: None)
    said: list[str] = []
    built = validation.prepare_validation(backend, say=said.append)
    assert len(said) == 5, said  # held-out set written; both indexes deleted, then built
    assert any("private" in line and "google" in line and "new ledger" in line for line in said)
    assert any("public" in line and "emojione" in line for line in said)
    assert {m["style"] for m in EmbeddingIndex.open(Path(built["private"])).metadata} == {
        "emojione"}
    assert {m["style"] for m in EmbeddingIndex.open(Path(built["public"])).metadata} == {
        "twemoji", "google", "fluent"}
    held = [json.loads(line) for line in Path(built["holdout"], "captions.jsonl").open()]
    assert {r["style"] for r in held} == {"emojione"}


def test_validation_needs_the_demo_flag(demo_root, tmp_path):
    from dprdm.cli import app

    result = CliRunner().invoke(app, ["eval", "--validation", "--out", str(tmp_path / "r"),
                                      "--json"])
    assert result.exit_code == 2 and "--demo" in result.stdout
    assert not (demo_root / "validation").exists()


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


def test_a_tiny_judge_trains_saves_and_reloads(demo_root, tmp_path):
    from dprdm.evaluation.judge import JudgedClassifiers, StyleJudge
    from dprdm.evaluation.metrics import style_scores
    from dprdm.evaluation.train_classifiers import Settings, run

    out = tmp_path / "judge"
    record = run(Settings(data=str(demo_root), out=str(out), target="emojione", judge_steps=3,
                          batch_size=16, warmup_steps=1, family_size=5, log_every=1))
    assert record["target"] == "EmojiOne" and record["against"] == ["twemoji", "google",
                                                                    "fluent"]
    assert record["train"]["n_target"] == len(CAPTIONS) - HELD  # held-out concepts left out
    report = record["judge"]
    assert report["n_target"] == HELD - 1 and report["n_negatives"] == 3 * HELD
    for key in ("recall_target", "specificity_raw_all", "specificity_family",
                "specificity_augmented_all"):
        assert 0.0 <= report[key] <= 1.0
    assert set(report["specificity_per_augmentation"]) == {
        "outline", "flat", "thick_stroke", "line_art", "greyscale", "hue_shift", "soft"}
    assert sum(f.stat().st_size for f in out.iterdir()) < 2_000_000
    judge = StyleJudge.from_pretrained(out)
    assert judge.target == "EmojiOne" and json.loads((out / "training.json").read_text())["judge"]
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


def test_the_shipped_judge_and_the_validation_domain_agree():
    from dprdm.errors import InvalidParameterError
    from dprdm.evaluation.judge import StyleJudge
    from dprdm.evaluation.train_classifiers import JUDGE_TARGETS, Settings, run
    from dprdm.validation import VALIDATION_PUBLIC_SPLITS, VALIDATION_SPLIT, VALIDATION_STYLE

    # the judge `eval --validation` scores with recognises the held-out style and was trained
    # against exactly the public collections a generator may train on while it is held out
    judge = StyleJudge.from_pretrained()
    assert judge.target == VALIDATION_STYLE == "EmojiOne"
    assert [entry.split(" ")[0] for entry in judge.against] == list(VALIDATION_PUBLIC_SPLITS)
    assert JUDGE_TARGETS["emojione"] == (VALIDATION_SPLIT, VALIDATION_STYLE,
                                         VALIDATION_PUBLIC_SPLITS)
    # Noto is a training style now (every shipped network saw it): no judge of it
    with pytest.raises(InvalidParameterError, match="emojione"):
        run(Settings(target="noto"))
