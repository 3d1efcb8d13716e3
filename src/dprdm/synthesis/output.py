"""A job's outputs, rebuilt from the journal at the end of every run (complete or not).

``<JOBDIR>/data/``: the images and ``metadata.jsonl``, the layout that
``datasets.load_dataset("imagefolder", data_dir=JOBDIR/data)`` reads (one row per image: file_name,
prompt, prompt_index, image_index, the prompt file's metadata columns, epsilon_at_release,
ledger_queries_at_release, mechanism, generator, encoder, steps, guidance, content_guidance
(null: plain guidance), job_id).
``--format parquet`` adds ``<JOBDIR>/parquet/data.parquet`` (an ``image`` column of
``{"bytes", "path"}`` structs, the datasets convention, plus the same columns).
``summary.json`` holds the totals and timings; ``contact_sheet.png`` a sample, one row a prompt.
Every file is written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from dprdm.files import write_bytes_atomically
from dprdm.image_files import image_grid, png_bytes
from dprdm.synthesis.journal import Journal

DATA_DIR = "data"
METADATA_FILE = "metadata.jsonl"
SUMMARY_FILE = "summary.json"
CONTACT_SHEET = "contact_sheet.png"
PARQUET_FILE = "parquet/data.parquet"
SHEET_PROMPTS, SHEET_IMAGES = 8, 8


def metadata_rows(journal: Journal) -> list[dict]:
    params = journal.params
    prompts = {idx: (text, meta, key) for idx, text, _, meta, key in journal.prompts()}
    images = journal.image_rows()
    released = journal.conditions({prompts[p][2] for p, _, _ in images}) if images else {}
    rows = []
    for p, i, name in images:
        text, meta, key = prompts[p]
        _, queries, epsilon = released[key]
        rows.append({"file_name": name, "prompt": text, "prompt_index": p, "image_index": i,
                     **meta, "epsilon_at_release": epsilon, "ledger_queries_at_release": queries,
                     "mechanism": params["mechanism"], "generator": params["generator"],
                     "encoder": params["encoder"], "steps": params["steps"],
                     "guidance": params["guidance"],
                     "content_guidance": params.get("content_guidance"),
                     "job_id": params["job_id"]})
    return rows


def write_metadata(rows: list[dict], data_dir: Path) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_bytes_atomically(data_dir / METADATA_FILE, text.encode())
    return data_dir / METADATA_FILE


def write_parquet(rows: list[dict], data_dir: Path, job_dir: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([
        {"image": {"bytes": (data_dir / row["file_name"]).read_bytes(),
                   "path": row["file_name"]}, **row} for row in rows])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    path = job_dir / PARQUET_FILE
    path.parent.mkdir(exist_ok=True)
    write_bytes_atomically(path, buffer.getvalue())
    return path


def write_contact_sheet(rows: list[dict], data_dir: Path, job_dir: Path) -> Path | None:
    """The first prompts' images in a grid (None when no prompt has all its images yet)."""
    from PIL import Image

    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    n = max((len(v) for v in by_prompt.values()), default=0)
    chosen = [v for v in by_prompt.values() if len(v) == n][:SHEET_PROMPTS]
    if not chosen:
        return None
    columns = min(n, SHEET_IMAGES)
    grid = np.stack([np.stack([np.asarray(Image.open(data_dir / r["file_name"]).convert("RGB"))
                               for r in rows_[:columns]]) for rows_ in chosen])
    labels = [rows_[0]["prompt"][:40] for rows_ in chosen]
    path = job_dir / CONTACT_SHEET
    write_bytes_atomically(path, png_bytes(image_grid(grid, row_labels=labels)))
    return path


def write_outputs(journal: Journal, job_dir: Path, output_format: str) -> dict[str, str]:
    data_dir = job_dir / DATA_DIR
    rows = metadata_rows(journal)
    files = {"data_dir": str(data_dir), "metadata": str(write_metadata(rows, data_dir))}
    if output_format == "parquet" and rows:
        files["parquet"] = str(write_parquet(rows, data_dir, job_dir))
    sheet = write_contact_sheet(rows, data_dir, job_dir)
    if sheet is not None:
        files["contact_sheet"] = str(sheet)
    return files


def write_summary(summary: dict, job_dir: Path) -> Path:
    path = job_dir / SUMMARY_FILE
    write_bytes_atomically(path, (json.dumps(summary, indent=1) + "\n").encode())
    return path
