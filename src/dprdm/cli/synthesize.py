"""`dprdm synthesize`: a DP synthetic data set from a prompt file, as a resumable journaled job.

The CLI side only: options, resolving the private index / ledger / mechanism / generator
(:func:`open_backend`, the one place that opens them), the plan, progress and Ctrl-C. The job
itself lives in :mod:`dprdm.synthesis`.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import typer

from dprdm import demo_layout
from dprdm.cli.generator_options import check_content_guidance
from dprdm.cli.output import JSON_OPTION, cli_errors, console, emit, err_console
from dprdm.errors import DprdmError, InvalidParameterError, NotFoundError

MAX_BATCH = 256
FORMATS = ("imagefolder", "parquet")
# Job parameters that must match for a re-run to continue a job folder.
IDENTITY = ("prompts_sha256", "images_per_prompt", "steps", "guidance", "content_guidance",
            "seed", "reuse_identical", "pool", "style_estimate", "index", "mechanism", "encoder",
            "generator")


@dataclass
class Backend:
    rag: object  # RetrievalAugmentedGenerator
    ledger: object  # ReceiptLedger around the index's ledger
    settings: object  # MechanismSettings
    index_dir: Path
    encoder: str
    generator: str


def open_backend(index_dir: Path, encoder: str, generator: str, pool: bool = True) -> Backend:
    """Open the private index, its ledger and mechanism settings, the encoder and the generator
    (`pool`: each batch's releases shrunk, towards the index's style estimate when it has one,
    else towards their mean; docs/privacy.md). (The single place to switch to a verified
    index+ledger entry point.)"""
    from dprdm.encoders import load_encoder
    from dprdm.generation import RetrievalDiffusionPipeline
    from dprdm.generation.pipeline import DEFAULT_DIR
    from dprdm.privacy import open_private_index
    from dprdm.rdm import MechanismSettings, RetrievalAugmentedGenerator
    from dprdm.style_estimate import load_style_estimate

    model_dir = Path(DEFAULT_DIR if generator == "demo" else generator)
    if not (model_dir / "model_index.json").is_file():
        raise NotFoundError(f"no generator pipeline (model_index.json) in {model_dir}")
    from dprdm.synthesis.runner import ReceiptLedger

    index, opened = open_private_index(index_dir)  # the verified pair; mechanism pinned there
    settings = MechanismSettings.from_ledger(opened, None)
    ledger = ReceiptLedger(opened)
    estimate = load_style_estimate(index_dir, opened.ledger_id, index.dim) if pool else None
    rag = RetrievalAugmentedGenerator(
        load_encoder(encoder), RetrievalDiffusionPipeline.from_pretrained(str(model_dir)),
        private_index=index, ledger=ledger, settings=settings, pool=pool,
        style_estimate=estimate)
    return Backend(rag, ledger, settings, Path(index_dir), encoder, generator)


def _seconds_per_image(pipeline, steps: int, probe: int = 4) -> float:
    """A quick measurement (one sampler step on a few images) scaled to `steps`."""
    import numpy as np

    conditions = np.zeros((probe, pipeline.cond_dim), dtype=np.float32)
    tic = time.perf_counter()
    pipeline(conditions, steps=1)
    return (time.perf_counter() - tic) / probe * steps


LOCK_FILE = ".lock"


@contextmanager
def job_lock(job_dir: Path) -> Iterator[None]:
    """One run of a job at a time: an exclusive lock on JOBDIR/.lock, released on exit (also
    when the process dies), so two runs can never release the same prompts twice."""
    import fcntl

    Path(job_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(job_dir) / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DprdmError(f"another run is working on {job_dir}; wait for it to end") from None
        yield


@contextmanager
def stop_on_sigint(announce: bool) -> Iterator[Callable[[], bool]]:
    """Ctrl-C asks the job to stop at the next batch boundary; a second Ctrl-C stops at once."""
    state = {"stop": False}

    def handler(signum, frame):  # noqa: ARG001
        if state["stop"]:
            raise KeyboardInterrupt
        state["stop"] = True
        if announce:
            err_console.print("stopping after this batch (Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: state["stop"]
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def job_progress(enabled: bool, total: int, done: int, budget: float, epsilon: float):
    """A rich bar on stderr: images, rate, ETA and the budget gauge; yields on_batch."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    if not enabled:
        yield None
        return
    with Progress(TextColumn("synthesizing"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                  TextColumn("{task.fields[budget]}"), console=err_console) as bar:
        started = time.perf_counter()
        gauge = lambda eps: f"epsilon {eps:.3g}/{budget:g}"  # noqa: E731
        task = bar.add_task("", total=total, completed=done, rate="", budget=gauge(epsilon))

        def on_batch(written: int, queries: int, eps: float | None) -> None:
            rate = written / max(time.perf_counter() - started, 1e-9)
            fields = {"rate": f"{rate:.2f} img/s, {queries} queries"}
            if eps is not None:
                fields["budget"] = gauge(eps)
            bar.update(task, completed=done + written, **fields)

        yield on_batch


def _job_params(prompt_file, out_index: Path, backend: Backend, n: int, steps: int,
                guidance: float, content_guidance: float | None, seed: int | None,
                reuse: bool, pool: bool) -> dict:
    return {"job_id": uuid.uuid4().hex[:12], "prompts_file": str(Path(prompt_file.path).resolve()),
            "prompts_sha256": prompt_file.sha256, "prompts": len(prompt_file.rows),
            "images_per_prompt": n, "steps": steps, "guidance": guidance,
            "content_guidance": content_guidance, "seed": seed,
            "reuse_identical": reuse, "pool": pool,
            "style_estimate": (None if backend.rag.style_estimate is None
                               else backend.rag.style_estimate.describe()),
            "index": str(out_index.resolve()),
            "mechanism": asdict(backend.settings), "encoder": backend.encoder,
            "generator": backend.generator}


def _keep_the_jobs_style_estimate(backend: Backend, recorded: dict | None, job_dir: Path) -> None:
    """A resumed job shrinks towards the estimate it started with: none if it recorded none (an
    estimate made since is not used), else the same one (another is refused)."""
    estimate = backend.rag.style_estimate
    if recorded is None:
        backend.rag.style_estimate = None
    elif estimate is None or estimate.describe() != recorded:
        raise DprdmError(f"the style estimate of {backend.index_dir} changed since the job in "
                         f"{job_dir} started; its batches were shrunk towards the old one")


def _check_same_job(saved: dict, wanted: dict, job_dir: Path) -> None:
    differ = [key for key in IDENTITY if saved.get(key) != wanted.get(key)]
    if differ:
        raise InvalidParameterError(
            f"{job_dir} holds another job (different {', '.join(differ)}); continue it with "
            f"`dprdm synthesize --resume {job_dir}` or choose another --out")


def synthesize(
    prompts: Path = typer.Option(None, "--prompts",
                                 help="Prompt file: .txt, .csv/.tsv (prompt or caption column) "
                                      "or .jsonl (prompt + metadata)."),
    out: Path = typer.Option(None, "--out", help="Job folder (created; a re-run continues it)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the job in this folder."),
    index: Path = typer.Option(None, "--index", help="Private index directory (with a ledger)."),
    demo: bool = typer.Option(False, "--demo", help="Use what `make demo` prepared."),
    n: int = typer.Option(1, "-n", "--images-per-prompt", help="Images per prompt (free)."),
    guidance: float = typer.Option(3.0, "--guidance", help="Classifier-free guidance scale."),
    content_guidance: float = typer.Option(
        None, "--content-guidance", metavar="G",
        help="Split guidance: G scales the prompt text's own pull, --guidance only what the "
             "released condition adds (docs/generator.md). Default: the generator's own "
             "(the shipped one: 6), else plain guidance."),
    steps: int = typer.Option(50, "--steps", help="Diffusion sampling steps."),
    seed: int = typer.Option(None, "--seed", help="Seed for the DIFFUSION sampler only."),
    encoder: str = typer.Option("demo", "--encoder", help="'demo' or a CLIP model directory."),
    model: Path = typer.Option(None, "--model", help="Generator directory (default: demo)."),
    batch_size: int = typer.Option(8, "--batch-size",
                                   help="Prompts per batch: the most queries a crash can waste."),
    max_queries: int = typer.Option(None, "--max-queries",
                                    help="Charge at most this many queries in this run."),
    partial: bool = typer.Option(False, "--partial",
                                 help="If the budget cannot afford the job, do what it affords."),
    reuse_identical: bool = typer.Option(True, "--reuse-identical/--no-reuse-identical",
                                         help="Identical prompts share one release (free)."),
    pool: bool = typer.Option(True, "--pool/--no-pool",
                              help="Shrink each batch's releases towards the index's style "
                                   "estimate, else their mean (James-Stein, docs/privacy.md; "
                                   "free)."),
    output_format: str = typer.Option("imagefolder", "--format",
                                      help="imagefolder (always written), or parquet as well."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; charge nothing."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Synthesize a DP data set: one query per distinct prompt, journaled, resumable.

    Example: dprdm synthesize --prompts prompts.txt --demo -n 4 --out job/
    """
    from dprdm.rdm import check_sampling
    from dprdm.synthesis import Journal, make_plan, read_prompts
    from dprdm.synthesis.output import DATA_DIR, write_outputs, write_summary
    from dprdm.synthesis.plan import rounded_seconds
    from dprdm.synthesis.runner import BatchSettings, clean_data_dir, run_batches

    def compute() -> dict:
        if output_format not in FORMATS:
            raise InvalidParameterError(f"--format is one of {', '.join(FORMATS)}")
        if isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH:
            raise InvalidParameterError(f"--batch-size must be in [1, {MAX_BATCH}]")
        prompt_file = None
        if resume is not None:
            if prompts is not None or out is not None or index is not None or demo:
                raise InvalidParameterError(
                    "--resume JOBDIR takes the job's prompts, index and settings from its "
                    "journal: give no --prompts, --out, --index or --demo with it")
            job_dir = resume
            if not Journal.exists(job_dir):
                raise NotFoundError(f"no job journal in {job_dir}")
            journal = Journal(job_dir)
            params = journal.params
            backend = open_backend(Path(params["index"]), params["encoder"], params["generator"],
                                   params.get("pool", False))  # older journals: not pooled
            _keep_the_jobs_style_estimate(backend, params.get("style_estimate"), job_dir)
            if asdict(backend.settings) != params["mechanism"]:
                raise DprdmError(f"the mechanism of {params['index']} changed since the job "
                                 "started; its released conditions belong to the old one")
        else:
            if prompts is None or out is None:
                raise InvalidParameterError("give --prompts FILE and --out JOBDIR (or --resume)")
            check_sampling(n, guidance, steps)
            split = check_content_guidance(content_guidance, "demo")  # a dprdm pipeline
            prompt_file = read_prompts(prompts)  # every line checked before anything is spent
            index_dir = index
            if demo and index_dir is None:
                index_dir = demo_layout.require(demo_layout.private_index_dir())
            if index_dir is None:
                raise InvalidParameterError("give --index DIR (or --demo)")
            if out.exists() and not out.is_dir():
                raise InvalidParameterError(f"{out} exists and is not a directory")
            if (out.is_dir() and not Journal.exists(out)
                    and any(p.name != LOCK_FILE for p in out.iterdir())):
                raise InvalidParameterError(f"{out} is not empty and holds no job journal")
            job_dir = out
            backend = open_backend(Path(index_dir), encoder, str(model) if model else "demo",
                                   pool)
            # not given: the content guidance the generator records it was chosen at
            content = split.get("content_guidance",
                                getattr(backend.rag.backend, "content_guidance", None))
            params = _job_params(prompt_file, Path(index_dir), backend, n, steps, guidance,
                                 content, seed, reuse_identical, pool)
            journal = Journal(job_dir) if Journal.exists(job_dir) else None
            if journal is not None:
                _check_same_job(journal.params, params, job_dir)
                params = journal.params
        # The plan, before anything is charged.
        if journal is not None:
            entries = journal.prompts()
            keys = [key for *_, key in entries]
            texts = {text for _, text, *_ in entries}
            released = journal.released_keys(set(keys))
            todo = len(entries) * params["images_per_prompt"] - len(journal.done_images())
        else:
            first: dict[str, int] = {}
            keys = [first.setdefault(row.prompt, i) if reuse_identical else i
                    for i, row in enumerate(prompt_file.rows)]
            texts = {row.prompt for row in prompt_file.rows}
            released, todo = set(), len(keys) * n
        plan = make_plan(
            release_keys=keys, released=released, distinct_prompts=len(texts),
            reuse_identical=params["reuse_identical"],
            images_per_prompt=params["images_per_prompt"], images_to_generate=todo,
            ledger=backend.ledger, params=backend.settings.params, max_queries=max_queries,
            partial=partial)
        plan = replace(plan, estimated_seconds=rounded_seconds(
            todo * _seconds_per_image(backend.rag.backend.pipeline, params["steps"])))
        if not as_json:
            console.print(plan.describe())
        result = {"job_dir": str(job_dir), "plan": plan.as_dict()}
        if dry_run:
            return dict(result, status="planned")
        with job_lock(job_dir):
            return dict(result, **run_job(journal, job_dir, params, prompt_file, backend, plan,
                                          len(keys), todo))

    def run_job(journal, job_dir, params, prompt_file, backend, plan, prompts_count,
                todo) -> dict:
        if journal is None:
            journal = Journal.create(job_dir, params, prompt_file.rows, reuse_identical)
        lost = journal.recover()
        if journal.missing_epsilon():  # a crash between journal commit and accounting
            journal.set_epsilon(backend.ledger.summary().epsilon_spent)
        data_dir = Path(job_dir) / DATA_DIR
        data_dir.mkdir(exist_ok=True)
        cleaned = clean_data_dir(journal, data_dir)
        run = journal.start_run()
        settings = BatchSettings(params["images_per_prompt"], params["steps"],
                                 params["guidance"], params["seed"], batch_size,
                                 f"cli:synthesize:{params['job_id']}",
                                 plan.single_mechanism_ledger,
                                 params.get("content_guidance"))  # absent in older journals
        total = prompts_count * params["images_per_prompt"]
        with stop_on_sigint(not as_json) as should_stop, job_progress(
                not as_json, total, total - todo, plan.budget_epsilon,
                plan.epsilon_spent) as on_batch:
            outcome = run_batches(journal, backend.rag, backend.ledger, settings, data_dir,
                                  plan.queries_this_run, should_stop, on_batch)
        files = write_outputs(journal, Path(job_dir), output_format)
        counts = journal.counts()
        ledger = backend.ledger.summary().as_dict()
        ledger.pop("releases", None)
        this_run = {
            "status": outcome.status, "queries_charged": outcome.queries_charged,
            "images_written": outcome.images_written, "batches": outcome.batches,
            "batch_size": batch_size, "seconds": round(outcome.seconds, 3),
            "images_per_s": round(outcome.images_written / max(outcome.seconds, 1e-9), 4),
            "queries_per_s": round(outcome.queries_charged / max(outcome.seconds, 1e-9), 4),
            "timings_s": outcome.timings.as_dict(),
            "journal_share": round(outcome.timings.journal / max(outcome.seconds, 1e-9), 5),
            "batches_found_lost": lost, "stray_files_removed": cleaned}
        journal.finish_run(run, this_run)
        summary = {"job_id": params["job_id"], "status": outcome.status, **counts,
                   "images_total": total, "ledger_after": ledger,
                   "crash_note": ("a crash wastes at most the one batch charged but not yet "
                                  f"journaled (<= {batch_size} queries); lost batches are "
                                  "counted in batches_lost / queries_lost_at_most"),
                   "this_run": this_run, "runs": journal.runs(), "params": params}
        files["summary"] = str(write_summary(summary, Path(job_dir)))
        journal.close()
        return dict(status=outcome.status, totals=counts, this_run=this_run,
                    ledger_after=ledger, files=files)

    with cli_errors(as_json):
        result = compute()
    emit(result, as_json, "synthesis")
    if result.get("status") == "interrupted":
        raise typer.Exit(code=130)
