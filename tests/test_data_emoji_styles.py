"""The extra public emoji styles (Fluent 3D, Blob): registration, rendering, and preparing them
beside an existing set of splits without touching it.

No npm and no network: the packages are tiny hand-made trees under a temporary folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_emoji import _fake_splits, _no_install, fake_metadata

from dprdm.data import emoji
from dprdm.data.images import UnreadableImageError
from dprdm.data.loaders import load_folder
from dprdm.errors import InvalidParameterError

NEW_SPLITS = ("fluent3d", "blob")
OLD_SPLITS = tuple(name for name in emoji.SPLITS if name not in NEW_SPLITS)


def _artwork(side: int, margin: int, colour: tuple[int, int, int]) -> Image.Image:
    """An RGBA square: a `colour` block inside a fully transparent (and black) `margin`."""
    pixels = np.zeros((side, side, 4), np.uint8)  # transparent pixels store black
    pixels[margin:side - margin, margin:side - margin] = (*colour, 255)
    return Image.fromarray(pixels)


def test_the_new_styles_are_public_joined_splits_named_only_on_request() -> None:
    for name, style in (("fluent3d", emoji.FLUENT_3D), ("blob", emoji.BLOB)):
        folder, split_style, role = emoji.SPLITS[name]
        assert split_style is style and style.name == name and role == style.role == "public"
        assert folder == f"data/{name}" and style in emoji.JOINED_STYLES
        assert emoji.NPM_PACKAGES[style.package] and style.licence and style.attribution
        assert name not in emoji.DEMO_SPLITS and name not in emoji.DEMO_PUBLIC_SPLITS
    assert emoji.FLUENT_3D.licence == "MIT" and emoji.BLOB.licence == "Apache-2.0"
    assert emoji._check_split_names(["fluent3d", "blob"]) == NEW_SPLITS
    assert emoji._packages_needed(["blob"]) == {
        "openmoji", "emoji-datasource-twitter", "emoji-datasource-google-blob"}
    # two versions of emoji-datasource-google side by side: the old one under an npm alias
    assert emoji._npm_spec("emoji-datasource-google-blob", "3.0.0") == \
        "emoji-datasource-google-blob@npm:emoji-datasource-google@3.0.0"
    assert emoji._npm_spec("emoji-datasource-google", "16.0.0") == "emoji-datasource-google@16.0.0"
    made = emoji.made_from("fluent3d", 64, 0, emoji.HOLDOUT_FRACTION)
    assert made["pad_fraction"] == emoji.FLUENT_PAD_FRACTION and "list_from" in made
    with pytest.raises(InvalidParameterError, match="unknown splits"):
        emoji._check_split_names(["fluent3d", "blobmoji"])


def test_fluent3d_is_cropped_like_flat_and_put_on_white(tmp_path: Path) -> None:
    path = tmp_path / "1f600.webp"
    _artwork(256, 16, (0, 0, 255)).save(path, lossless=True)  # 3D WebPs: 16 of 256 px blank
    out = emoji.render_fluent3d(path, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (255, 255, 255)  # the transparent margin is white, not black
    assert tuple(out[32, 32]) == (0, 0, 255)
    rows = np.flatnonzero((out < 240).any(axis=(1, 2)))
    # uncropped the block would span 224/256 = 87.5 %; cropped and padded 3 % it fills ~94 %
    assert rows.min() <= 2 and rows.max() >= 61
    (tmp_path / "bad.webp").write_bytes(b"not a webp")
    with pytest.raises(UnreadableImageError):
        emoji.render_fluent3d(tmp_path / "bad.webp", 64)


def _fake_new_packages(modules: Path) -> None:
    """OpenMoji's and Twemoji's metadata and tiny Fluent 3D and Blob package trees."""
    fake_metadata(modules)
    fluent3d = modules / "@lobehub" / "fluent-emoji-3d" / "assets"
    fluent3d.mkdir(parents=True)
    for name in ("1f600.webp", "2764-fe0f.webp", "1f44b-1f3fd.webp"):  # the same drawing
        _artwork(32, 2, (250, 180, 0)).save(fluent3d / name, lossless=True)
    (fluent3d / "1f9ea.webp").write_bytes(b"truncated")
    (fluent3d / "1f3f4-e0067_e0062_e0065_e006e_e0067.webp").write_bytes(b"")  # not code points
    blob = modules / "emoji-datasource-google-blob" / "img" / "google" / "64"
    blob.mkdir(parents=True)
    # emoji-datasource 3 names files without U+FE0F; the skin tone and the flag are not listed
    for i, name in enumerate(("1f600.png", "2764.png", "1f44b-1f3fd.png", "1f1e9-1f1ea.png")):
        _artwork(64, 16, (40 * i, 200, 100)).save(blob / name)


def test_cli_prepares_only_the_new_splits_beside_the_old_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("cairosvg")
    splits = _fake_splits(tmp_path, OLD_SPLITS)
    manifest = {"config": emoji._config(8, 0, emoji.HOLDOUT_FRACTION), "splits": splits}
    (tmp_path / emoji.MANIFEST).write_text(json.dumps(manifest))
    _fake_new_packages(tmp_path / "npm" / "node_modules")
    installs = []
    monkeypatch.setattr(emoji, "install_packages",
                        lambda prefix, needed=None: installs.append(set(needed)))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("**/*.png")}

    assert emoji.main([str(tmp_path), "--size", "8", "--splits", "fluent3d,blob"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["reused"] is False
    assert printed["counts"] == {**{name: 1 for name in OLD_SPLITS}, "fluent3d": 1, "blob": 2}
    assert installs == [{"openmoji", "emoji-datasource-twitter", "@lobehub/fluent-emoji-3d",
                         "emoji-datasource-google-blob"}]
    # the old splits are listed as they were and never rewritten
    assert before == {p: p.stat().st_mtime_ns for p in before}
    written = json.loads((tmp_path / emoji.MANIFEST).read_text())
    assert set(written["splits"]) == set(emoji.SPLITS)
    assert written["splits"]["blob"]["made_from"] == emoji.made_from(
        "blob", 8, 0, emoji.HOLDOUT_FRACTION)
    assert written["licences"]["blob"]["licence"] == "Apache-2.0"
    assert written["licences"]["fluent3d"]["licence"] == "MIT"
    assert written["packages"]["emoji-datasource-google-blob"] == "3.0.0"

    # Fluent 3D: 1F600 and 2764 joined (same image: one duplicate), 1F9EA unreadable,
    # 1F44B has no file, the skin-tone file is not in the list
    dropped = written["dropped"]["fluent3d"]
    assert (dropped["duplicate_image"], dropped["unreadable"], dropped["no_image"],
            dropped["not_in_list"]) == (1, 1, 1, 1)
    fluent3d = load_folder(tmp_path / "data" / "fluent3d", 8)
    assert [e["concept"] for e in fluent3d.extra] == ["1F600"]
    assert {e["style"] for e in fluent3d.extra} == {"fluent3d"}
    # Blob: joined by concept although its files lack U+FE0F; the flag and the tone are dropped
    dropped = written["dropped"]["blob"]
    assert (dropped["no_image"], dropped["not_in_list"]) == (2, 2)  # 1F44B, 1F9EA; tone, flag
    blob = load_folder(tmp_path / "data" / "blob", 8)
    assert [e["concept"] for e in blob.extra] == ["1F600", "2764"]
    assert blob.captions == ["grinning face", "red heart"]
    assert blob.images.shape == (2, 8, 8, 3)
    assert tuple(blob.images[0, 0, 0]) == (255, 255, 255)  # transparency on white

    # a second run has nothing to do, all splits included
    monkeypatch.setattr(emoji, "install_packages", _no_install)
    assert emoji.prepare_demo_data(tmp_path, size=8, seed=0, show_progress=False)["reused"]


FAKE_NPM = """#!{python}
import json, pathlib, sys
args = sys.argv[1:]
prefix = pathlib.Path(args[args.index("--prefix") + 1])
specs = [a for a in args if not a.startswith("--") and a != "install" and a != str(prefix)]
(prefix / "calls.jsonl").open("a").write(json.dumps(specs) + "\\n")
for spec in specs:
    name, _, rest = spec.partition("@npm:") if "@npm:" in spec else (None, None, spec)
    package, version = rest.rsplit("@", 1)
    folder = prefix / "node_modules" / (name or package)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_text(json.dumps({{"version": version}}))
"""


def test_npm_fetches_only_the_needed_packages_and_keeps_the_installed_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(FAKE_NPM.format(python=sys.executable))
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    prefix = tmp_path / "npm"
    installed = prefix / "node_modules" / "openmoji"
    installed.mkdir(parents=True)
    (installed / "package.json").write_text(json.dumps({"version": emoji.NPM_PACKAGES["openmoji"]}))

    emoji.install_packages(prefix, ["emoji-datasource-twitter", "emoji-datasource-google-blob"])
    calls = [json.loads(line) for line in (prefix / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 1
    assert sorted(calls[0]) == sorted([
        f"emoji-datasource-twitter@{emoji.NPM_PACKAGES['emoji-datasource-twitter']}",
        "emoji-datasource-google-blob@npm:emoji-datasource-google@3.0.0",
        f"openmoji@{emoji.NPM_PACKAGES['openmoji']}"])  # kept: named so npm does not prune it
    # Already there: no second call.
    emoji.install_packages(prefix, ["emoji-datasource-twitter"])
    assert len((prefix / "calls.jsonl").read_text().splitlines()) == 1
