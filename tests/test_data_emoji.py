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
from dprdm.data.emoji import (concept_key, datasource_records, dedupe_images, has_skin_tone,
                              openmoji_names, openmoji_records, rasterize_svg, render_openmoji,
                              split_concepts)
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


def test_prepare_reuses_a_matching_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    config = emoji._config(8, 0, emoji.HOLDOUT_FRACTION)
    splits = {}
    for name, (folder, style, role) in emoji.SPLITS.items():
        record = emoji.EmojiRecord(f"1F60{len(splits)}", "c", "Objects", Path("x"))
        emoji._write_split(tmp_path / folder, style.name, [record],
                           [np.zeros((8, 8, 3), dtype=np.uint8)])
        splits[name] = {"count": 1}
    manifest = {"config": config, "splits": splits}
    (tmp_path / emoji.MANIFEST).write_text(json.dumps(manifest))

    def no_install(prefix: Path) -> dict[str, str]:
        raise AssertionError("npm must not run when the manifest matches")

    monkeypatch.setattr(emoji, "install_packages", no_install)
    result = emoji.prepare_demo_data(tmp_path, size=8, seed=0, show_progress=False)
    assert result["reused"] is True
    # a different seed no longer matches, so preparation would start over (and install)
    with pytest.raises(AssertionError, match="npm must not run"):
        emoji.prepare_demo_data(tmp_path, size=8, seed=1, show_progress=False)
    Image.open(tmp_path / "holdout" / "1f603.png").verify()
