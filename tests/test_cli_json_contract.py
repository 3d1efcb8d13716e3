"""The CLI's JSON contract, walked over every command: with --json, every refusal prints exactly
one JSON object {"error": code, "message": ...} on stdout, with a documented code and exit 2.

The table below must name every command the CLI has (a new command fails the first test until
its error path is added here), so no command can ship without a tested error path.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import typer

from dprdm import errors
from dprdm.cli import app, main

# Stable codes a script may see (docs/cli.md lists them).
DOCUMENTED_CODES = {
    "error", "invalid_parameter", "budget_exhausted", "index_error", "not_found", "io_error",
    "model_unavailable", "unreadable_image", "ledger_binding", "shard_unavailable",
}


def _commands(command, path=()):
    sub = getattr(command, "commands", None)
    if sub:
        for name, child in sub.items():
            yield from _commands(child, path + (name,))
    else:
        yield " ".join(path)


def _bad_calls(tmp) -> dict[str, list[str]]:
    """One refused invocation per command (a missing index, an impossible parameter, ...)."""
    missing = str(tmp / "no-such-dir")
    npy = str(tmp / "no-such.npy")
    out = str(tmp / "out")
    return {
        "retrieve": ["retrieve", missing, "--query-emb", npy, "--out", str(tmp / "r.npy")],
        "generate": ["generate", "red apple", "--index", missing, "--out", out],
        "audit": ["audit", "--k", "0"],
        "synthesize": ["synthesize", "--prompts", str(tmp / "no-such.txt"), "--index", missing,
                       "--out", out],
        "train": ["train", "--stage", "denoiser", "--data", missing, "--out", out],
        "serve": ["serve", "--index", missing],
        "eval": ["eval", "--index", missing, "--holdout", missing, "--out", out],
        "privacy epsilon": ["privacy", "epsilon", "--sigma", "-1", "--q", "0.1", "--k", "10",
                            "--queries", "10", "--delta", "1e-5"],
        "privacy calibrate": ["privacy", "calibrate", "--epsilon", "0", "--q", "0.1", "--k", "10",
                              "--queries", "10", "--delta", "1e-5"],
        "privacy max-queries": ["privacy", "max-queries", "--sigma", "1", "--q", "2", "--k", "10",
                                "--epsilon", "1", "--delta", "1e-5"],
        "privacy noise-ratio": ["privacy", "noise-ratio", "--sigma", "0.1", "--k", "0",
                                "--dim", "512"],
        "index build": ["index", "build", npy, "--out", out],
        "index info": ["index", "info", missing],
        "index verify": ["index", "verify", missing],
        "index quantize": ["index", "quantize", missing, "--public", npy, "--nlist", "4"],
        "index shard": ["index", "shard", missing, "--shards", "2", "--out", out],
        "index serve-shards": ["index", "serve-shards", missing, "--ray-address", "local"],
        "budget init": ["budget", "init", missing, "--epsilon", "1", "--delta", "1e-6",
                        "--k", "10", "--q", "0.1", "--sigma", "1"],
        "budget show": ["budget", "show", missing],
        "budget set-mechanism": ["budget", "set-mechanism", missing, "--k", "10", "--q", "0.1",
                                 "--sigma", "1"],
        "budget style-estimate": ["budget", "style-estimate", missing, "--prompts",
                                  str(tmp / "no-such.txt")],
        "encoders info": ["encoders", "info", "--encoder", missing],
        "encoders embed": ["encoders", "embed", "--images", missing, "--out", npy],
        "encoders train-demo": ["encoders", "train-demo", "--data", missing, "--out", out],
        "encoders evaluate": ["encoders", "evaluate", "--data", missing],
        "keys create": ["keys", "create", "alice", "--index", missing],
        "keys list": ["keys", "list", "--index", missing],
        "keys revoke": ["keys", "revoke", "alice", "--index", missing],
    }


def _run(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["dprdm", *argv])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().out


def test_every_command_has_a_tested_error_path(tmp_path):
    commands = set(_commands(typer.main.get_command(app)))
    assert commands == set(_bad_calls(tmp_path)), (
        "add the new command's refused invocation to _bad_calls")


@pytest.mark.parametrize("command", sorted(_bad_calls(__import__("pathlib").Path("/x"))))
def test_refused_input_is_one_json_error_with_a_stable_code_and_exit_2(
        command, tmp_path, monkeypatch, capsys):
    code, stdout = _run([*_bad_calls(tmp_path)[command], "--json"], monkeypatch, capsys)
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    error = json.loads(lines[0])
    assert set(error) >= {"error", "message"} and error["message"], error
    assert error["error"] in DOCUMENTED_CODES, error
    assert code == 2, (code, error)
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.npy").exists()


@pytest.mark.parametrize("command", sorted(_bad_calls(__import__("pathlib").Path("/x"))))
def test_a_usage_error_with_json_is_the_same_json_error(command, tmp_path, monkeypatch, capsys):
    argv = [*command.split(), "--no-such-option", "--json"]
    code, stdout = _run(argv, monkeypatch, capsys)
    error = json.loads(stdout.strip().splitlines()[-1])
    assert error["error"] == "invalid_parameter" and "--no-such-option" in error["message"]
    assert code == 2


def test_every_error_class_has_a_documented_code():
    import dprdm.data.images  # noqa: F401  (modules that define error classes)
    import dprdm.encoders.base  # noqa: F401
    import dprdm.evaluation.classifiers  # noqa: F401
    import dprdm.evaluation.metrics  # noqa: F401
    import dprdm.privacy.sharded  # noqa: F401

    classes = [errors.DprdmError]
    found = set()
    while classes:
        cls = classes.pop()
        found.add(cls.code)
        classes.extend(cls.__subclasses__())
    assert found <= DOCUMENTED_CODES, found - DOCUMENTED_CODES


def test_an_unwritable_destination_is_an_io_error_not_a_traceback(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, stdout = _run(["index", "build", str(blocker), "--out", str(blocker / "idx"), "--json"],
                        monkeypatch, capsys)
    error = json.loads(stdout.strip())
    assert code == 2 and error["error"] in {"io_error", "invalid_parameter", "index_error"}


# ---- --ray-address: every command that takes it ---------------------------------------------
RAY_PRIVATE = "must be private to the operator"


def _ray_calls(tmp) -> dict[str, list[str]]:
    """Per command taking --ray-address, a refused use of it: on an index that is not sharded,
    `local` with several service workers, or `local` for detached actors."""
    import numpy as np

    from dprdm.privacy import MechanismParams, init_budget
    from dprdm.retrieval import build_index
    from dprdm.retrieval.shards import shard_index

    plain, sharded = tmp / "plain", tmp / "sharded"
    build_index(np.random.default_rng(0).standard_normal((40, 64)), plain)
    shard_index(plain, sharded, 2)
    for index in (plain, sharded):
        init_budget(index, 1.0, 1e-5, MechanismParams(1.0, 0.5, 4))
    np.save(tmp / "q.npy", np.ones((1, 64)))
    out, local = str(tmp / "out"), ["--ray-address", "local"]
    return {
        "retrieve": ["retrieve", str(plain), "--query-emb", str(tmp / "q.npy"), "--out",
                     str(tmp / "r.npy"), *local],
        "generate": ["generate", "red apple", "--index", str(plain), "--out", out, *local],
        "serve": ["serve", "--index", str(sharded), "--workers", "2", *local],
        "eval": ["eval", "--index", str(plain), "--holdout", str(tmp / "none"), "--out", out,
                 *local],
        "index serve-shards": ["index", "serve-shards", str(sharded), *local],
    }


def _ray_option(command_name):
    command = typer.main.get_command(app)
    for part in command_name.split():
        command = command.commands[part]
    return next((p for p in command.params if "--ray-address" in p.opts), None)


def test_every_ray_address_option_is_tested_and_says_the_ray_network_must_be_private(tmp_path):
    taking = {name for name in _commands(typer.main.get_command(app)) if _ray_option(name)}
    assert taking == set(_ray_calls(tmp_path))
    for name in taking:
        assert RAY_PRIVATE in " ".join(_ray_option(name).help.split()), name


@pytest.mark.parametrize("command", ["retrieve", "generate", "serve", "eval",
                                     "index serve-shards"])
def test_a_refused_ray_address_is_one_json_error_and_charges_nothing(command, tmp_path,
                                                                     monkeypatch, capsys):
    from dprdm.privacy import SqliteLedger

    argv = _ray_calls(tmp_path)[command]
    code, stdout = _run([*argv, "--json"], monkeypatch, capsys)
    error = json.loads(stdout.strip())
    assert code == 2 and error["error"] == "invalid_parameter", error
    assert ("sharded index" in error["message"] or "--workers" in error["message"]
            or "running cluster" in error["message"]), error
    for index in ("plain", "sharded"):
        assert SqliteLedger(tmp_path / index).summary().queries == 0
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.npy").exists()
