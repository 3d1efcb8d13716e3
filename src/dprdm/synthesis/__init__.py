"""`dprdm synthesize`: a resumable, journaled DP synthetic-data job.

* :mod:`.prompts` reads and checks a prompt file (.txt/.csv/.tsv/.jsonl) before anything is spent;
* :mod:`.plan` says what the job will cost and whether the budget can afford it;
* :mod:`.journal` is the job's SQLite journal (parameters, released conditions, image states);
* :mod:`.runner` runs the batches in the order charge -> release -> journal -> generate -> write;
* :mod:`.output` writes the imagefolder's metadata.jsonl, parquet, summary.json, contact sheet;
* :mod:`.scoring` scores a finished job against held-out images (``dprdm eval --synthetic``).
"""

from dprdm.synthesis.journal import Journal
from dprdm.synthesis.plan import JobPlan, make_plan
from dprdm.synthesis.prompts import PromptFile, PromptRow, read_prompts

__all__ = ["Journal", "JobPlan", "PromptFile", "PromptRow", "make_plan", "read_prompts"]
