"""The ``dprdm`` command line: one typer sub-app per concern, all policy in the library.

Every command that the docs name takes ``--json`` and then prints exactly one JSON object on
stdout; without it, output is rendered with rich for people. Errors go to stderr with exit code 2
and never carry private data.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version as _package_version

import typer
from typer._click.exceptions import UsageError  # typer vendors click (pinned)

from dprdm.cli import (audit, budget, encoders, evaluate, generate, index, keys, privacy,
                       retrieve, serve, synthesize, train)

app = typer.Typer(
    name="dprdm",
    help="Differentially private retrieval-augmented image generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dprdm {_package_version('dprdm')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Differentially private retrieval-augmented image generation."""


app.add_typer(privacy.app, name="privacy")
app.add_typer(index.app, name="index")
app.add_typer(budget.app, name="budget")
app.add_typer(encoders.app, name="encoders")
app.add_typer(keys.app, name="keys")
app.command(name="retrieve")(retrieve.retrieve)
app.command(name="generate")(generate.generate)
app.command(name="synthesize")(synthesize.synthesize)
app.command(name="audit")(audit.audit)
app.command(name="train")(train.train)
app.command(name="serve")(serve.serve)
app.command(name="eval")(evaluate.evaluate)


def main() -> None:
    """Run the CLI. A usage error (unknown option, missing argument) with --json on the command
    line is printed as the same JSON error object as every other refusal, exit code 2."""
    try:
        code = app(standalone_mode=False)
    except UsageError as error:
        if "--json" in sys.argv[1:]:
            sys.stdout.write(json.dumps({"error": "invalid_parameter",
                                         "message": error.format_message()}) + "\n")
        error.show()
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
