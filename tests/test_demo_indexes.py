"""The demo's indexes record the image tower that embedded them (dprdm.demo).

Before, they recorded none, so `--demo` with another encoder searched vectors of another space
without a word, and an index embedded by an older shipped encoder was reused after an upgrade.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dprdm import demo
from dprdm.cli import app
from dprdm.encoders import load_encoder
from dprdm.generation.backends.base import SPACE_FILE, ConditioningSpace
from dprdm.generation.backends.demo import encoder_space
from dprdm.privacy import open_private_index

runner = CliRunner()


def write_folder(folder, n, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with (folder / "captions.jsonl").open("w") as f:
        for i in range(n):
            image = np.full((32, 32, 3), 255, np.uint8)
            image[8:24, 8:24] = rng.integers(0, 256, 3)  # a coloured square on white
            Image.fromarray(image).save(folder / f"{i}.png")
            f.write(json.dumps({"file": f"{i}.png", "caption": f"thing {i}"}) + "\n")


@pytest.fixture()
def demo_root(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    for split, n, seed in (("openmoji_private", 20, 0), ("twemoji", 12, 1), ("google", 12, 2)):
        write_folder(root / "data" / split, n, seed)
    monkeypatch.setenv("DPRDM_DEMO_ROOT", str(root))
    return root


@pytest.fixture(scope="module")
def shipped():
    return load_encoder("demo")


@pytest.fixture()
def other(shipped, tmp_path):
    """The shipped encoder with its first weight nudged: another image tower."""
    encoder = load_encoder("demo")
    with torch.no_grad():
        next(encoder.parameters()).add_(0.05)
    encoder.save_pretrained(tmp_path / "other-encoder")
    assert encoder_space(encoder).fingerprint != encoder_space(shipped).fingerprint
    return encoder


def spend(private, queries=3):
    _, ledger = open_private_index(private)
    ledger.charge(ledger.mechanism, count=queries)
    return ledger.summary().queries


def test_the_demo_indexes_record_the_encoder_and_are_reused_with_their_ledger(
        demo_root, shipped):
    demo.prepare_indexes(shipped)
    space = encoder_space(shipped)
    for name in ("private", "public"):
        assert ConditioningSpace.load(demo_root / name) == space
    assert spend(demo_root / "private") == 3
    demo.prepare_indexes(shipped)  # the same tower: reused, the ledger keeps counting
    _, ledger = open_private_index(demo_root / "private")
    assert ledger.summary().queries == 3


def test_a_ledger_pinned_at_an_older_demo_lam_is_kept_and_the_new_mix_is_named(
        demo_root, shipped, monkeypatch, capsys):
    current = demo.DEMO_LAM
    assert current != 0.5
    monkeypatch.setattr(demo, "DEMO_LAM", 0.5)  # as an older dprdm pinned it
    demo.prepare_indexes(shipped)
    assert spend(demo_root / "private") == 3
    monkeypatch.setattr(demo, "DEMO_LAM", current)
    capsys.readouterr()
    demo.prepare_indexes(shipped)
    said = capsys.readouterr().out
    _, ledger = open_private_index(demo_root / "private")
    assert ledger.lam == 0.5 and ledger.summary().queries == 3  # never re-armed for a new mix
    assert f"--lam {current}" in said


def test_an_unrecorded_index_of_the_same_encoder_is_checked_and_kept(demo_root, shipped):
    demo.prepare_indexes(shipped)
    spend(demo_root / "private")
    for name in ("private", "public"):  # as built before the demo recorded the tower
        (demo_root / name / SPACE_FILE).unlink()
    demo.prepare_indexes(shipped)
    _, ledger = open_private_index(demo_root / "private")
    assert ledger.summary().queries == 3  # embedded again: same vectors, same data set
    for name in ("private", "public"):
        assert ConditioningSpace.load(demo_root / name) == encoder_space(shipped)


def test_an_index_of_another_encoder_is_rebuilt_as_a_new_data_set(demo_root, shipped, other,
                                                                   capsys):
    demo.prepare_indexes(other)
    spend(demo_root / "private")
    for name in ("private", "public"):  # the unrecorded case: found by embedding again
        (demo_root / name / SPACE_FILE).unlink()
    demo.prepare_indexes(shipped)
    said = capsys.readouterr().out
    assert "another image tower" in said and "new budget" in said
    _, ledger = open_private_index(demo_root / "private")
    assert ledger.summary().queries == 0  # a new data set: the old ledger went with the index
    for name in ("private", "public"):
        assert ConditioningSpace.load(demo_root / name) == encoder_space(shipped)


def test_demo_with_another_encoder_is_refused_before_anything_is_spent(demo_root, shipped,
                                                                       other, tmp_path):
    demo.prepare_indexes(shipped)
    result = runner.invoke(app, ["generate", "thing 1", "--demo", "--encoder",
                                 str(tmp_path / "other-encoder"), "--out",
                                 str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "another image tower" in result.output
    _, ledger = open_private_index(demo_root / "private")
    assert ledger.summary().queries == 0 and not (tmp_path / "out").exists()
