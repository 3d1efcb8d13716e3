"""The emoji demo's pure pieces: filtering, captions, dedupe, the concept split, rasterising.

No npm and no network: entries are small hand-written imitations of the packages' metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dprdm.data import emoji
from dprdm.data.emoji import (code_point_files, concept_key, datasource_records, dedupe_images,
                              has_skin_tone, joined_records, openmoji_names, openmoji_records,
                              rasterize_svg, render_fluent, render_openmoji, split_concepts)
from dprdm.data.loaders import load_folder
from dprdm.errors import InvalidParameterError

TINY_SVG = (
    '<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">'
    '<rect x="18" y="27" width="36" height="18" fill="#FF0000"/></svg>'
)

OPENMOJI_ENTRIES = [
    {"hexcode": "1F600", "annotation": "grinning face", "group": "smileys-emotion",
     "skintone": "", "order": 1},
    {"hexcode": "1F44B", "annotation": "waving hand", "group": "people-body", "skintone": "",
     "order": 2},
    {"hexcode": "1F44B-1F3FD", "annotation": "waving hand: medium skin tone",
     "group": "people-body", "skintone": 3, "order": 3},
    {"hexcode": "1F1E9-1F1EA", "annotation": "flag: Germany", "group": "flags", "skintone": "",
     "order": 4},
    {"hexcode": "E000", "annotation": "openmoji logo", "group": "extras-openmoji",
     "skintone": "", "order": 5},
    {"hexcode": "1F3FB", "annotation": "light skin tone", "group": "component", "skintone": "",
     "order": 6},
    {"hexcode": "2764-FE0F", "annotation": "red heart", "group": "smileys-emotion",
     "skintone": "", "order": 7},
]

DATASOURCE_ENTRIES = [
    {"unified": "1F600", "name": "GRINNING FACE", "category": "Smileys & Emotion",
     "image": "1f600.png", "sort_order": 1},
    {"unified": "1F44B", "name": "WAVING HAND SIGN", "category": "People & Body",
     "image": "1f44b.png", "sort_order": 2,
     "skin_variations": {"1F3FB": {"unified": "1F44B-1F3FB"}, "1F3FC": {"unified": "1F44B-1F3FC"}}},
    {"unified": "1F1E9-1F1EA", "name": "FLAG DE", "category": "Flags", "image": "de.png",
     "sort_order": 3},
    {"unified": "1F3FB", "name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "category": "Component",
     "image": "1f3fb.png", "sort_order": 4},
    {"unified": "2764-FE0F", "name": "HEAVY BLACK HEART", "category": "Smileys & Emotion",
     "image": "2764-fe0f.png", "sort_order": 5},
    {"unified": "1F9EA", "name": "TEST TUBE", "category": "Objects", "image": "1f9ea.png",
     "sort_order": 6},
]


def test_concept_key_and_skin_tone() -> None:
    assert concept_key("2764-fe0f") == "2764"
    assert concept_key("1f636-200d-1F32B-FE0F") == "1F636-200D-1F32B"
    assert concept_key("0023 FE0F 20E3") == "0023-20E3"
    assert has_skin_tone("1F44B-1F3FD") and has_skin_tone("1F3FF")
    assert not has_skin_tone("1F44B") and not has_skin_tone("1F9D1-200D-1F91D-200D-1F9D1")


def test_openmoji_filtering_and_captions() -> None:
    dropped = emoji._new_dropped()
    records = openmoji_records(OPENMOJI_ENTRIES, Path("svg"), dropped)
    assert [r.concept for r in records] == ["1F600", "1F44B", "2764"]
    assert [r.caption for r in records] == ["grinning face", "waving hand", "red heart"]
    assert records[2].source == Path("svg/2764-FE0F.svg")
    assert records[0].category == "Smileys & Emotion"
    assert dropped["skin_tone_variant"] == 2  # the tone variant and the bare modifier
    assert dropped["excluded_category"] == 2  # the flag and the OpenMoji extra


def test_datasource_filtering_uses_openmoji_names() -> None:
    names = openmoji_names(OPENMOJI_ENTRIES)
    assert names["2764"] == "red heart" and "1F44B-1F3FD" not in names
    dropped = emoji._new_dropped()
    records = datasource_records(DATASOURCE_ENTRIES, Path("img"), names, dropped)
    assert [r.concept for r in records] == ["1F600", "1F44B", "2764", "1F9EA"]
    assert [r.caption for r in records] == ["grinning face", "waving hand", "red heart",
                                            "test tube"]  # no OpenMoji name: lower-cased
    assert records[1].source == Path("img/1f44b.png")
    assert dropped["skin_tone_variant"] == 3  # two variations + the modifier itself
    assert dropped["excluded_category"] == 1


def test_dedupe_keeps_first_of_identical_images() -> None:
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    assert dedupe_images([a, b, a.copy(), b, np.zeros((2, 8, 3), dtype=np.uint8)]) == [0, 1, 4]
    assert dedupe_images([]) == []


def test_split_is_deterministic_disjoint_and_complete() -> None:
    concepts = [f"C{i:04d}" for i in range(200)]
    private, holdout = split_concepts(concepts + concepts[:10], 0.15, seed=0)
    assert len(holdout) == 30 and len(private) == 170
    assert not set(private) & set(holdout)
    assert set(private) | set(holdout) == set(concepts)
    assert split_concepts(list(reversed(concepts)), 0.15, seed=0) == (private, holdout)
    assert split_concepts(concepts, 0.15, seed=1)[1] != holdout
    assert split_concepts(["a", "b"], 0.15, seed=0)[1] != []  # at least one each side
    with pytest.raises(InvalidParameterError):
        split_concepts(concepts, 1.0)


def test_rasterize_and_render_tiny_svg(tmp_path: Path) -> None:
    pytest.importorskip("cairosvg")
    rgba = rasterize_svg(TINY_SVG, 72)
    assert rgba.shape == (72, 72, 4) and rgba.dtype == np.uint8
    assert rgba[0, 0, 3] == 0 and tuple(rgba[36, 36]) == (255, 0, 0, 255)
    path = tmp_path / "tiny.svg"
    path.write_text(TINY_SVG)
    out = render_openmoji(path, 16, pad_fraction=0.0)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # cropped to the 2:1 rectangle and padded to a square with white: red band in the middle
    assert tuple(out[8, 8]) == (255, 0, 0) and tuple(out[0, 8]) == (255, 255, 255)
    assert np.all(out[8, :, 1] < 10)  # the band spans the full width after cropping


def test_rasterize_rejects_bad_svg() -> None:
    from dprdm.data.images import UnreadableImageError

    pytest.importorskip("cairosvg")
    with pytest.raises(UnreadableImageError):
        rasterize_svg("<svg this is not xml", 16)


def test_written_split_reads_back_with_load_folder(tmp_path: Path) -> None:
    records = [emoji.EmojiRecord("1F600", "grinning face", "Smileys & Emotion", Path("x")),
               emoji.EmojiRecord("2764", "red heart", "Smileys & Emotion", Path("y"))]
    images = [np.full((8, 8, 3), 10, dtype=np.uint8), np.full((8, 8, 3), 200, dtype=np.uint8)]
    assert emoji._write_split(tmp_path / "split", "openmoji", records, images) == 2
    data = load_folder(tmp_path / "split", 8)
    assert data.captions == ["grinning face", "red heart"]
    assert data.extra[1] == {"concept": "2764", "category": "Smileys & Emotion",
                             "style": "openmoji"}
    assert np.array_equal(data.images, np.stack(images))


def fake_metadata(modules: Path) -> None:
    """OpenMoji's and Twemoji's metadata (the captions and the list every joined style uses)."""
    (modules / "openmoji" / "data").mkdir(parents=True)
    (modules / "openmoji" / "data" / "openmoji.json").write_text(json.dumps(OPENMOJI_ENTRIES))
    (modules / "emoji-datasource-twitter").mkdir(parents=True)
    (modules / "emoji-datasource-twitter" / "emoji.json").write_text(
        json.dumps(DATASOURCE_ENTRIES))


def _fake_splits(root: Path, names, size: int = 8, seed: int = 0) -> dict:
    """One-image folders for `names` and their manifest entries (as a finished run writes)."""
    splits = {}
    for i, name in enumerate(names):
        folder, style, role = emoji.SPLITS[name]
        record = emoji.EmojiRecord(f"1F60{i}", "c", "Objects", Path("x"))
        emoji._write_split(root / folder, style.name, [record],
                           [np.full((size, size, 3), i, dtype=np.uint8)])
        splits[name] = {"path": folder, "role": role, "count": 1,
                        "made_from": emoji.made_from(name, size, seed, emoji.HOLDOUT_FRACTION)}
    return splits


def _no_install(prefix: Path, needed=None) -> dict[str, str]:
    raise AssertionError("npm must not run when the manifest matches")


def test_prepare_reuses_a_matching_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    splits = _fake_splits(tmp_path, emoji.SPLITS)
    manifest = {"config": emoji._config(8, 0, emoji.HOLDOUT_FRACTION), "splits": splits}
    (tmp_path / emoji.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(emoji, "install_packages", _no_install)
    result = emoji.prepare_demo_data(tmp_path, size=8, seed=0, show_progress=False)
    assert result["reused"] is True
    # a different seed no longer matches the OpenMoji splits, so they would be redone
    with pytest.raises(AssertionError, match="npm must not run"):
        emoji.prepare_demo_data(tmp_path, size=8, seed=1, show_progress=False)
    # ... and are first taken out of the manifest; the public splits stay listed, untouched
    listed = json.loads((tmp_path / emoji.MANIFEST).read_text())["splits"]
    assert set(listed) == set(emoji.SPLITS) - set(emoji.OPENMOJI_SPLITS)
    Image.open(tmp_path / "holdout" / "1f603.png").verify()
    # asking only for the public splits needs nothing new
    again = emoji.prepare_demo_data(tmp_path, size=8, seed=1, show_progress=False,
                                    splits=["twemoji", "fluent"])
    assert again["reused"] is True


def test_prepare_keeps_an_older_manifests_splits_and_adds_only_the_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A format-1 manifest (one config, four splits, no per-split record) is reused as it is;
    a re-run prepares only Fluent and EmojiOne and never rewrites the old folders."""
    wanted = (*emoji.DEMO_SPLITS, "fluent", "emojione")  # the splits of format 2's first run
    splits = _fake_splits(tmp_path, emoji.DEMO_SPLITS)
    for entry in splits.values():
        del entry["made_from"]
    packages = {k: v for k, v in emoji.NPM_PACKAGES.items()
                if k in ("emoji-datasource-twitter", "emoji-datasource-google", "openmoji")}
    legacy = {"format_version": 1, "size": 8, "seed": 0,
              "holdout_fraction": emoji.HOLDOUT_FRACTION, "packages": packages,
              "openmoji_pad_fraction": emoji.OPENMOJI_PAD_FRACTION}
    (tmp_path / emoji.MANIFEST).write_text(json.dumps({"config": legacy, "splits": splits}))
    monkeypatch.setattr(emoji, "install_packages", _no_install)
    assert emoji.prepare_demo_data(tmp_path, size=8, seed=0, show_progress=False,
                                   splits=emoji.DEMO_SPLITS)["reused"] is True

    # the two new styles, as tiny package trees (no npm)
    modules = tmp_path / "npm" / "node_modules"
    fake_metadata(modules)
    fluent = modules / "@lobehub" / "fluent-emoji-flat" / "assets"
    fluent.mkdir(parents=True)
    for name in ("1f600.svg", "2764-fe0f.svg", "1f44b-1f3fd.svg"):
        (fluent / name).write_text(TINY_SVG)
    emojione = modules / "emojione" / "assets" / "png"
    emojione.mkdir(parents=True)
    for i, name in enumerate(("1f600.png", "1f9ea.png", "1f1e9-1f1ea.png")):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(emojione / name)
    installs = []
    monkeypatch.setattr(emoji, "install_packages",
                        lambda prefix, needed=None: installs.append(set(needed)))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("data/twemoji/*")}
    if not __import__("importlib").util.find_spec("cairosvg"):
        pytest.skip("cairosvg absent")
    result = emoji.prepare_demo_data(tmp_path, size=8, seed=0, show_progress=False,
                                     splits=wanted)
    assert result["reused"] is False
    assert installs == [{"openmoji", "emoji-datasource-twitter", "@lobehub/fluent-emoji-flat",
                         "emojione"}]
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.glob("data/twemoji/*")}
    manifest = json.loads((tmp_path / emoji.MANIFEST).read_text())
    assert manifest["config"]["format_version"] == emoji.FORMAT_VERSION
    assert set(manifest["splits"]) == set(wanted)
    assert manifest["splits"]["twemoji"]["made_from"] == emoji.made_from(
        "twemoji", 8, 0, emoji.HOLDOUT_FRACTION)
    assert manifest["licences"]["emojione"]["licence"] == "CC-BY-4.0"
    assert manifest["licences"]["fluent"]["licence"] == "MIT"
    # Fluent: 1F600 and 2764 (the skin-tone file is not in the list); the two SVGs render alike,
    # so the second is a duplicate image
    assert manifest["splits"]["fluent"]["count"] == 1
    assert manifest["dropped"]["fluent"]["not_in_list"] == 1
    assert manifest["dropped"]["fluent"]["duplicate_image"] == 1
    data = load_folder(tmp_path / "data" / "emojione", 8)
    assert [e["concept"] for e in data.extra] == ["1F600", "1F9EA"]  # the flag is left out
    assert data.captions == ["grinning face", "test tube"]
    assert {e["style"] for e in data.extra} == {"emojione"}
    assert manifest["dropped"]["emojione"]["no_image"] == 2  # 1F44B and 2764
    # everything is reused now
    monkeypatch.setattr(emoji, "install_packages", _no_install)
    assert emoji.prepare_demo_data(tmp_path, size=8, seed=0, show_progress=False,
                                   splits=wanted)["reused"]


def test_code_point_files_and_joined_records() -> None:
    files = code_point_files([Path("a/0023-20e3.svg"), Path("a/0023-fe0f-20e3.svg"),
                              Path("a/1f600.svg"), Path("a/README.md"), Path("a/logo.svg"),
                              Path("a/1F44B-1F3FD.svg")])
    assert files == {"0023-20E3": Path("a/0023-fe0f-20e3.svg"), "1F600": Path("a/1f600.svg"),
                     "1F44B-1F3FD": Path("a/1F44B-1F3FD.svg")}
    entries = DATASOURCE_ENTRIES + [{"unified": "0023-FE0F-20E3", "name": "HASH KEY",
                                     "category": "Symbols", "image": "x.png", "sort_order": 0}]
    dropped = emoji._new_dropped()
    records = joined_records(entries, files, openmoji_names(OPENMOJI_ENTRIES), dropped)
    assert [(r.concept, r.caption, r.category) for r in records] == [
        ("0023-20E3", "hash key", "Symbols"), ("1F600", "grinning face", "Smileys & Emotion")]
    assert records[0].source == Path("a/0023-fe0f-20e3.svg")
    assert dropped["no_image"] == 3  # waving hand, red heart, test tube
    assert dropped["not_in_list"] == 1  # the skin-tone file


def test_fluent_is_cropped_to_its_drawing(tmp_path: Path) -> None:
    pytest.importorskip("cairosvg")
    svg = ('<svg viewBox="0 0 32 32" xmlns="http://www.w3.org/2000/svg">'
           '<rect x="4" y="4" width="24" height="24" fill="#0000FF"/></svg>')
    out = render_fluent(svg.encode(), 32)
    assert out.shape == (32, 32, 3)
    rows = np.flatnonzero((out < 240).any(axis=(1, 2)))
    # 24/32 of the side uncropped; cropped and padded 3 % per side it fills ~94 %
    assert rows.min() <= 2 and rows.max() >= 29


def test_unknown_splits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match="unknown splits"):
        emoji.prepare_demo_data(tmp_path, size=8, splits=["symbola"])
    assert not (tmp_path / emoji.MANIFEST).exists()
