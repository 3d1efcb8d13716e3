"""`dprdm synthesize` end to end: prompt files, the plan, the journal, resume, outputs, eval."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import dprdm
from dprdm.cli import app
from dprdm.encoders import load_encoder
from dprdm.privacy import SqliteLedger, init_budget
from dprdm.rdm import MechanismSettings
from dprdm.retrieval import build_index
from dprdm.synthesis import Journal, read_prompts
from dprdm.synthesis.runner import image_file_name

runner = CliRunner()
MECHANISM = MechanismSettings(sigma=1.0, q=0.5, k=5, lam=0.8)
FAST = ["-n", "2", "--steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def dim():
    return load_encoder("demo").dim


def make_index(path: Path, dim: int, epsilon: float = 5.0) -> Path:
    vectors = np.random.default_rng(0).normal(size=(200, dim)).astype(np.float32)
    build_index(vectors, path)
    init_budget(path, epsilon, 1e-5, MECHANISM.params, lam=MECHANISM.lam)  # pins the mechanism
    return path


@pytest.fixture()
def private_index(tmp_path, dim):
    return make_index(tmp_path / "private", dim)


def synthesize(*args):
    result = runner.invoke(app, ["synthesize", *args, "--json"])
    data = json.loads(result.stdout) if result.stdout.strip() else None
    return result, data


def queries(index: Path) -> int:
    return SqliteLedger(index).summary().queries


def ledger_callers(index: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(index / "ledger.sqlite") as conn:
        return [(c, int(n)) for c, n in conn.execute("SELECT caller, count FROM releases")]


def assert_job_consistent(job: Path, index: Path, n: int) -> dict:
    """Every prompt's n images exist exactly once (no strays); the journal and the ledger agree."""
    journal = Journal(job)
    prompts = journal.prompts()
    done = journal.image_rows()
    expected = {image_file_name(p, i) for p, *_ in prompts for i in range(n)}
    assert {name for _, _, name in done} == expected and len(done) == len(expected)
    on_disk = {p.name for p in (job / "data").iterdir()} - {"metadata.jsonl"}
    assert on_disk == expected  # no temporary or duplicate files
    counts = journal.counts()
    assert counts["released"] == counts["distinct"]  # every distinct prompt released once
    batches = journal.batches()
    ledger = dict()
    for caller, count in ledger_callers(index):
        assert caller not in ledger  # one ledger row per journal batch
        ledger[caller] = count
    job_id = journal.params["job_id"]
    assert all(c.startswith(f"cli:synthesize:{job_id}:batch") for c in ledger)
    for batch in batches:  # a journaled batch was charged exactly as journaled
        if batch["state"] == "released":
            assert ledger[batch["caller"]] == batch["queries"]
        elif batch["state"] == "refused":
            assert batch["caller"] not in ledger
    journaled = {b["caller"] for b in batches if b["state"] == "released"}
    lost = {b["caller"]: b["queries"] for b in batches if b["state"] == "lost"}
    assert set(ledger) <= journaled | set(lost)  # nothing charged that the journal lacks
    extra = sum(ledger.get(c, 0) for c in lost)
    assert queries(index) == counts["distinct"] + extra
    journal.close()
    return {"counts": counts, "lost_charged": extra, "lost_batches": len(lost)}


# -- prompt files ----------------------------------------------------------------------------------
def test_prompt_files_of_every_format_are_read_with_their_metadata(tmp_path):
    (tmp_path / "p.txt").write_text("red apple\n\n  cat face \n")
    (tmp_path / "p.csv").write_text('id,caption,style\n1,red apple,"flat, bold"\n2,cat face,line\n')
    (tmp_path / "p.tsv").write_text("prompt\tid\nred apple\t7\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "red apple", "id": 1}\n\n'
                                      '{"prompt": "cat", "tag": "x"}\n')
    assert [(r.prompt, r.line) for r in read_prompts(tmp_path / "p.txt").rows] == [
        ("red apple", 1), ("cat face", 3)]
    csv_rows = read_prompts(tmp_path / "p.csv").rows
    assert csv_rows[0].metadata == {"id": "1", "style": "flat, bold"} and csv_rows[1].line == 3
    assert read_prompts(tmp_path / "p.tsv").rows[0].metadata == {"id": "7"}
    rows = read_prompts(tmp_path / "p.jsonl").rows
    assert [r.metadata for r in rows] == [{"id": 1, "tag": None}, {"id": None, "tag": "x"}]
    assert rows[1].line == 3


BAD_FILES = {
    "empty.txt": (b"\n  \n", "empty"),
    "binary.txt": (b"red apple\n\x89PNG\x00\x00\x1a", "binary file (NUL byte on line 2)"),
    "latin1.txt": ("red apple\ncaf\xe9\n".encode("latin-1"), "line 2 is not UTF-8"),
    "column.csv": (b"text,label\nred apple,1\n", "no `prompt` or `caption` column"),
    "long.txt": (("ok\n" + "x" * 501 + "\nfine\n").encode(), "line 2: the prompt has 501"),
    "fields.csv": (b"prompt,id\nred apple,1\ncat,2,3\n", "line 3: 3 fields"),
    "json.jsonl": (b'{"prompt": "a"}\n{"prompt": \n{"caption": "b"}\n{"text": "c"}\n',
                   "line 2: not valid JSON"),
    "types.jsonl": (b'{"prompt": "a", "id": 1}\n{"prompt": "b", "id": "2"}\n',
                    "line 2: metadata 'id' is a string"),
    "reserved.jsonl": (b'{"prompt": "a", "file_name": "x.png"}\n', "line 1: metadata key"),
    "control.txt": (b"red\x07apple\n", "line 1: the prompt holds control characters"),
    "prompts.pdf": (b"red apple\n", "prompt files are"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_prompt_files_are_refused_with_line_numbers_and_nothing_charged(
        private_index, tmp_path, name):
    data, message = BAD_FILES[name]
    (tmp_path / name).write_bytes(data)
    result, error = synthesize("--prompts", str(tmp_path / name), "--index", str(private_index),
                               *FAST, "--out", str(tmp_path / "job"))
    assert result.exit_code == 2, result.output
    assert error["error"] == "invalid_parameter" and message in error["message"]
    assert "nothing was charged" in error["message"] or name in ("prompts.pdf", "reserved.jsonl")
    assert queries(private_index) == 0 and not (tmp_path / "job").exists()


def test_a_million_prompts_over_a_small_budget_are_refused_before_anything_is_charged(
        private_index, tmp_path):
    path = tmp_path / "million.txt"
    path.write_text("".join(f"prompt number {i}\n" for i in range(10**6)))
    result, error = synthesize("--prompts", str(path), "--index", str(private_index), *FAST,
                               "--out", str(tmp_path / "job"))
    assert result.exit_code == 2, result.output
    assert error["error"] == "budget_exhausted"
    assert "1,000,000 more queries" in error["message"] and "--partial" in error["message"]
    assert queries(private_index) == 0 and not (tmp_path / "job").exists()


# -- the job ---------------------------------------------------------------------------------------
def test_job_output_loads_with_datasets_and_its_metadata_matches(private_index, tmp_path):
    datasets = pytest.importorskip("datasets")
    lines = [{"prompt": "red apple", "id": 1, "split": "a"},
             {"prompt": "smiling cat face", "id": 2, "split": "b"},
             {"prompt": "red apple", "id": 3, "split": "a"},  # identical: reuses one release
             {"prompt": "blue car", "id": 4, "split": None}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    job = tmp_path / "job"
    result, report = synthesize("--prompts", str(path), "--index", str(private_index), *FAST,
                                "--batch-size", "2", "--format", "parquet", "--out", str(job))
    assert result.exit_code == 0, result.output
    plan = report["plan"]
    assert (plan["prompts"], plan["distinct_prompts"], plan["queries_needed"]) == (4, 3, 3)
    assert plan["reuse_identical"] and plan["epsilon_after"] > 0
    assert report["status"] == "complete" and report["this_run"]["queries_charged"] == 3
    assert queries(private_index) == 3
    assert_job_consistent(job, private_index, n=2)
    ds = datasets.load_dataset("imagefolder", data_dir=str(job / "data"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == 8
    rows = sorted(ds, key=lambda r: (r["prompt_index"], r["image_index"]))
    for row, (p, i) in zip(rows, [(p, i) for p in range(4) for i in range(2)]):
        assert (row["prompt_index"], row["image_index"]) == (p, i)
        assert row["prompt"] == lines[p]["prompt"]
        assert (row["id"], row["split"]) == (lines[p]["id"], lines[p]["split"])
        assert row["mechanism"] == {"sigma": 1.0, "q": 0.5, "k": 5, "lam": 0.8}
        assert row["generator"] == "demo" and row["steps"] == 2
        assert 0 < row["epsilon_at_release"] <= report["ledger_after"]["epsilon_spent"] + 1e-9
        assert row["image"].size == (32, 32)
    # the last release's epsilon is the ledger's own (receipt-based accounting agrees)
    assert max(r["epsilon_at_release"] for r in rows) == pytest.approx(
        report["ledger_after"]["epsilon_spent"], rel=1e-9)
    # the two "red apple" prompts share one release: the same epsilon and ledger count
    assert rows[0]["ledger_queries_at_release"] == rows[4]["ledger_queries_at_release"]
    import pyarrow.parquet as pq
    table = pq.read_table(job / "parquet" / "data.parquet")
    assert table.num_rows == 8 and set(ds.column_names) <= set(table.column_names)
    summary = json.loads((job / "summary.json").read_text())
    assert summary["images_done"] == 8 and summary["status"] == "complete"
    assert Image.open(job / "contact_sheet.png").size[0] > 64


def test_reruns_and_resume_continue_and_never_charge_a_released_prompt(private_index, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("red apple\ncat face\nblue car\nyellow star\nred apple\ngreen tree\n")
    job = tmp_path / "job"
    args = ["--prompts", str(path), "--index", str(private_index), *FAST, "--batch-size", "2",
            "--out", str(job)]
    result, first = synthesize(*args, "--max-queries", "2")
    assert result.exit_code == 0, result.output
    assert first["status"] == "partial" and queries(private_index) == 2
    assert first["plan"]["queries_this_run"] == 2 and not first["plan"]["covers_whole_job"]
    result, second = synthesize(*args)  # the same command again continues the job
    assert result.exit_code == 0, result.output
    assert second["plan"]["already_released"] == 2 and second["plan"]["queries_needed"] == 3
    assert second["status"] == "complete" and queries(private_index) == 5
    result, third = synthesize("--resume", str(job))
    assert result.exit_code == 0 and third["this_run"]["queries_charged"] == 0
    assert queries(private_index) == 5
    assert_job_consistent(job, private_index, n=2)
    result, error = synthesize(*[a if a != "3" else "4" for a in args])  # another seed
    assert result.exit_code == 2 and "seed" in error["message"]
    result, error = synthesize("--resume", str(job), "--prompts", str(path))
    assert result.exit_code == 2 and error["error"] == "invalid_parameter"


def test_content_guidance_splits_guidance_on_each_prompts_own_text_and_is_part_of_the_job(
        private_index, tmp_path, monkeypatch):
    from _pipeline_spy import spy_on_pipeline

    calls = spy_on_pipeline(monkeypatch)
    path = tmp_path / "p.txt"
    path.write_text("red apple\ncat face\nblue car\n")
    job = tmp_path / "job"
    args = ["--prompts", str(path), "--index", str(private_index), *FAST, "--out", str(job)]
    for bad in ("-1", "nan", "inf", "31"):  # refused before anything is opened, charged or written
        result, error = synthesize(*args, "--content-guidance", bad)
        assert result.exit_code == 2 and "--content-guidance" in error["message"]
        assert queries(private_index) == 0 and not job.exists()
    result, report = synthesize(*args, "--content-guidance", "5")
    assert result.exit_code == 0, result.output
    generation = [c for c in calls if "content_conditions" in c]
    assert generation and all(c["content_guidance"] == 5.0 for c in generation)
    text = load_encoder("demo").encode_text(["red apple", "cat face", "blue car"])
    expected = np.repeat(text, 2, axis=0)  # -n 2: each prompt's text twice, in job order
    np.testing.assert_allclose(np.concatenate([c["content_conditions"] for c in generation]),
                               expected, atol=1e-6)
    rows = [json.loads(line) for line in
            (job / "data" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {row["content_guidance"] for row in rows} == {5.0}
    assert queries(private_index) == 3
    # another content guidance is another job: refused, nothing charged
    result, error = synthesize(*args, "--content-guidance", "6")
    assert result.exit_code == 2 and "content_guidance" in error["message"]
    result, error = synthesize(*args)  # nor may plain guidance continue it
    assert result.exit_code == 2 and "content_guidance" in error["message"]
    assert queries(private_index) == 3
    calls.clear()
    default = tmp_path / "default"  # none given: the generator's own (the shipped one's: 6)
    result, _ = synthesize(*args[:-1], str(default))
    generation = [c for c in calls if "content_conditions" in c]
    assert result.exit_code == 0 and generation
    assert all(c["content_guidance"] == 6.0 for c in generation)
    assert {json.loads(line)["content_guidance"] for line in
            (default / "data" / "metadata.jsonl").read_text().splitlines()} == {6.0}


def test_pooling_is_part_of_the_job(private_index, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("red apple\ncat face\nblue car\n")
    job = tmp_path / "job"
    args = ["--prompts", str(path), "--index", str(private_index), *FAST, "--out", str(job)]
    result, _ = synthesize(*args, "--no-pool")
    assert result.exit_code == 0, result.output
    assert Journal(job).params["pool"] is False
    assert queries(private_index) == 3
    result, error = synthesize(*args)  # pooled releases would be another job: refused
    assert result.exit_code == 2 and "pool" in error["message"]
    assert queries(private_index) == 3


def test_a_job_shrinks_towards_the_style_estimate_it_started_with(private_index, tmp_path):
    operator = tmp_path / "operator.txt"
    operator.write_text("".join(f"operator prompt {i}\n" for i in range(6)))
    estimate = ["budget", "style-estimate", str(private_index), "--prompts", str(operator),
                "--json"]
    assert runner.invoke(app, estimate).exit_code == 0
    path = tmp_path / "p.txt"
    path.write_text("red apple\ncat face\nblue car\nsun\n")
    job = tmp_path / "job"
    result, _ = synthesize("--prompts", str(path), "--index", str(private_index), *FAST,
                           "--batch-size", "2", "--max-queries", "2", "--out", str(job))
    assert result.exit_code == 0, result.output
    assert Journal(job).params["style_estimate"]["releases"] == 6
    assert queries(private_index) == 6 + 2
    assert runner.invoke(app, [*estimate, "--replace"]).exit_code == 0  # another estimate
    result, error = synthesize("--resume", str(job))
    assert result.exit_code == 2 and "style estimate" in error["message"]
    assert queries(private_index) == 6 + 2 + 6  # the resume charged nothing
    raw = tmp_path / "raw"
    result, _ = synthesize("--prompts", str(path), "--index", str(private_index), *FAST,
                           "--no-pool", "--out", str(raw))
    assert result.exit_code == 0 and Journal(raw).params["style_estimate"] is None


def test_a_job_started_without_an_estimate_resumes_without_one(private_index, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("red apple\ncat face\nblue car\nsun\n")
    job = tmp_path / "job"
    result, _ = synthesize("--prompts", str(path), "--index", str(private_index), *FAST,
                           "--batch-size", "2", "--max-queries", "2", "--out", str(job))
    assert result.exit_code == 0 and Journal(job).params["style_estimate"] is None
    operator = tmp_path / "operator.txt"
    operator.write_text("operator prompt 1\noperator prompt 2\n")
    assert runner.invoke(app, ["budget", "style-estimate", str(private_index), "--prompts",
                               str(operator), "--json"]).exit_code == 0
    result, report = synthesize("--resume", str(job))  # as it started: towards each batch's mean
    assert result.exit_code == 0, result.output
    assert report["status"] == "complete" and queries(private_index) == 2 + 2 + 2
    from dprdm.cli.synthesize import _keep_the_jobs_style_estimate, open_backend

    backend = open_backend(private_index, "demo", "demo")
    assert backend.rag.style_estimate is not None  # a new job would use it
    _keep_the_jobs_style_estimate(backend, None, job)
    assert backend.rag.style_estimate is None  # this job recorded none: it keeps none
    backend = open_backend(private_index, "demo", "demo")
    with pytest.raises(dprdm.errors.DprdmError, match="changed since"):
        _keep_the_jobs_style_estimate(backend, {"releases": 64, "sha256": "another"}, job)


def test_an_unaffordable_job_is_refused_unless_partial_says_what_to_do(tmp_path, dim):
    index = make_index(tmp_path / "small", dim, epsilon=1.0)
    affordable = SqliteLedger(index).remaining_queries(MECHANISM.params)
    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(affordable + 3)))
    args = ["--prompts", str(path), "--index", str(index), "-n", "1", "--steps", "1",
            "--batch-size", "4", "--out", str(tmp_path / "job")]
    result, error = synthesize(*args)
    assert result.exit_code == 2 and error["error"] == "budget_exhausted"
    assert queries(index) == 0 and not (tmp_path / "job").exists()
    result, planned = synthesize(*args, "--partial", "--dry-run")
    assert result.exit_code == 0 and planned["status"] == "planned"
    assert planned["plan"]["queries_this_run"] == affordable
    assert planned["plan"]["queries_needed"] == affordable + 3
    assert planned["plan"]["estimated_seconds"] > 0 and planned["plan"]["epsilon_after"] <= 1.0
    assert queries(index) == 0 and not (tmp_path / "job").exists()
    result, report = synthesize(*args, "--partial")
    assert result.exit_code == 0, result.output
    assert report["status"] == "partial" and queries(index) == affordable
    assert report["totals"]["images_done"] == affordable


def test_a_batch_charged_but_not_journaled_is_reported_lost_and_released_again(
        private_index, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("red apple\ncat face\nblue car\n")
    args = ["--prompts", str(path), "--index", str(private_index), *FAST, "--batch-size", "2",
            "--out", str(tmp_path / "job")]
    result, _ = synthesize(*args, "--max-queries", "1")
    assert result.exit_code == 0, result.output
    # A crash right after the ledger committed a charge, before the journal kept the release:
    journal = Journal(tmp_path / "job")
    _, caller = journal.begin_batch(2, f"cli:synthesize:{journal.params['job_id']}")
    SqliteLedger(private_index).charge(MECHANISM.params, 2, caller=caller)
    journal.close()
    with sqlite3.connect(tmp_path / "job" / "journal.sqlite") as conn:  # killed before accounting
        conn.execute("UPDATE releases SET epsilon = NULL")
    result, report = synthesize(*args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in
            (tmp_path / "job" / "data" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["epsilon_at_release"] > 0 for row in rows)
    assert report["this_run"]["batches_found_lost"] == 1
    assert report["totals"]["batches_lost"] == 1 and report["totals"]["queries_lost_at_most"] == 2
    figures = assert_job_consistent(tmp_path / "job", private_index, n=2)
    assert figures["lost_charged"] == 2 and queries(private_index) == 3 + 2


def test_a_second_run_of_a_job_in_progress_is_refused(private_index, tmp_path):
    import fcntl

    path = tmp_path / "p.txt"
    path.write_text("red apple\n")
    (tmp_path / "job").mkdir()
    with open(tmp_path / "job" / ".lock", "a") as held:  # a run in progress holds the lock
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result, error = synthesize("--prompts", str(path), "--index", str(private_index), *FAST,
                                   "--out", str(tmp_path / "job"))
    assert result.exit_code == 2 and "another run" in error["message"]
    assert queries(private_index) == 0 and not (tmp_path / "job" / "journal.sqlite").exists()


# -- crashes: SIGKILL (and one Ctrl-C) at random moments -------------------------------------------
def _released_batches(job: Path) -> int:
    try:
        with sqlite3.connect(f"file:{job / 'journal.sqlite'}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT COUNT(*) FROM batches WHERE state != 'charging'"
                                ).fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_resume_after_sigkill_at_random_moments(private_index, tmp_path):
    rng = random.Random()
    words = ["red", "blue", "green", "cat", "apple", "star", "car", "tree", "moon"]
    lines = [f"{rng.choice(words)} {rng.choice(words)} {i % 11}" for i in range(16)]
    path = tmp_path / "p.txt"
    path.write_text("\n".join(lines) + "\n")
    job = tmp_path / "job"
    command = [sys.executable, "-m", "dprdm", "synthesize", "--prompts", str(path), "--index",
               str(private_index), "--out", str(job), *FAST, "--batch-size", "2", "--json"]
    env = dict(os.environ, PYTHONPATH=str(Path(dprdm.__file__).parents[1]))
    signals = [signal.SIGKILL, signal.SIGINT, signal.SIGKILL]
    sent = []
    for sig in signals:
        before = _released_batches(job)
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        while process.poll() is None and _released_batches(job) <= before:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))  # a random moment inside the run
        if process.poll() is None:
            process.send_signal(sig)
            sent.append(sig)
        stdout, _ = process.communicate(timeout=120)
        if sig == signal.SIGINT and sent[-1:] == [sig]:  # stops at a batch boundary
            if process.returncode == -signal.SIGINT:
                # the signal came after the job had finished and printed its result, while the
                # interpreter was exiting: nothing was interrupted
                assert json.loads(stdout)["status"] == "complete"
                process.returncode = 0
            assert process.returncode in (0, 130)
            assert json.loads(stdout)["status"] == ("interrupted" if process.returncode else
                                                    "complete")
        if process.returncode == 0:
            break
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    report = json.loads(final.stdout)
    assert report["status"] == "complete"
    assert signal.SIGKILL in sent
    figures = assert_job_consistent(job, private_index, n=2)
    distinct = len(set(lines))
    assert figures["counts"]["distinct"] == distinct
    assert figures["lost_batches"] <= sent.count(signal.SIGKILL)  # at most one batch per kill
    assert queries(private_index) == distinct + figures["lost_charged"]
    assert figures["lost_charged"] <= 2 * sent.count(signal.SIGKILL)
    print(f"kills {len(sent)}, distinct {distinct}, lost batches {figures['lost_batches']}, "
          f"queries wasted {figures['lost_charged']}")


# -- eval --synthetic ------------------------------------------------------------------------------
def test_eval_scores_a_finished_job_without_charging(private_index, tmp_path):
    hold = tmp_path / "holdout"
    hold.mkdir()
    captions = ["red apple", "blue car", "cat face", "yellow star", "green tree", "moon", "sun"]
    for i, caption in enumerate(captions):
        pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(hold / f"{i}.png")
    (hold / "captions.jsonl").write_text("".join(
        json.dumps({"file": f"{i}.png", "caption": c}) + "\n" for i, c in enumerate(captions)))
    path = tmp_path / "p.txt"
    path.write_text("\n".join(captions[:4]) + "\n")
    job = tmp_path / "job"
    result, _ = synthesize("--prompts", str(path), "--index", str(private_index), *FAST,
                           "--out", str(job))
    assert result.exit_code == 0, result.output
    spent = queries(private_index)
    result = runner.invoke(app, ["eval", "--synthetic", str(job), "--holdout", str(hold),
                                 "--out", str(tmp_path / "ev"), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["images_scored"] == 8 and scored["held_out_images"] == 7
    assert scored["job_complete"] and np.isfinite(scored["scores"]["fid"])
    assert -1 <= scored["scores"]["alignment"] <= 1 and not scored["demo_metrics"]
    assert (tmp_path / "ev" / "synthetic_scores.json").is_file()
    assert queries(private_index) == spent
