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

LEDGER_OPTION = typer.Option(
    None, "--ledger",
    help="A postgresql:// URL of the index's ledger (shared by several replicas; no password in "
         "it: use PGPASSWORD, ~/.pgpass or a libpq service). Default: the one the index "
         "manifest names, else ledger.sqlite in the index directory.")
RAY_PRIVATE_NETWORK = (
    "SECURITY: Ray has no per-user authentication (CVE-2023-48022 'ShadowRay'): whoever reaches "
    "the cluster can read raw private embeddings from a shard actor, bypassing the ledger. The "
    "Ray network must be private to the operator (private bind addresses, Ray ports firewalled, "
    "no dashboard); see docs/scaling.md.")
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
        table.add_row(str(key), human(value))
    console.print(table)


def human(value: Any) -> str:
    """A value as people read it: floats to 6 significant digits, a mapping as `key value`
    pairs, a list one item a line (no Python reprs)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {human(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "\n".join(human(v) for v in value) if value else "-"
    return str(value)


def error_object(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The one shape of a CLI error on stdout with --json (codes: docs/cli.md)."""
    return {"error": code, "message": message, **extra}


def _print_error(as_json: bool, code: str, message: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(error_object(code, message)) + "\n")
        sys.stdout.flush()
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)


@contextmanager
def cli_errors(as_json: bool = False) -> Iterator[None]:
    """Turn every failure into one error (a JSON object with --json) and an exit code.

    dprdm's deliberate errors and refused file operations (a path that cannot be read or written)
    exit 2 with a stable code; anything else is a bug: exit 1, ``internal_error``, and the
    traceback on stderr for the operator. typer's own exits pass through untouched."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except DprdmError as error:
        _print_error(as_json, error.code, str(error))
        raise typer.Exit(code=2) from None
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        _print_error(as_json, "io_error", f"{error.strerror or error}{where}")
        raise typer.Exit(code=2) from None
    except Exception as error:
        if as_json:
            sys.stdout.write(json.dumps(error_object(
                "internal_error", f"internal error ({type(error).__name__}); see stderr")) + "\n")
            sys.stdout.flush()
        raise


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
