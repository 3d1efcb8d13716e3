"""`dprdm keys ...`: API keys of the generation service, stored hashed beside the ledger."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dprdm import demo_layout
from dprdm.cli.output import JSON_OPTION, cli_errors, console, emit, err_console, run_command
from dprdm.errors import InvalidParameterError, NotFoundError

app = typer.Typer(help="API keys of the generation service (`dprdm serve`).",
                  no_args_is_help=True)

INDEX_OPTION = typer.Option(None, "--index", help="The private index directory (with a ledger).")
DEMO_OPTION = typer.Option(False, "--demo", help="The index that `make demo` prepared.")


def _store(index: Path | None, demo: bool):
    from dprdm.privacy.ledger import LEDGER_FILENAME
    from dprdm.service.keys import KeyStore

    if demo and index is None:
        index = demo_layout.require(demo_layout.private_index_dir())
    if index is None:
        raise InvalidParameterError("give --index DIR (or --demo)")
    if not (Path(index) / LEDGER_FILENAME).is_file():
        raise NotFoundError(f"{index} has no privacy ledger: keys belong beside an index's ledger")
    return KeyStore(index)


@app.command()
def create(
    name: str = typer.Argument(..., help="A name for the key (letters, digits, _ . -)."),
    index: Path = INDEX_OPTION,
    demo: bool = DEMO_OPTION,
    quota: int = typer.Option(None, "--quota", help="Private queries this key may make."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create an API key and print its token ONCE (only a hash is stored).

    Example: dprdm keys create alice --index private-index/ --quota 100 --json
    """

    def compute() -> dict:
        token, info = _store(index, demo).create(name, quota)
        if not as_json:
            err_console.print("[bold yellow]the token is shown only now: store it safely[/]")
        return {"token": token, **info.as_dict()}

    run_command(as_json, "API key created", compute)


@app.command("list")
def list_keys(
    index: Path = INDEX_OPTION,
    demo: bool = DEMO_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """List the keys: name, created, revoked, quota, queries used (never tokens).

    Example: dprdm keys list --index private-index/ --json
    """
    with cli_errors(as_json):
        keys = [info.as_dict() for info in _store(index, demo).list()]
    if as_json:
        emit({"keys": keys}, True)
        return
    table = Table(title="API keys")
    for column in ("name", "created", "revoked", "quota", "used"):
        table.add_column(column)
    for key in keys:
        table.add_row(key["name"], key["created"], key["revoked"] or "",
                      "" if key["quota"] is None else str(key["quota"]), str(key["used"]))
    console.print(table)


@app.command()
def revoke(
    name: str = typer.Argument(..., help="The key to revoke."),
    index: Path = INDEX_OPTION,
    demo: bool = DEMO_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Revoke a key: its token is refused from now on (its record stays).

    Example: dprdm keys revoke alice --index private-index/
    """
    run_command(as_json, "API key revoked", lambda: _store(index, demo).revoke(name).as_dict())
