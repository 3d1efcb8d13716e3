"""Running a synthesis job batch by batch, in the one order that never loses budget silently:

    journal.begin_batch -> ledger charge + release (RetrievalAugmentedGenerator.conditions)
    -> journal.commit_releases -> generation -> atomic image writes -> journal.mark_done

A batch is at most ``batch_size`` prompts, so a crash wastes at most that many queries (the batch
charged but not yet journaled, found in state ``charging`` and reported as lost on the next run).
Prompts already released are never charged again: their images come from the journaled condition.
The stop flag (Ctrl-C) is read between batches only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dprdm.errors import BudgetExceededError
from dprdm.image_files import save_png
from dprdm.privacy import accounting
from dprdm.synthesis.journal import Journal


class ReceiptLedger:
    """A ledger that keeps the receipt of its last charge (the private step discards it), so the
    journal gets the ledger's query total after a batch without a second ledger read."""

    def __init__(self, ledger) -> None:
        self.ledger = ledger
        self.last = None

    def charge(self, params, count: int = 1, caller: str = ""):
        self.last = self.ledger.charge(params, count, caller=caller)
        return self.last

    def __getattr__(self, name: str):
        return getattr(self.ledger, name)


@dataclass(frozen=True)
class BatchSettings:
    images_per_prompt: int
    steps: int
    guidance: float
    seed: int | None  # the diffusion sampler's only; never the privacy noise
    batch_size: int  # prompts per batch = the most queries one batch charges
    caller_prefix: str  # ledger caller: "<prefix>:batch<N>" names each charge
    single_mechanism_ledger: bool = False  # see ledger_epsilon
    content_guidance: float | None = None  # split guidance (demo pipeline); None: plain CFG


@dataclass
class Timings:
    release: float = 0.0  # ledger charge + private retrieval + noise
    accounting: float = 0.0  # the ledger's epsilon after each batch (PLD)
    journal: float = 0.0  # journal commits (the overhead the benchmark watches)
    generation: float = 0.0
    writing: float = 0.0

    def as_dict(self) -> dict:
        return {key: round(value, 3) for key, value in asdict(self).items()}


@dataclass
class RunResult:
    status: str  # "complete" | "partial" | "interrupted" | "budget_exhausted"
    queries_charged: int = 0
    images_written: int = 0
    batches: int = 0
    seconds: float = 0.0
    timings: Timings = field(default_factory=Timings)


def image_file_name(prompt_idx: int, image_idx: int) -> str:
    return f"{prompt_idx:07d}_{image_idx:02d}.png"


def clean_data_dir(journal: Journal, data_dir: Path) -> int:
    """Remove what a killed run may have left: temporary files of unfinished atomic writes and
    images written but not yet marked done (they are regenerated). Returns how many."""
    done = {name for _, _, name in journal.image_rows()}
    removed = 0
    for path in data_dir.iterdir():
        stray_tmp = path.name.startswith(".") and ".png." in path.name
        unjournaled = (path.suffix == ".png" and not path.name.startswith(".")
                       and path.name not in done)
        if path.is_file() and (stray_tmp or unjournaled) and path.name != "metadata.jsonl":
            path.unlink()
            removed += 1
    return removed


def ledger_epsilon(ledger: ReceiptLedger, single_mechanism: bool) -> float:
    """The ledger's epsilon after the last charge. For a ledger whose releases all use one
    mechanism (every ledger once the mechanism is pinned at ``budget init``) it is the PLD epsilon
    of the receipt's query total -- one accountant call; otherwise the ledger's full summary."""
    receipt = ledger.last
    if single_mechanism and receipt is not None:
        return accounting.epsilon_for(receipt.params, receipt.queries_total, ledger.delta)
    return ledger.summary().epsilon_spent


def _sampler(seed: int | None, first_prompt: int) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed * 1_000_003 + first_prompt)


def run_batches(journal: Journal, rag, ledger: ReceiptLedger, settings: BatchSettings,
                data_dir: Path, query_cap: int, should_stop: Callable[[], bool],
                on_batch: Callable[[int, int, float], None] | None = None) -> RunResult:
    """Release, generate and write every unfinished prompt, charging at most `query_cap`.
    `on_batch(images_written, queries_charged, ledger_epsilon)` is called after each batch."""
    started = time.perf_counter()
    result, t = RunResult("complete"), Timings()
    result.timings = t
    n = settings.images_per_prompt
    prompts = {idx: (text, key) for idx, text, _, _, key in journal.prompts()}
    todo = journal.unfinished_prompts(n)
    for start in range(0, len(todo), settings.batch_size):
        if should_stop():
            result.status = "interrupted"
            break
        batch = todo[start:start + settings.batch_size]
        keys = list(dict.fromkeys(prompts[p][1] for p in batch))
        tic = time.perf_counter()
        missing = [key for key in keys if key not in journal.released_keys(keys)]
        missing = missing[:max(0, query_cap - result.queries_charged)]
        t.journal += time.perf_counter() - tic
        if missing:
            tic = time.perf_counter()
            batch_id, caller = journal.begin_batch(len(missing), settings.caller_prefix)
            t.journal += time.perf_counter() - tic
            tic = time.perf_counter()
            try:
                conditions = rag.conditions([prompts[key][0] for key in missing],
                                            public_only=False, caller=caller)
            except BudgetExceededError:
                journal.refuse_batch(batch_id)  # nothing was charged
                result.status = "budget_exhausted"
                break
            t.release += time.perf_counter() - tic
            tic = time.perf_counter()
            journal.commit_releases(batch_id, missing, conditions, ledger.last.queries_total)
            t.journal += time.perf_counter() - tic
            result.queries_charged += len(missing)
            result.batches += 1
            tic = time.perf_counter()  # after the commit: outside the crash window
            epsilon = ledger_epsilon(ledger, settings.single_mechanism_ledger)
            journal.set_epsilon(epsilon, batch_id)
            t.accounting += time.perf_counter() - tic
        else:
            epsilon = None
        tic = time.perf_counter()
        released = journal.conditions(keys)
        done = journal.done_images(batch)
        t.journal += time.perf_counter() - tic
        work = [(p, i) for p in batch if prompts[p][1] in released for i in range(n)
                if (p, i) not in done]
        if work:
            tic = time.perf_counter()
            split = {}
            if settings.content_guidance is not None:  # the prompts' own (public) text
                split = {"content_conditions": rag.backend.embed_prompts(
                    [prompts[p][0] for p, _ in work]),
                    "content_guidance": settings.content_guidance}
            images = rag.backend.pipeline(np.stack([released[prompts[p][1]][0] for p, _ in work]),
                                          guidance=settings.guidance, steps=settings.steps,
                                          generator=_sampler(settings.seed, batch[0]), **split)
            t.generation += time.perf_counter() - tic
            tic = time.perf_counter()
            written = []
            for (p, i), image in zip(work, np.asarray(images)):
                name = image_file_name(p, i)
                save_png(data_dir / name, image)
                written.append((p, i, name))
            t.writing += time.perf_counter() - tic
            tic = time.perf_counter()
            journal.mark_done(written)
            t.journal += time.perf_counter() - tic
            result.images_written += len(written)
        if on_batch is not None:
            on_batch(result.images_written, result.queries_charged, epsilon)
    if result.status == "complete" and journal.unfinished_prompts(n):
        result.status = "partial"  # the query cap (--max-queries / --partial) left some out
    result.seconds = time.perf_counter() - started
    return result
