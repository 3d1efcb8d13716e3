"""Reading a job's prompt file: every line checked, bad ones named by line number, before any
query is charged.

Formats (by extension): ``.txt`` one prompt a line (blank lines skipped); ``.csv`` / ``.tsv`` with
a header holding a ``prompt`` (else ``caption``) column, other columns carried as metadata
(strings); ``.jsonl`` one object a line with ``"prompt"`` (else ``"caption"``), every other key a
metadata column (JSON scalars, one type per column). Refused: an empty or binary file, text that
is not UTF-8, a missing column, empty or over-long prompts, control characters, metadata columns
that clash with the output's own columns.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from dprdm.errors import InvalidParameterError, NotFoundError
from dprdm.rdm import MAX_PROMPT_CHARS

FORMATS = (".txt", ".csv", ".tsv", ".jsonl")
PROMPT_COLUMNS = ("prompt", "caption")
MAX_JOB_PROMPTS = 1_000_000
MAX_FILE_BYTES = 512 * 2**20
MAX_REPORTED_LINES = 10
# Columns the output writes itself: a metadata column may not take one of these names.
RESERVED_COLUMNS = frozenset({
    "file_name", "prompt", "prompt_index", "image_index", "epsilon_at_release",
    "ledger_queries_at_release", "mechanism", "generator", "encoder", "steps", "guidance",
    "content_guidance", "image", "job_id"})


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    line: int
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PromptFile:
    path: Path
    rows: list[PromptRow]
    sha256: str  # of the file's bytes: identifies the job's prompts on a re-run

    @property
    def distinct(self) -> int:
        return len({row.prompt for row in self.rows})


class _Problems:
    """Collects bad lines; raises one error naming the first few with their line numbers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self.count = 0

    def add(self, line: int, reason: str) -> None:
        self.count += 1
        if len(self.lines) < MAX_REPORTED_LINES:
            self.lines.append(f"line {line}: {reason}")

    def raise_if_any(self) -> None:
        if self.count:
            hidden = self.count - len(self.lines)
            more = f" (and {hidden} more)" if hidden else ""
            raise InvalidParameterError(
                f"{self.path}: {self.count} bad line{'s' if self.count > 1 else ''}{more}; nothing "
                "was charged:\n  " + "\n  ".join(self.lines))


def _check_prompt(text: object, line: int, problems: _Problems) -> str | None:
    if not isinstance(text, str):
        problems.add(line, "the prompt is not a string")
        return None
    text = text.strip()
    if not text:
        problems.add(line, "the prompt is empty")
    elif len(text) > MAX_PROMPT_CHARS:
        problems.add(line, f"the prompt has {len(text)} characters (at most {MAX_PROMPT_CHARS})")
    elif any(ord(ch) < 32 and ch != "\t" for ch in text):
        problems.add(line, "the prompt holds control characters")
    else:
        return text
    return None


def _decode(path: Path, data: bytes) -> str:
    if not data.strip():
        raise InvalidParameterError(f"{path} is empty: no prompts, nothing was charged")
    if b"\x00" in data:
        line = data[:data.index(b"\x00")].count(b"\n") + 1
        raise InvalidParameterError(
            f"{path} is a binary file (NUL byte on line {line}), not a prompt file; nothing was "
            "charged")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InvalidParameterError(
            f"{path}: line {line} is not UTF-8 text; nothing was charged") from None


def _read_txt(text: str, problems: _Problems) -> list[PromptRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            prompt = _check_prompt(line, number, problems)
            if prompt is not None:
                rows.append(PromptRow(prompt, number))
    return rows


def _check_columns(path: Path, columns: list[str], prompt_column: str) -> None:
    clash = sorted(set(columns) & RESERVED_COLUMNS - {prompt_column})
    if clash:
        raise InvalidParameterError(
            f"{path}: metadata column{'s' if len(clash) > 1 else ''} {', '.join(clash)} clash "
            f"with the output's own columns; rename {'them' if len(clash) > 1 else 'it'}")


def _read_delimited(path: Path, text: str, delimiter: str, problems: _Problems) -> list[PromptRow]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [name.strip() for name in next(reader)]
    except (StopIteration, csv.Error) as error:
        raise InvalidParameterError(f"{path}: no header row ({error})") from None
    column = next((name for name in PROMPT_COLUMNS if name in header), None)
    if column is None:
        raise InvalidParameterError(
            f"{path}: no `prompt` or `caption` column (the header has: "
            f"{', '.join(header) or 'nothing'}); nothing was charged")
    if len(set(header)) != len(header):
        raise InvalidParameterError(f"{path}: the header repeats a column name")
    _check_columns(path, header, column)
    at = header.index(column)
    rows = []
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            problems.add(reader.line_num, f"not valid {path.suffix[1:]} ({error})")
            continue
        number = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            problems.add(number, f"{len(cells)} fields, the header has {len(header)}")
            continue
        prompt = _check_prompt(cells[at], number, problems)
        if prompt is not None:
            metadata = {name: cells[i] for i, name in enumerate(header) if i != at}
            rows.append(PromptRow(prompt, number, metadata))
    return rows


SCALAR_TYPES = {bool: "boolean", int: "number", float: "number", str: "string"}


def _read_jsonl(path: Path, text: str, problems: _Problems) -> list[PromptRow]:
    rows, types = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            problems.add(number, "not valid JSON")
            continue
        if not isinstance(item, dict):
            problems.add(number, "not a JSON object")
            continue
        column = next((name for name in PROMPT_COLUMNS if name in item), None)
        if column is None:
            problems.add(number, "no \"prompt\" (or \"caption\") key")
            continue
        prompt = _check_prompt(item.pop(column), number, problems)
        clash = sorted(set(item) & RESERVED_COLUMNS)
        if clash:
            problems.add(number, f"metadata key {clash[0]!r} clashes with an output column")
            continue
        bad = False
        for key, value in item.items():
            if value is None:
                continue
            kind = SCALAR_TYPES.get(type(value))
            if kind is None:
                problems.add(number, f"metadata {key!r} is not a string, number or boolean")
                bad = True
            elif types.setdefault(key, kind) != kind:
                problems.add(number, f"metadata {key!r} is a {kind}, earlier lines a {types[key]}")
                bad = True
        if prompt is not None and not bad:
            rows.append(PromptRow(prompt, number, item))
    keys = sorted(types)  # every row carries every column (None where absent)
    return [PromptRow(r.prompt, r.line, {k: r.metadata.get(k) for k in keys}) for r in rows]


def read_prompts(path: str | Path) -> PromptFile:
    """Read and check a prompt file; raises InvalidParameterError naming every bad line."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InvalidParameterError(
            f"{path}: prompt files are {', '.join(FORMATS)} (by extension), got {path.suffix!r}")
    if not path.is_file():
        raise NotFoundError(f"no prompt file {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise InvalidParameterError(f"{path} is over {MAX_FILE_BYTES // 2**20} MiB")
    data = path.read_bytes()
    text = _decode(path, data)
    problems = _Problems(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        rows = _read_txt(text, problems)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path, text, problems)
    else:
        rows = _read_delimited(path, text, "\t" if suffix == ".tsv" else ",", problems)
    problems.raise_if_any()
    if not rows:
        raise InvalidParameterError(f"{path} holds no prompts; nothing was charged")
    if len(rows) > MAX_JOB_PROMPTS:
        raise InvalidParameterError(
            f"{path} holds {len(rows):,} prompts; one job takes at most {MAX_JOB_PROMPTS:,}")
    return PromptFile(path, rows, hashlib.sha256(data).hexdigest())
