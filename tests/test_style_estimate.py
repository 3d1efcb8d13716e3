"""The operator's stored style estimate (dprdm.style_estimate) and shrinking towards it
(dprdm.conditioning.shrink_towards): the estimator, the charge, the file, and its use by
`generate`, `budget show` and the service engine.

The statistical tests simulate releases with a seeded numpy generator: they test the estimator,
not the mechanism, whose noise comes from the OS.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from dprdm.cli import app
from dprdm.conditioning import interpolate, shrink_towards
from dprdm.errors import BudgetExceededError, DprdmError, InvalidParameterError
from dprdm.privacy import (InMemoryLedger, MechanismParams, SqliteLedger, init_budget,
                           open_private_index)
from dprdm.rdm import MechanismSettings, RetrievalAugmentedGenerator
from dprdm.retrieval import build_index
from dprdm.style_estimate import (FILENAME, estimate_style, load_style_estimate,
                                  read_operator_prompts, save_style_estimate)

from _release_support import (DIM, SIGMA, TextOnlyBackend, one_style_records, record_releases,
                              unit)

runner = CliRunner()


# -- the estimator ---------------------------------------------------------------------------------

def squared_errors(aggregates, target, rng, trials):
    """Mean squared error per release, raw and shrunk towards `target`, and the mean b; every
    release is a call of its own (P = 1)."""
    raw = shrunk = kept = 0.0
    for _ in range(trials):
        released = aggregates + rng.normal(0.0, SIGMA, aggregates.shape)
        for row, truth in zip(released, aggregates):
            estimate, b = shrink_towards(row[None], target, SIGMA)
            raw += np.sum((row - truth) ** 2) / (trials * len(aggregates))
            shrunk += np.sum((estimate[0] - truth) ** 2) / (trials * len(aggregates))
            kept += b / (trials * len(aggregates))
    return raw, shrunk, kept


def test_a_lone_release_near_the_target_loses_most_of_its_noise():
    rng = np.random.default_rng(0)
    centroid = 0.7 * unit(rng.normal(size=DIM))
    aggregates = centroid + 0.01 * rng.normal(size=(16, DIM))
    target = centroid + rng.normal(0.0, SIGMA / 8, DIM)  # the mean of 64 earlier releases
    raw, shrunk, kept = squared_errors(aggregates, target, rng, trials=50)
    assert raw == pytest.approx(SIGMA**2 * DIM, rel=0.05)
    assert kept < 0.2
    assert shrunk < 0.2 * raw


def test_shrinking_never_costs_on_average_however_far_the_target():
    """James-Stein towards a fixed point dominates the raw release when P d > 2."""
    rng = np.random.default_rng(1)
    for distance in (0.0, 0.3, 1.0, 3.0):
        aggregates = 0.5 * unit(rng.normal(size=(8, DIM)))
        target = distance * unit(rng.normal(size=DIM))
        raw, shrunk, _ = squared_errors(aggregates, target, rng, trials=150)
        assert shrunk < raw, distance


def test_a_far_target_keeps_most_of_the_release():
    rng = np.random.default_rng(2)
    aggregates = unit(rng.normal(size=(16, DIM)))
    _, _, kept = squared_errors(aggregates, -unit(aggregates.mean(axis=0)), rng, trials=20)
    assert kept > 0.7


def test_several_releases_share_one_b_and_no_noise_is_left_alone():
    rng = np.random.default_rng(3)
    released = rng.normal(size=(5, DIM))
    target = rng.normal(size=DIM)
    out, kept = shrink_towards(released, target, SIGMA)
    np.testing.assert_allclose(out, target + kept * (released - target))
    out, kept = shrink_towards(released, target, 0.0)
    assert kept == 1.0 and np.array_equal(out, released)
    out, _ = shrink_towards(released.astype(np.float32), target, SIGMA)
    assert out.dtype == np.float32


@pytest.mark.parametrize("released, target, sigma, message", [
    (np.zeros(DIM), np.zeros(DIM), SIGMA, "released"),
    (np.zeros((1, DIM)), np.zeros(DIM - 1), SIGMA, "target"),
    (np.zeros((1, DIM)), np.full(DIM, np.nan), SIGMA, "target"),
    (np.zeros((1, DIM)), np.zeros(DIM), -1.0, "sigma"),
    (np.zeros((1, DIM)), np.zeros(DIM), True, "sigma"),
])
def test_bad_input_is_refused(released, target, sigma, message):
    with pytest.raises(InvalidParameterError, match=message):
        shrink_towards(released, target, sigma)


# -- making, storing and loading an estimate -------------------------------------------------------

@pytest.fixture()
def private(tmp_path):
    """A private index whose records share one style; the demo's mechanism and budget."""
    build_index(one_style_records(), tmp_path / "private")
    init_budget(tmp_path / "private", 10.0, 1e-5, MechanismParams(SIGMA, 0.1, 40), lam=0.75)
    return tmp_path / "private"


def rag_for(index_dir, estimate=None, releases: list | None = None):
    index, ledger = open_private_index(index_dir)
    rag = RetrievalAugmentedGenerator(backend=TextOnlyBackend(), private_index=index,
                                      ledger=ledger, settings=MechanismSettings.from_ledger(ledger),
                                      style_estimate=estimate)
    if releases is not None:
        record_releases(rag, releases)
    return rag, ledger


OPERATOR_PROMPTS = [f"operator prompt {i}" for i in range(16)]


def test_an_estimate_is_the_mean_of_its_charged_releases_and_round_trips(private):
    releases: list = []
    rag, ledger = rag_for(private, releases=releases)
    estimate = estimate_style(rag, OPERATOR_PROMPTS)
    assert ledger.summary().queries == 16  # one query per operator prompt, charged
    np.testing.assert_allclose(estimate.vector, releases[0].mean(axis=0))
    assert (estimate.releases, estimate.k, estimate.ledger_id) == (16, 40, ledger.ledger_id)
    assert not (private / FILENAME).exists()  # nothing written until saved
    save_style_estimate(private, estimate)
    loaded = load_style_estimate(private, ledger.ledger_id, DIM)
    np.testing.assert_array_equal(loaded.vector, estimate.vector)
    assert loaded.describe() == estimate.describe()
    assert "vector" not in json.dumps(loaded.describe())


def test_an_index_without_an_estimate_loads_none(private):
    assert load_style_estimate(private, "any", DIM) is None


def test_an_estimate_the_budget_cannot_pay_for_is_refused_whole(private):
    rag, ledger = rag_for(private)
    too_many = [f"p{i}" for i in range(ledger.remaining_queries() + 1)]
    with pytest.raises(BudgetExceededError):
        estimate_style(rag, too_many)
    assert ledger.summary().queries == 0


@pytest.mark.parametrize("prompts", [["only one"], ["fine", ""], ["fine", 3]])
def test_bad_operator_prompts_are_refused_before_anything_is_charged(private, prompts):
    rag, ledger = rag_for(private)
    with pytest.raises(InvalidParameterError):
        estimate_style(rag, prompts)
    assert ledger.summary().queries == 0


def test_an_estimate_of_another_ledger_or_size_or_a_broken_file_is_refused(private):
    rag, ledger = rag_for(private)
    save_style_estimate(private, estimate_style(rag, OPERATOR_PROMPTS))
    with pytest.raises(InvalidParameterError, match="paid for by ledger"):
        load_style_estimate(private, "another-ledger", DIM)
    with pytest.raises(InvalidParameterError, match="dimensions"):
        load_style_estimate(private, ledger.ledger_id, DIM + 1)
    (private / FILENAME).write_bytes(b"not safetensors")
    with pytest.raises(InvalidParameterError, match="not a readable"):
        load_style_estimate(private, ledger.ledger_id, DIM)


def test_one_prompt_calls_are_shrunk_towards_the_estimate(private):
    rag, ledger = rag_for(private)
    estimate = estimate_style(rag, OPERATOR_PROMPTS)
    releases: list = []
    rag, ledger = rag_for(private, estimate, releases)
    pooling: dict = {}
    conditions = rag.conditions(["red apple"], public_only=False, pooling=pooling)
    shrunk, kept = shrink_towards(releases[0], estimate.vector, SIGMA)
    text = TextOnlyBackend().embed_prompts(["red apple"])
    np.testing.assert_allclose(conditions, interpolate(shrunk, text, 0.75), atol=1e-6)
    assert pooling == {"releases": 1, "kept": round(kept, 4), "towards": "style estimate"}
    assert kept < 0.5  # one style, sigma 0.0875 in 64 dimensions: mostly the estimate
    assert ledger.summary().queries == 17  # the estimate's 16 and this call's 1; shrinking: free


def test_an_estimate_for_another_dimension_is_refused_by_the_generator(private):
    rag, _ = rag_for(private)
    estimate = estimate_style(rag, OPERATOR_PROMPTS)
    wrong = SimpleNamespace(dim=DIM + 1, vector=np.zeros(DIM + 1))
    with pytest.raises(InvalidParameterError, match="dimension"):
        rag_for(private, wrong)
    assert rag_for(private, estimate)[0].style_estimate is estimate


def test_operator_prompts_are_read_like_a_synthesis_prompt_file_and_too_few_refused(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("red apple\n\ncat face\n")
    assert read_operator_prompts(path) == ["red apple", "cat face"]
    jsonl = tmp_path / "prompts.jsonl"  # every format `dprdm synthesize` reads
    jsonl.write_text('{"prompt": "red apple"}\n{"prompt": "cat face", "source": "x"}\n')
    assert read_operator_prompts(jsonl) == ["red apple", "cat face"]
    path.write_text("only one\n")
    with pytest.raises(InvalidParameterError, match="2 to"):
        read_operator_prompts(path)
    path.write_text("fine\nbad\x07bell\n")  # the shared reader's checks: control characters
    with pytest.raises(InvalidParameterError, match="line 2"):
        read_operator_prompts(path)
    with pytest.raises(DprdmError):
        read_operator_prompts(tmp_path / "missing.txt")


# -- the commands ----------------------------------------------------------------------------------

@pytest.fixture()
def demo_sized_index(tmp_path):
    """An index in the demo encoder's dimension (the CLI embeds prompts with it)."""
    from dprdm.encoders import load_encoder

    dim = load_encoder("demo").dim
    vectors = np.random.default_rng(0).normal(size=(200, dim)).astype(np.float32)
    build_index(vectors, tmp_path / "private")
    init_budget(tmp_path / "private", 5.0, 1e-5, MechanismParams(1.0, 0.5, 5), lam=0.5)
    prompts = tmp_path / "operator.txt"
    prompts.write_text("\n".join(f"operator prompt {i}" for i in range(8)) + "\n")
    return tmp_path / "private", prompts


def invoke(*args):
    result = runner.invoke(app, [*args, "--json"])
    data = json.loads(result.stdout) if result.stdout.strip() else None
    return result, data


def test_the_command_charges_writes_and_refuses_a_second_without_replace(demo_sized_index):
    index, prompts = demo_sized_index
    result, dry = invoke("budget", "style-estimate", str(index), "--prompts", str(prompts),
                         "--dry-run")
    assert result.exit_code == 0, result.output
    assert dry["queries"] == 8 and not (index / FILENAME).exists()
    assert SqliteLedger(index).summary().queries == 0
    result, data = invoke("budget", "style-estimate", str(index), "--prompts", str(prompts))
    assert result.exit_code == 0, result.output
    assert data["style_estimate"]["releases"] == 8 and (index / FILENAME).exists()
    assert SqliteLedger(index).summary().queries == 8
    first = (index / FILENAME).read_bytes()
    result, data = invoke("budget", "style-estimate", str(index), "--prompts", str(prompts))
    assert result.exit_code == 2 and "--replace" in result.output
    assert SqliteLedger(index).summary().queries == 8 and (index / FILENAME).read_bytes() == first
    result, data = invoke("budget", "style-estimate", str(index), "--prompts", str(prompts),
                          "--replace")
    assert result.exit_code == 0 and data["replaced"] is True
    assert SqliteLedger(index).summary().queries == 16
    result, shown = invoke("budget", "show", str(index))
    assert shown["style_estimate"]["releases"] == 8
    (index / FILENAME).write_bytes(b"broken")  # refused when read, replaced with --replace
    result, data = invoke("budget", "style-estimate", str(index), "--prompts", str(prompts))
    assert result.exit_code == 2 and "not a readable" in data["message"]
    result, data = invoke("budget", "style-estimate", str(index), "--prompts", str(prompts),
                          "--replace")
    assert result.exit_code == 0 and data["style_estimate"]["releases"] == 8


def test_the_command_refuses_a_bad_prompts_file_and_spends_nothing(demo_sized_index, tmp_path):
    index, _ = demo_sized_index
    bad = tmp_path / "one.txt"
    bad.write_text("one prompt only\n")
    result, _ = invoke("budget", "style-estimate", str(index), "--prompts", str(bad))
    assert result.exit_code == 2
    result, _ = invoke("budget", "style-estimate", str(index))
    assert result.exit_code == 2 and "--prompts" in result.output
    assert SqliteLedger(index).summary().queries == 0 and not (index / FILENAME).exists()


def test_generate_shrinks_a_one_prompt_call_towards_the_estimate(demo_sized_index, tmp_path):
    index, prompts = demo_sized_index
    fast = ["--steps", "2", "--json"]
    assert invoke("budget", "style-estimate", str(index), "--prompts", str(prompts))[0] \
        .exit_code == 0
    result = runner.invoke(app, ["generate", "red apple", "--index", str(index), *fast,
                                 "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["pooling"]["towards"] == "style estimate" and report["pooling"]["releases"] == 1
    assert report["ledger"]["queries_by_call"] == 1
    result = runner.invoke(app, ["generate", "red apple", "--index", str(index), "--no-pool",
                                 *fast, "--out", str(tmp_path / "raw")])
    assert result.exit_code == 0 and "pooling" not in json.loads(result.stdout)


def test_the_service_engine_loads_the_estimate_unless_pool_is_off(demo_sized_index):
    from dprdm.service.config import build_config
    from dprdm.service.engine import GenerationEngine

    index, prompts = demo_sized_index
    assert invoke("budget", "style-estimate", str(index), "--prompts", str(prompts))[0] \
        .exit_code == 0
    engine = GenerationEngine(build_config({"index_dir": index}))
    assert engine.rag.style_estimate.releases == 8 and engine.style_estimate_releases() == 8
    engine = GenerationEngine(build_config({"index_dir": index, "pool": False}))
    assert engine.rag.style_estimate is None and engine.rag.pool is False


@pytest.fixture()
def demo_root(tmp_path, monkeypatch):
    """A stand-in demo folder: held-out captions and a public index's captions."""
    monkeypatch.setenv("DPRDM_DEMO_ROOT", str(tmp_path / "demo"))
    (tmp_path / "demo" / "holdout").mkdir(parents=True)
    (tmp_path / "demo" / "public").mkdir()
    held_out = [f"concept {i}" for i in range(0, 200, 2)]
    (tmp_path / "demo" / "holdout" / "captions.jsonl").write_text(
        "".join(json.dumps({"file": f"{i}.png", "caption": c}) + "\n"
                for i, c in enumerate(held_out)))
    (tmp_path / "demo" / "public" / "metadata.jsonl").write_text(
        "".join(json.dumps({"caption": f"concept {i}", "style": style}) + "\n"
                for i in range(200) for style in ("twemoji", "google")))
    return held_out


def test_the_demo_operator_prompts_are_public_captions_and_never_a_held_out_prompt(demo_root):
    from dprdm.demo import STYLE_ESTIMATE_PROMPTS, style_estimate_prompts

    held_out = demo_root
    prompts = style_estimate_prompts()
    assert len(prompts) == STYLE_ESTIMATE_PROMPTS == len(set(prompts))
    assert not set(prompts) & set(held_out)
    assert prompts == style_estimate_prompts()  # the same operator prompts every time


def test_make_demo_pays_for_its_estimate_once_and_goes_on_without_one_it_cannot_afford(
        demo_root, tmp_path):
    from dprdm.demo import STYLE_ESTIMATE_PROMPTS, prepare_style_estimate

    build_index(one_style_records(), tmp_path / "rich")
    init_budget(tmp_path / "rich", 10.0, 1e-5, MechanismParams(SIGMA, 0.1, 40), lam=0.75)
    rag, ledger = rag_for(tmp_path / "rich")
    prepare_style_estimate(rag, tmp_path / "rich")
    assert rag.style_estimate.releases == STYLE_ESTIMATE_PROMPTS
    assert ledger.summary().queries == STYLE_ESTIMATE_PROMPTS
    rag, ledger = rag_for(tmp_path / "rich")
    prepare_style_estimate(rag, tmp_path / "rich")  # kept: loaded, not bought again
    assert rag.style_estimate is not None and ledger.summary().queries == STYLE_ESTIMATE_PROMPTS
    build_index(one_style_records(), tmp_path / "poor")
    init_budget(tmp_path / "poor", 0.5, 1e-5, MechanismParams(SIGMA, 0.1, 40), lam=0.75)
    rag, ledger = rag_for(tmp_path / "poor")
    prepare_style_estimate(rag, tmp_path / "poor")  # refused whole: the demo goes on
    assert rag.style_estimate is None and ledger.summary().queries == 0
    assert not (tmp_path / "poor" / FILENAME).exists()
