"""The ``dprdm`` command line: one typer sub-app per concern, all policy in the library.

Every command that the docs name takes ``--json`` and then prints exactly one JSON object on
stdout; without it, output is rendered with rich for people. Errors go to stderr with exit code 2
and never carry private data.
"""

from __future__ import annotations

import typer

from dprdm.cli import (audit, budget, encoders, evaluate, generate, index, keys, privacy,
                       retrieve, serve, train)

app = typer.Typer(
    name="dprdm",
    help="Differentially private retrieval-augmented image generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(privacy.app, name="privacy")
app.add_typer(index.app, name="index")
app.add_typer(budget.app, name="budget")
app.add_typer(encoders.app, name="encoders")
app.add_typer(keys.app, name="keys")
app.command(name="retrieve")(retrieve.retrieve)
app.command(name="generate")(generate.generate)
app.command(name="audit")(audit.audit)
app.command(name="train")(train.train)
app.command(name="serve")(serve.serve)
app.command(name="eval")(evaluate.evaluate)


def main() -> None:
    app()
