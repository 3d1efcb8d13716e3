"""What a synthesis job will cost, decided before anything is charged.

:func:`make_plan` counts prompts, distinct prompts and the queries still to charge (one per
distinct prompt with ``reuse_identical``, else one per prompt; prompts already released in the
journal cost nothing), reads the ledger's remaining budget, and decides how many queries this run
may charge: all of them, or -- only when the user said so -- ``max_queries`` or what the budget
still affords (``partial``). Otherwise an unaffordable job is refused with the plan in the message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dprdm.errors import BudgetExceededError, InvalidParameterError
from dprdm.privacy import accounting


@dataclass(frozen=True)
class JobPlan:
    prompts: int
    distinct_prompts: int
    reuse_identical: bool
    images_per_prompt: int
    images_to_generate: int
    queries_needed: int  # still to charge for the whole job (released prompts excluded)
    already_released: int
    queries_this_run: int  # what this run may charge (capped by max_queries / partial)
    budget_epsilon: float
    delta: float
    epsilon_spent: float
    queries_remaining_in_budget: int
    epsilon_after: float | None  # the ledger's epsilon once this run's queries are charged
    estimated_seconds: float | None
    covers_whole_job: bool
    single_mechanism_ledger: bool  # every release so far used the job's mechanism

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [
            f"{self.prompts:,} prompts, {self.distinct_prompts:,} distinct"
            + (" (identical prompts share one release)" if self.reuse_identical else ""),
            f"{self.images_to_generate:,} images to generate ({self.images_per_prompt} a prompt)",
            f"queries needed {self.queries_needed:,} (already released: "
            f"{self.already_released:,}); this run charges at most {self.queries_this_run:,}",
            f"budget: epsilon {self.epsilon_spent:.4g} of {self.budget_epsilon:g} spent "
            f"(delta {self.delta:g}), {self.queries_remaining_in_budget:,} queries left",
        ]
        if self.epsilon_after is not None:
            lines.append(f"epsilon after this run: {self.epsilon_after:.4g}")
        if self.estimated_seconds is not None:
            seconds = self.estimated_seconds
            lines.append(f"estimated time: {seconds / 60:.1f} min" if seconds >= 60
                         else f"estimated time: {seconds:.3g} s")
        return "\n".join(lines)


def queries_to_charge(release_keys: list[int], released: set[int]) -> int:
    return len(set(release_keys) - released)


def rounded_seconds(seconds: float) -> float:
    """An estimate to 3 significant digits: a short job's stays above 0 (0.1 s steps showed 0)."""
    return float(f"{seconds:.3g}")


def make_plan(*, release_keys: list[int], released: set[int], distinct_prompts: int,
              reuse_identical: bool, images_per_prompt: int,
              images_to_generate: int, ledger, params, max_queries: int | None,
              partial: bool, seconds_per_image: float | None = None) -> JobPlan:
    """The job's plan; raises BudgetExceededError (nothing charged) when the budget cannot
    afford what the job needs and neither `max_queries` nor `partial` says what to do."""
    if max_queries is not None and (isinstance(max_queries, bool) or max_queries < 0):
        raise InvalidParameterError("--max-queries must be a whole number >= 0")
    distinct = distinct_prompts
    needed = queries_to_charge(release_keys, released)
    summary = ledger.summary()
    remaining = ledger.remaining_queries(params)
    this_run = needed if max_queries is None else min(needed, max_queries)
    if this_run > remaining:
        if not partial:
            raise BudgetExceededError(
                f"the job needs {this_run:,} more quer{'y' if this_run == 1 else 'ies'} "
                f"({len(release_keys):,} prompts, {distinct:,} distinct, {len(released):,} "
                f"already released) but the budget affords {remaining:,} (epsilon "
                f"{summary.epsilon_spent:.4g} of {summary.epsilon_budget:g} spent). Nothing was "
                "charged. Pass --max-queries M or --partial to synthesize what fits.")
        this_run = remaining
    groups = dict(summary.releases)
    epsilon_after = None
    if this_run:
        groups[params] = groups.get(params, 0) + this_run
        epsilon_after = accounting.epsilon(list(groups.items()), summary.delta)
    return JobPlan(
        prompts=len(release_keys), distinct_prompts=distinct,
        reuse_identical=reuse_identical,
        images_per_prompt=images_per_prompt, images_to_generate=images_to_generate,
        queries_needed=needed, already_released=len(released), queries_this_run=this_run,
        budget_epsilon=summary.epsilon_budget, delta=summary.delta,
        epsilon_spent=summary.epsilon_spent, queries_remaining_in_budget=remaining,
        epsilon_after=epsilon_after,
        estimated_seconds=(None if seconds_per_image is None
                           else rounded_seconds(seconds_per_image * images_to_generate)),
        covers_whole_job=this_run == needed,
        single_mechanism_ledger=set(dict(summary.releases)) <= {params})
