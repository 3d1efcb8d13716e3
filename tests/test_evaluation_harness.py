"""`dprdm eval` end to end on a synthetic private index: settings, ledgers, report files, errors."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dprdm.cli import app
from dprdm.encoders import load_encoder
from dprdm.errors import InvalidParameterError
from dprdm.evaluation.harness import EvalPlan, plan_settings
from dprdm.privacy import MechanismParams, SqliteLedger, accounting, init_budget
from dprdm.retrieval import build_index

runner = CliRunner()
CAPTIONS = ["grinning face", "red apple", "cat face", "house", "rocket", "sun", "red heart",
            "ghost"]
FAST = ["--steps", "2", "--guidance", "1"]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("demo")


@pytest.fixture()
def private_index(tmp_path, encoder):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 32, 32, 3), dtype=np.uint8)
    build_index(encoder.encode_images(images), tmp_path / "private")
    init_budget(tmp_path / "private", 3.0, 1e-6, MechanismParams(sigma=0.5, q=0.5, k=4), lam=0.7)
    return tmp_path / "private"


@pytest.fixture()
def holdout(tmp_path):
    folder = tmp_path / "holdout"
    folder.mkdir()
    rng = np.random.default_rng(1)
    with (folder / "captions.jsonl").open("w") as f:
        for i, caption in enumerate(CAPTIONS):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                folder / f"{i}.png")
            f.write(json.dumps({"file": f"{i}.png", "caption": caption}) + "\n")
    return folder


def run_eval(*args):
    result = runner.invoke(app, ["eval", *args, "--json"])
    data = json.loads(result.stdout) if result.stdout.strip() else None
    return result, data


def test_eval_runs_every_setting_on_experiment_ledgers_and_writes_the_report(
        private_index, holdout, tmp_path):
    from dprdm.evaluation.classifiers import DEFAULT_DIR

    out = tmp_path / "report"
    # --classifiers: the emoji scores on data that is not the demo's, on request
    result, data = run_eval("--index", str(private_index), "--holdout", str(holdout),
                            "--out", str(out), "--epsilons", "8", "--queries", "3,100",
                            "--classifiers", str(DEFAULT_DIR), *FAST)
    assert result.exit_code == 0, result.output
    assert data["demo_metrics"] is True and "concept network" in data["feature_space"]
    runs = data["runs"]
    assert [r["setting"] for r in runs] == ["public-only", "dp", "dp", "non-private"]
    assert [(r["epsilon"], r["queries"]) for r in runs[1:3]] == [(8, 3), (8, 100)]
    for run in runs[1:3]:
        # sigma is calibrated from the index's mechanism (k, q) and its ledger's delta
        expected = accounting.calibrate_sigma(run["epsilon"], 0.5, 4, run["queries"], 1e-6)
        assert run["sigma"] == pytest.approx(expected)
        assert (run["k"], run["q"], run["lam"], run["delta"]) == (4, 0.5, 0.7, 1e-6)
        assert run["queries_charged"] == len(CAPTIONS)
        # 8 prompts at T=3 need 3 experiment ledgers, none of them past its budget
        assert run["experiment_ledgers"] == (3 if run["queries"] == 3 else 1)
        assert run["epsilon_spent_max"] <= run["epsilon"] * (1 + 1e-9)
        assert run["private"] is True
    assert runs[-1]["sigma"] == 0.0 and runs[-1]["q"] == 1.0 and runs[-1]["private"] is False
    # every other setting is compared with public-only by a paired bootstrap
    assert "kid_vs_public_only" not in runs[0]
    for run in runs[1:]:
        assert np.isfinite(run["kid_vs_public_only"]) and run["kid_vs_public_only_std"] >= 0
        assert 0.0 <= run["closer_than_public_only"] <= 1.0
    for run in runs:
        for key in ("fid", "fid_std", "kid", "kid_std", "precision", "recall", "density", "coverage",
                    "concept_top1", "concept_top10", "category_acc", "openmoji_like",
                    "alignment", "fid_style", "kid_style_std", "fid_strict", "kid_strict"):
            assert key in run and (run[key] is None or np.isfinite(run[key])), key
    # the production ledger of the index was never charged
    assert SqliteLedger(private_index).summary().queries == 0
    assert "not charged" in data["experiment_ledger"]
    # report files
    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == [r["setting"] for r in runs]
    assert float(rows[0]["kid_style"]) == pytest.approx(runs[0]["kid_style"])
    assert float(rows[-1]["kid_vs_public_only"]) == pytest.approx(runs[-1]["kid_vs_public_only"])
    markdown = (out / "results.md").read_text()
    assert "NOT private" in markdown and "leak" in markdown and "FID style" in markdown
    assert "KID - public-only x1e3 (paired)" in markdown
    with np.load(out / "images.npz") as saved:
        assert list(saved["prompts"]) == CAPTIONS
        assert saved["generated/DP eps=8 T=3"].shape == (len(CAPTIONS), 32, 32, 3)
    for name in ("fid_kid_vs_epsilon.png", "samples.png"):
        with Image.open(out / name) as image:
            assert image.width > 100 and image.height > 100


def test_eval_on_own_data_scores_in_the_encoder_space_without_emoji_metrics(
        private_index, holdout, tmp_path):
    out = tmp_path / "report"
    result, data = run_eval("--index", str(private_index), "--holdout", str(holdout),
                            "--out", str(out), "--epsilons", "8", "--queries", "100", *FAST)
    assert result.exit_code == 0, result.output
    assert data["demo_metrics"] is False
    assert "image tower" in data["feature_space"] and "CLIP space" in data["feature_space"]
    for run in data["runs"]:
        assert np.isfinite(run["fid"]) and np.isfinite(run["kid"]) and np.isfinite(run["alignment"])
        for key in ("concept_top10", "openmoji_like", "openmoji_like_strict", "fid_style",
                    "kid_strict"):
            assert key not in run, key
    assert set(data["reference"]) == {"setting", "alignment", "alignment_mismatched"}
    markdown = (out / "results.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| setting"))
    assert "OpenMoji-like" not in header and "FID style" not in header
    assert "top-10" not in header and "FID" in header and "align." in header
    assert "image tower" in markdown and "emoji demo only" in markdown
    assert "real private images" in markdown and "real private images" in data["report_warning"]
    # the report holds real private images: the owner's only
    assert (out.stat().st_mode & 0o777) == 0o700
    for name in data["files"].values():
        assert (Path(name).stat().st_mode & 0o777) == 0o600, name


def test_same_seed_gives_the_same_public_only_images(private_index, holdout, encoder):
    from dprdm.evaluation.classifiers import EvalClassifiers
    from dprdm.evaluation.harness import HeldOut, Setting, generate_setting
    from dprdm.generation import DEFAULT_DIR, RetrievalDiffusionPipeline
    from dprdm.retrieval import EmbeddingIndex

    del EvalClassifiers  # imported to make sure the package imports without the demo data
    pipe = RetrievalDiffusionPipeline.from_pretrained(DEFAULT_DIR)
    plan = EvalPlan(epsilons=(1.0,), queries=(10,), k=4, q=0.5, lam=0.5, steps=2, seed=3)
    index = EmbeddingIndex.open(private_index)
    prompts = CAPTIONS[:4]
    first, _ = generate_setting(Setting("public-only"), prompts, plan, encoder, pipe, index, None)
    second, _ = generate_setting(Setting("public-only"), prompts, plan, encoder, pipe, index, None)
    assert first.shape == (4, 32, 32, 3) and np.array_equal(first, second)
    assert HeldOut(first, prompts).captions == prompts


def test_repeats_generate_every_prompt_again_with_other_seeds_and_charge_every_release(
        private_index, holdout, tmp_path, encoder):
    from dprdm.evaluation.harness import Setting, generate_setting
    from dprdm.generation import DEFAULT_DIR, RetrievalDiffusionPipeline
    from dprdm.retrieval import EmbeddingIndex

    pipe = RetrievalDiffusionPipeline.from_pretrained(DEFAULT_DIR)
    index = EmbeddingIndex.open(private_index)
    prompts = CAPTIONS[:4]
    plans = [EvalPlan(k=4, q=0.5, lam=0.5, steps=2, seed=3, repeats=r) for r in (1, 2)]
    once, _ = generate_setting(Setting("public-only"), prompts, plans[0], encoder, pipe, index, None)
    twice, _ = generate_setting(Setting("public-only"), prompts, plans[1], encoder, pipe, index,
                                None)
    assert twice.shape == (8, 32, 32, 3)
    assert np.array_equal(twice[:4], once)  # repeat 0 keeps the seeds of a run without repeats
    assert all(not np.array_equal(twice[i], twice[4 + i]) for i in range(4))
    # through the CLI: every repeat of a DP image is a release of its own
    out = tmp_path / "report"
    result, data = run_eval("--index", str(private_index), "--holdout", str(holdout),
                            "--out", str(out), "--epsilons", "8", "--queries", "100",
                            "--repeats", "2", *FAST)
    assert result.exit_code == 0, result.output
    dp = data["runs"][1]
    assert dp["queries_charged"] == 2 * len(CAPTIONS) and dp["experiment_ledgers"] == 1
    assert dp["n_fake"] == 2 * len(CAPTIONS) and dp["n_real"] == len(CAPTIONS)
    assert np.isfinite(dp["kid_vs_public_only"])
    with np.load(out / "images.npz") as saved:
        assert saved["generated/DP eps=8 T=100"].shape == (2 * len(CAPTIONS), 32, 32, 3)
        assert saved["real"].shape == (len(CAPTIONS), 32, 32, 3)
    assert "2 images (repeats" in (out / "results.md").read_text()
    assert SqliteLedger(private_index).summary().queries == 0


def recording_pipeline(private_index):
    """The shipped demo pipeline, recording (conditions, keyword arguments) of every call, and
    the private index opened."""
    from dprdm.generation import DEFAULT_DIR, RetrievalDiffusionPipeline
    from dprdm.retrieval import EmbeddingIndex

    pipe = RetrievalDiffusionPipeline.from_pretrained(DEFAULT_DIR)
    calls: list[tuple[np.ndarray, dict]] = []

    class Recording(RetrievalDiffusionPipeline):
        def __call__(self, conditions, *args, **kwargs):
            calls.append((conditions, kwargs))
            return super().__call__(conditions, *args, **kwargs)

    pipe.__class__ = Recording
    return pipe, EmbeddingIndex.open(private_index), calls


def test_split_guidance_reaches_the_demo_pipeline_and_the_report(private_index, holdout,
                                                                 tmp_path, encoder):
    from dprdm.evaluation.harness import Setting, generate_setting

    pipe, index, calls = recording_pipeline(private_index)
    assert pipe.config.content_guidance == 6.0  # the shipped generator records its own
    pipe.register_to_config(content_guidance=None)  # one that records none: plain guidance
    prompts = CAPTIONS[:3]
    plain_plan = EvalPlan(k=4, q=0.5, lam=0.5, steps=2, seed=3, guidance=2.0)
    split_plan = EvalPlan(k=4, q=0.5, lam=0.5, steps=2, seed=3, guidance=2.0,
                          content_guidance=6.0)
    plain, _ = generate_setting(Setting("public-only"), prompts, plain_plan, encoder, pipe,
                                index, None)
    split, _ = generate_setting(Setting("public-only"), prompts, split_plan, encoder, pipe,
                                index, None)
    seen = [kwargs for _, kwargs in calls]  # what the pipeline was called with
    assert "content_conditions" not in seen[0] and seen[1]["content_guidance"] == 6.0
    np.testing.assert_allclose(seen[1]["content_conditions"], encoder.encode_text(prompts),
                               atol=1e-6)  # the prompts' own text embeddings
    assert not np.array_equal(plain, split)
    out = tmp_path / "report"
    result, data = run_eval("--index", str(private_index), "--holdout", str(holdout),
                            "--out", str(out), "--epsilons", "8", "--queries", "100",
                            "--content-guidance", "5", *FAST)
    assert result.exit_code == 0, result.output
    assert "(split: content guidance 5.0)" in (out / "results.md").read_text()
    default = tmp_path / "default"  # none given: the shipped generator's own, run and reported
    result, data = run_eval("--index", str(private_index), "--holdout", str(holdout),
                            "--out", str(default), "--epsilons", "8", "--queries", "100", *FAST)
    assert result.exit_code == 0, result.output
    assert "(split: content guidance 6.0)" in (default / "results.md").read_text()
    assert json.loads((default / "runs.json").read_text())["plan"]["content_guidance"] == 6.0
    assert SqliteLedger(private_index).summary().queries == 0
    for bad in (["--content-guidance", "-1"],
                ["--content-guidance", "2", "--generator", "kandinsky-2.2"]):
        result, data = run_eval("--index", str(private_index), "--holdout", str(holdout),
                                "--out", str(tmp_path / "refused"), *bad, *FAST)
        assert result.exit_code == 2 and "--content-guidance" in data["message"]
        assert not (tmp_path / "refused").exists()


def test_dp_releases_are_pooled_per_batch_unless_the_plan_says_not(private_index, holdout,
                                                                     tmp_path, encoder):
    from dprdm.evaluation.harness import Setting, generate_setting

    pipe, index, calls = recording_pipeline(private_index)
    setting = Setting("dp", 50.0, 100, sigma=0.5)  # noise far above these aggregates' spread

    def spread(plan: EvalPlan) -> float:
        calls.clear()
        generate_setting(setting, CAPTIONS, plan, encoder, pipe, index, None)
        ((conditions, _),) = calls
        conditions = np.asarray(conditions, dtype=np.float64)
        return float(np.sum((conditions - conditions.mean(axis=0)) ** 2))

    pooled = spread(EvalPlan(k=4, q=0.5, lam=1.0, steps=1, guidance=1.0))
    raw = spread(EvalPlan(k=4, q=0.5, lam=1.0, steps=1, guidance=1.0, pool=False))
    assert pooled < 0.25 * raw  # b < 0.5: most of each release's own noise averaged away
    out = tmp_path / "raw"
    result, _ = run_eval("--index", str(private_index), "--holdout", str(holdout),
                         "--out", str(out), "--epsilons", "8", "--queries", "100", "--no-pool",
                         *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "runs.json").read_text())["plan"]["pool"] is False
    assert "DP releases used as released" in (out / "results.md").read_text()


def test_one_prompt_calls_and_a_style_estimate_paid_from_each_experiment_ledger(
        private_index, holdout, tmp_path, encoder):
    from dprdm.evaluation.harness import Setting, generate_setting

    pipe, index, calls = recording_pipeline(private_index)
    setting = Setting("dp", 50.0, 100, sigma=0.5)
    operator = tuple(f"operator prompt {i}" for i in range(6))

    def run(plan: EvalPlan) -> tuple[float, dict]:
        calls.clear()
        _, info = generate_setting(setting, CAPTIONS, plan, encoder, pipe, index, None)
        ((conditions, _),) = calls  # still one render per batch of 32 prompts
        conditions = np.asarray(conditions, dtype=np.float64)
        return float(np.sum((conditions - conditions.mean(axis=0)) ** 2)), info

    base = dict(k=4, q=0.5, lam=1.0, steps=1, guidance=1.0, prompt_batch=1)
    one_by_one, info = run(EvalPlan(**base))  # nothing to pool with: as released
    assert info["queries_charged"] == len(CAPTIONS)
    shrunk, info = run(EvalPlan(**base, style_prompts=operator))
    assert shrunk < 0.25 * one_by_one  # each lone release mostly the estimate
    assert info["queries_charged"] == len(CAPTIONS) + len(operator)  # the estimate is paid for
    with pytest.raises(InvalidParameterError, match="style estimate"):
        EvalPlan(**base, style_prompts=operator, pool=False)
    with pytest.raises(InvalidParameterError, match="smallest T"):
        EvalPlan(**base, style_prompts=operator, queries=(6,))
    with pytest.raises(InvalidParameterError, match="prompt_batch"):
        EvalPlan(prompt_batch=0)
    prompts_file = tmp_path / "operator.txt"
    prompts_file.write_text("\n".join(operator) + "\n")
    out = tmp_path / "report"
    result, _ = run_eval("--index", str(private_index), "--holdout", str(holdout),
                         "--out", str(out), "--epsilons", "8", "--queries", "100",
                         "--prompt-batch", "1", "--style-estimate", "--style-prompts",
                         str(prompts_file), *FAST)
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "runs.json").read_text())["plan"]
    assert (plan["prompt_batch"], plan["style_prompts"]) == (1, 6)
    assert "first spent 6 of its queries on a style estimate" in (out / "results.md").read_text()
    result, data = run_eval("--index", str(private_index), "--holdout", str(holdout),
                            "--out", str(tmp_path / "refused"), "--style-estimate", *FAST)
    assert result.exit_code == 2 and "--style-prompts" in data["message"]
    assert not (tmp_path / "refused").exists()
    assert SqliteLedger(private_index).summary().queries == 0


def test_public_only_mixes_its_public_neighbours_at_the_generators_own_lam(
        private_index, holdout, tmp_path, encoder):
    rng = np.random.default_rng(2)
    public = tmp_path / "public"
    build_index(encoder.encode_images(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)),
                public)
    base = ["--index", str(private_index), "--holdout", str(holdout), "--public-index",
            str(public), "--epsilons", "8", "--queries", "100", *FAST]
    for extra, expected in (([], 0.25), (["--public-lam", "0.4"], 0.4)):
        out = tmp_path / f"report-{expected}"
        result, data = run_eval(*base, *extra, "--out", str(out))
        assert result.exit_code == 0, result.output
        lams = {run["setting"]: run["lam"] for run in data["runs"]}
        assert lams == {"public-only": expected, "dp": 0.7, "non-private": 0.7}
        assert json.loads((out / "runs.json").read_text())["plan"]["public_lam"] == expected
        markdown = (out / "results.md").read_text()
        assert f"public neighbours at lam {expected:g} (its own)" in markdown
    with pytest.raises(InvalidParameterError, match="public_lam"):
        EvalPlan(public_lam=1.5)


def test_non_private_takes_its_own_k_and_lam_when_given(private_index, holdout, tmp_path,
                                                      encoder):
    from dprdm.evaluation.harness import Setting, generate_setting
    from dprdm.conditioning import interpolate
    from dprdm.rdm import neighbour_mean

    pipe, index, calls = recording_pipeline(private_index)
    text = encoder.encode_text(CAPTIONS)
    for plan, (k, lam) in ((EvalPlan(k=4, q=0.5, lam=0.7, steps=1, guidance=1.0), (4, 0.7)),
                           (EvalPlan(k=4, q=0.5, lam=0.7, steps=1, guidance=1.0,
                                     non_private_k=25, non_private_lam=1.0), (25, 1.0))):
        calls.clear()
        generate_setting(Setting("non-private"), CAPTIONS, plan, encoder, pipe, index, None)
        ((conditions, _),) = calls
        np.testing.assert_allclose(conditions, interpolate(neighbour_mean(index, text, k), text,
                                                           lam), atol=1e-6)
    out = tmp_path / "report"
    result, data = run_eval("--index", str(private_index), "--holdout", str(holdout),
                            "--out", str(out), "--epsilons", "8", "--queries", "100",
                            "--non-private-k", "25", "--non-private-lam", "0.9", *FAST)
    assert result.exit_code == 0, result.output
    mixes = {run["setting"]: (run["k"], run["lam"]) for run in data["runs"]}
    assert mixes == {"public-only": (4, 0.7), "dp": (4, 0.7), "non-private": (25, 0.9)}
    assert "non-private takes its own k 25 and lam 0.9" in (out / "results.md").read_text()
    assert SqliteLedger(private_index).summary().queries == 0
    for bad, match in (({"non_private_k": 0}, "non_private_k"),
                       ({"non_private_k": 2.5}, "non_private_k"),
                       ({"non_private_lam": -0.1}, "non_private_lam")):
        with pytest.raises(InvalidParameterError, match=match):
            EvalPlan(**bad)


def test_plan_validation_and_settings_order():
    with pytest.raises(InvalidParameterError):
        EvalPlan(epsilons=(0.0,))
    with pytest.raises(InvalidParameterError):
        EvalPlan(queries=(0,))
    with pytest.raises(InvalidParameterError):
        EvalPlan(q=0.0)
    with pytest.raises(InvalidParameterError):
        EvalPlan(samples=1)
    for repeats in (0, 1.5, True):
        with pytest.raises(InvalidParameterError, match="repeats"):
            EvalPlan(repeats=repeats)
    for content_guidance in (-1.0, 31.0, float("inf")):
        with pytest.raises(InvalidParameterError, match="content_guidance"):
            EvalPlan(content_guidance=content_guidance)
    with pytest.raises(InvalidParameterError, match="pool"):
        EvalPlan(pool="yes")
    names = [s.label for s in plan_settings(EvalPlan(epsilons=(5.0,), queries=(10, 20)))]
    assert names == ["public-only", "DP eps=5 T=10", "DP eps=5 T=20", "non-private"]


@pytest.mark.parametrize("args", [
    ["--epsilons", "abc"],
    ["--epsilons", "-1"],
    ["--queries", "1.5"],
    ["--q", "0", "--k", "4"],
    ["--lam", "2"],
    ["--repeats", "0"],
])
def test_bad_arguments_exit_2_and_write_nothing(private_index, holdout, tmp_path, args):
    out = tmp_path / "never"
    result, data = run_eval("--index", str(private_index), "--holdout", str(holdout),
                            "--out", str(out), *FAST, *args)
    assert result.exit_code == 2
    assert data["error"]
    assert not out.exists()
    assert SqliteLedger(private_index).summary().queries == 0
