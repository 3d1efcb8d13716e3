"""`dprdm generate` end to end: shipped demo weights, a synthetic private index, a fresh ledger."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dprdm.cli import app
from dprdm.encoders import load_encoder
from dprdm.privacy import MechanismParams, SqliteLedger, init_budget
from dprdm.retrieval import build_index

runner = CliRunner()
PARAMS = MechanismParams(1.0, 0.5, 5)
MECHANISM = ["--lam", "0.8"]  # k, q, sigma: pinned in the ledger
FAST = ["-n", "2", "--steps", "3"]


@pytest.fixture(scope="module")
def dim():
    return load_encoder("demo").dim


@pytest.fixture()
def private_index(tmp_path, dim):
    vectors = np.random.default_rng(0).normal(size=(200, dim)).astype(np.float32)
    build_index(vectors, tmp_path / "private")
    init_budget(tmp_path / "private", 5.0, 1e-5, PARAMS, lam=0.5)
    return tmp_path / "private"


def generate(*args):
    result = runner.invoke(app, ["generate", *args, "--json"])
    data = json.loads(result.stdout) if result.stdout.strip() else None
    return result, data


def test_generate_writes_images_and_charges_one_query_per_prompt(private_index, tmp_path):
    out = tmp_path / "out"
    result, report = generate("red apple", "smiling cat face", "--index", str(private_index),
                              *MECHANISM, *FAST, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert len(report["files"]) == 4
    for path in report["files"]:
        assert (out / path.split("/")[-1]).is_file()
    assert (out / "grid.png").is_file() and (out / "report.json").is_file()
    assert report["ledger"]["queries_by_call"] == 2
    assert report["mechanism"] == {"sigma": 1.0, "q": 0.5, "k": 5, "lam": 0.8}  # pinned; --lam
    assert report["ledger"]["epsilon_spent_by_call"] > 0
    assert SqliteLedger(private_index).summary().queries == 2
    assert json.loads((out / "report.json").read_text())["prompts"] == ["red apple",
                                                                       "smiling cat face"]


def test_public_only_spends_nothing_and_the_seed_reproduces_it(private_index, tmp_path):
    runs = []
    for name in ("a", "b"):
        result, report = generate("red apple", "--index", str(private_index), *MECHANISM, *FAST,
                                  "--public-only", "--seed", "7", "--out", str(tmp_path / name))
        assert result.exit_code == 0, result.output
        runs.append(open(report["files"][0], "rb").read())
    assert runs[0] == runs[1]
    assert SqliteLedger(private_index).summary().queries == 0


def test_public_only_mixes_its_neighbours_at_the_generators_own_lam_unless_given(tmp_path, dim):
    vectors = np.random.default_rng(1).normal(size=(50, dim)).astype(np.float32)
    public = build_index(vectors, tmp_path / "public").path
    base = ["red apple", "--public-only", "--public-index", str(public), *FAST]
    result, report = generate(*base, "--out", str(tmp_path / "own"))
    assert result.exit_code == 0, result.output
    assert report["public_lam"] == 0.25  # the shipped generator's (model_index.json)
    result, report = generate(*base, "--lam", "0.6", "--out", str(tmp_path / "given"))
    assert result.exit_code == 0, result.output
    assert report["public_lam"] == 0.6


def test_content_guidance_reaches_the_pipeline_through_the_cli(private_index, tmp_path,
                                                                monkeypatch):
    from _pipeline_spy import spy_on_pipeline

    calls = spy_on_pipeline(monkeypatch)
    result, report = generate("red apple", "--index", str(private_index), *MECHANISM, *FAST,
                              "--content-guidance", "6", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert report["content_guidance"] == 6.0 and len(report["files"]) == 2
    (call,) = calls
    assert call["content_guidance"] == 6.0  # the prompt's own text embedding, once per image
    np.testing.assert_allclose(call["content_conditions"],
                               np.repeat(load_encoder("demo").encode_text(["red apple"]), 2, 0),
                               atol=1e-6)
    assert SqliteLedger(private_index).summary().queries == 1
    calls.clear()  # none given: the shipped generator's own, used and reported
    result, report = generate("red apple", "--index", str(private_index), *MECHANISM, *FAST,
                              "--out", str(tmp_path / "default"))
    assert result.exit_code == 0, result.output
    assert report["content_guidance"] == 6.0 and calls[0]["content_guidance"] == 6.0


def test_a_calls_releases_are_pooled_unless_no_pool_is_given(private_index, tmp_path):
    prompts = ["red apple", "smiling cat face", "blue car"]
    result, report = generate(*prompts, "--index", str(private_index), *MECHANISM, *FAST,
                              "--out", str(tmp_path / "pooled"))
    assert result.exit_code == 0, result.output
    # sigma 1 in 64 dimensions drowns these aggregates: little of each release's own is kept
    assert report["pooling"]["releases"] == 3 and 0.0 <= report["pooling"]["kept"] < 0.5
    result, report = generate(*prompts, "--index", str(private_index), *MECHANISM, *FAST,
                              "--no-pool", "--out", str(tmp_path / "raw"))
    assert result.exit_code == 0, result.output
    assert "pooling" not in report and report["ledger"]["queries_by_call"] == 3
    assert SqliteLedger(private_index).summary().queries == 6  # pooled or not: one per prompt


def test_generation_is_refused_cleanly_when_the_budget_is_gone(private_index, tmp_path):
    ledger = SqliteLedger(private_index)
    ledger.charge(PARAMS, ledger.remaining_queries(PARAMS))
    spent = ledger.summary().queries
    result, data = generate("red apple", "--index", str(private_index), *MECHANISM, *FAST,
                            "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert data["error"] == "budget_exhausted"
    assert not list((tmp_path / "out").glob("*.png"))
    assert SqliteLedger(private_index).summary().queries == spent


@pytest.mark.parametrize("extra", [
    ["--steps", "0"], ["-n", "0"], ["--guidance", "-1"], ["--lam", "2"], ["--k", "5"],
    ["--content-guidance", "-1"], ["--content-guidance", "3", "--generator", "kandinsky-2.2"],
])
def test_bad_input_is_refused_before_anything_is_charged(private_index, tmp_path, extra):
    args = ["x", "--index", str(private_index), *MECHANISM, *FAST, *extra,
            "--out", str(tmp_path / "out")]
    result, _ = generate(*args)
    assert result.exit_code == 2, result.output
    assert SqliteLedger(private_index).summary().queries == 0


def test_an_earlier_run_is_not_overwritten_without_overwrite(private_index, tmp_path):
    out = tmp_path / "out"
    first, _ = generate("red apple", "--index", str(private_index), *MECHANISM, *FAST,
                        "--public-only", "--out", str(out))
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again, error = generate("red apple", "--index", str(private_index), *MECHANISM, *FAST,
                            "--out", str(out))
    assert again.exit_code == 2 and error["error"] == "invalid_parameter"
    assert "--overwrite" in error["message"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    assert SqliteLedger(private_index).summary().queries == 0  # nothing charged
    replaced, report = generate("red apple", "--index", str(private_index), *MECHANISM,
                                "-n", "1", "--steps", "3", "--out", str(out), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in out.glob("prompt*_image*.png")) == ["prompt000_image00.png"]
    assert SqliteLedger(private_index).summary().queries == 1


def test_generate_on_a_sharded_index_charges_the_sharded_ledger(private_index, tmp_path):
    from dprdm.retrieval.shards import shard_index

    sharded = shard_index(private_index, tmp_path / "sharded", 2).path
    init_budget(sharded, 5.0, 1e-5, PARAMS, lam=0.5)
    result, report = generate("red apple", "--index", str(sharded), *MECHANISM, *FAST,
                              "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert len(report["files"]) == 2 and SqliteLedger(sharded).summary().queries == 1
    assert SqliteLedger(private_index).summary().queries == 0
    result, _ = generate("red apple", "--index", str(private_index), *MECHANISM, *FAST,
                         "--ray-address", "local", "--out", str(tmp_path / "out2"))
    assert result.exit_code == 2 and "sharded" in result.output
    assert SqliteLedger(private_index).summary().queries == 0
def test_dry_run_shows_the_cost_and_charges_nothing(private_index, tmp_path):
    from dprdm.privacy import accounting

    out = tmp_path / "out"
    result, plan = generate("red apple", "cat face", "--index", str(private_index), "--dry-run",
                            "--out", str(out))
    assert result.exit_code == 0, result.output
    assert plan["dry_run"] is True and plan["queries"] == 2 and plan["would_be_refused"] is False
    assert plan["epsilon_before"] == 0.0
    assert plan["epsilon_after"] >= accounting.epsilon_for(PARAMS, 2, 1e-5) * (1 - 1e-12)
    assert plan["queries_remaining_after"] == plan["queries_remaining_before"] - 2
    assert not out.exists() and SqliteLedger(private_index).summary().queries == 0


def test_per_call_figures_come_from_the_calls_own_receipts(private_index, tmp_path):
    from dprdm.privacy import accounting

    ledger = SqliteLedger(private_index)
    ledger.charge(PARAMS, 3)  # another caller's queries, before this call
    result, report = generate("red apple", "--index", str(private_index), *MECHANISM, *FAST,
                              "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    figures = report["ledger"]
    assert figures["queries_by_call"] == 1 and figures["ledger_queries_after_own_commit"] == 4
    marginal = ledger.reported_epsilon(4) - ledger.reported_epsilon(3)
    assert figures["epsilon_spent_by_call"] == pytest.approx(marginal) and marginal > 0
    assert ledger.reported_epsilon(4) >= accounting.epsilon_for(PARAMS, 4, 1e-5) * (1 - 1e-12)
    assert figures["ledger_now"]["queries"] == 4
