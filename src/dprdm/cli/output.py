"""Shared CLI output: one JSON object on stdout with --json, rich tables for people, clean errors."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dprdm.errors import DprdmError

console = Console()
err_console = Console(stderr=True)

JSON_OPTION = typer.Option(False, "--json", help="Print exactly one JSON object on stdout.")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def emit(result: Mapping[str, Any], as_json: bool, title: str = "") -> None:
    """Print `result` as one JSON object (as_json) or as a two-column rich table."""
    if as_json:
        sys.stdout.write(json.dumps(_jsonable(result), sort_keys=False) + "\n")
        sys.stdout.flush()
        return
    table = Table(title=title or None, show_header=False)
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        table.add_row(str(key), str(value))
    console.print(table)


@contextmanager
def cli_errors(as_json: bool = False) -> Iterator[None]:
    """Turn dprdm's deliberate errors into a one-line message and exit code 2 (no traceback)."""
    try:
        yield
    except DprdmError as error:
        if as_json:
            sys.stdout.write(
                json.dumps({"error": type(error).__name__, "message": str(error)}) + "\n"
            )
        err_console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(code=2) from None


def run_command(as_json: bool, title: str, compute: Callable[[], Mapping[str, Any]]) -> None:
    with cli_errors(as_json):
        result = compute()
    emit(result, as_json, title)


@contextmanager
def progress_callback(label: str, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A `(done, total) -> None` callback drawing a transient progress bar on stderr (or None)."""
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=1, visible=False)  # the total arrives with the first call
        yield lambda done, total: bar.update(task, completed=done, total=total, visible=True)
