"""Fluent High Contrast, the Iconify-packaged style: unpacking the icon set (aliases, colour,
viewBox), and preparing it beside existing splits as ``data/fluent_hc``.

No npm and no network: the package is a tiny hand-made ``icons.json`` + ``chars.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_data_emoji import _fake_splits, _no_install, fake_metadata

from dprdm.data import emoji
from dprdm.data.loaders import load_folder
from dprdm.errors import DprdmError

SQUARE = '<path fill="currentColor" d="M4 4h24v24H4z"/>'
ICON_SET = {
    "prefix": "fluent-emoji-high-contrast", "width": 32, "height": 32,
    "icons": {"grinning-face": {"body": SQUARE},
              "red-heart": {"body": '<path fill="currentColor" d="M8 8h48v16H8z"/>',
                            "width": 64, "height": 64},
              "waving-hand": {"body": SQUARE}},
    "aliases": {"heart-alias": {"parent": "red-heart"},
                "mirrored-hand": {"parent": "waving-hand", "hFlip": True}},
}
CHARS = {"1f600": "grinning-face", "2764-fe0f": "heart-alias", "1f44b": "mirrored-hand",
         "1f9ea": "no-such-icon", "1f44b-1f3fd": "waving-hand"}


def test_iconify_svgs_resolve_plain_aliases_and_draw_current_colour_in_black() -> None:
    dropped: dict[str, int] = {}
    svgs = emoji.iconify_svgs(ICON_SET, CHARS, dropped)
    # a flipped alias cannot stand for its parent; an unknown name is no icon
    assert set(svgs) == {"1f600", "2764-fe0f", "1f44b-1f3fd"} and dropped == {"unusable_icon": 2}
    assert 'viewBox="0 0 32 32"' in svgs["1f600"] and "currentColor" not in svgs["1f600"]
    assert f'fill="{emoji.ICONIFY_COLOUR}"' in svgs["1f600"]
    assert 'viewBox="0 0 64 64"' in svgs["2764-fe0f"] and "M8 8h48v16H8z" in svgs["2764-fe0f"]


def test_unpack_iconify_writes_code_point_files_or_nothing(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "icons.json").write_text(json.dumps(ICON_SET))
    (package / "chars.json").write_text(json.dumps(CHARS))
    out = emoji.unpack_iconify(package, tmp_path / "svg")
    assert sorted(p.name for p in out.iterdir()) == ["1f44b-1f3fd.svg", "1f600.svg",
                                                     "2764-fe0f.svg"]
    assert emoji.rasterize_svg(out / "1f600.svg", 32)[16, 16].tolist() == [0, 0, 0, 255]
    (package / "chars.json").write_text("{not json")
    with pytest.raises(DprdmError, match="Iconify"):
        emoji.unpack_iconify(package, tmp_path / "svg")
    assert len(list(out.iterdir())) == 3  # the earlier files stay as they were


def test_fluent_hc_is_prepared_as_a_public_joined_split_beside_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cairosvg")
    folder, style, role = emoji.SPLITS["fluent_hc"]
    assert style is emoji.FLUENT_HC and role == "public" and style in emoji.ICONIFY_STYLES
    assert style in emoji.JOINED_STYLES and emoji.NPM_PACKAGES[style.package] == "1.2.6"
    assert "fluent_hc" not in emoji.DEMO_SPLITS and style.licence == "MIT"
    others = [name for name in emoji.SPLITS if name != "fluent_hc"]
    splits = _fake_splits(tmp_path, others)
    manifest = {"config": emoji._config(8, 0, emoji.HOLDOUT_FRACTION), "splits": splits}
    (tmp_path / emoji.MANIFEST).write_text(json.dumps(manifest))
    modules = tmp_path / "npm" / "node_modules"
    fake_metadata(modules)
    package = modules / style.package
    package.mkdir(parents=True)
    (package / "icons.json").write_text(json.dumps(ICON_SET))
    (package / "chars.json").write_text(json.dumps(CHARS))
    installs = []
    monkeypatch.setattr(emoji, "install_packages",
                        lambda prefix, needed=None: installs.append(set(needed)))

    result = emoji.prepare_demo_data(tmp_path, size=8, seed=0, show_progress=False,
                                     splits=["fluent_hc"])
    assert installs == [{"openmoji", "emoji-datasource-twitter", style.package}]
    assert result["splits"]["fluent_hc"]["count"] == 2
    # 1F600 and 2764 joined; 1F44B's only usable file is a skin tone (not in the list); the
    # flipped alias and the unknown icon are unusable; 1F9EA has no image
    dropped = result["dropped"]["fluent_hc"]
    assert (dropped["unusable_icon"], dropped["no_image"], dropped["not_in_list"]) == (2, 2, 1)
    hc = load_folder(tmp_path / folder, 8)
    assert [e["concept"] for e in hc.extra] == ["1F600", "2764"]
    assert hc.captions == ["grinning face", "red heart"]
    # black drawings on white, cropped like Fluent flat: the square fills the frame, the wide
    # bar is padded to a square with white above and below
    assert np.all(hc.images[:, 4, 4] < 40) and np.all(hc.images[1, 0] > 240)
    assert result["licences"]["fluent_hc"]["licence"] == "MIT"
    assert result["splits"]["fluent_hc"]["made_from"]["pad_fraction"] == \
        emoji.FLUENT_PAD_FRACTION
    monkeypatch.setattr(emoji, "install_packages", _no_install)
    assert emoji.prepare_demo_data(tmp_path, size=8, seed=0, show_progress=False)["reused"]
