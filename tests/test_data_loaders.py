"""Decoding and the folder / WebDataset / Parquet loaders, on small synthetic fixtures."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dprdm.data import (ImageDataset, UnreadableImageError, crop_to_alpha, decode_image,
                        load_dataset, load_folder, load_parquet, load_webdataset)
from dprdm.data.loaders import WARN_LIST_MAX, LoadReport, expand_braces, warn_skipped
from dprdm.errors import InvalidParameterError

COLOURS = [(255, 0, 0), (0, 128, 0), (0, 0, 255), (200, 200, 0)]


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (20, 20),
              fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write_images(directory: Path) -> list[str]:
    names = []
    for i, colour in enumerate(COLOURS):
        name = f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg"
        (directory / name).write_bytes(png_bytes(colour, fmt="PNG" if i % 2 == 0 else "JPEG"))
        names.append(name)
    return names


def add_tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


# --- decode_image ---------------------------------------------------------------------------


def test_decode_shape_dtype_and_resize_from_bytes_and_path(tmp_path: Path) -> None:
    data = png_bytes((10, 20, 30), size=(100, 100))
    (tmp_path / "a.png").write_bytes(data)
    for source in (data, tmp_path / "a.png", str(tmp_path / "a.png")):
        out = decode_image(source, 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        assert np.all(np.abs(out.astype(int) - [10, 20, 30]) <= 1)
    up = decode_image(png_bytes((1, 2, 3), size=(4, 4)), 32)
    assert up.shape == (32, 32, 3)


def test_rgba_is_composited_onto_white() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (0, 0, 0)  # fully transparent black must come out white
    rgba[:4, :, :] = (255, 0, 0, 255)  # opaque red top half
    rgba[4:6, :, :] = (0, 0, 255, 128)  # half-transparent blue
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    out = decode_image(buffer.getvalue(), 8)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[7, 7]) == (255, 255, 255)
    r, g, b = (int(v) for v in out[5, 0])
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255


def test_palette_transparency_and_greyscale() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    assert tuple(decode_image(buffer.getvalue(), 4)[0, 0]) == (255, 255, 255)
    grey = decode_image(np.full((5, 5), 77, dtype=np.uint8), 5)
    assert grey.shape == (5, 5, 3) and np.all(grey == 77)


def test_non_square_is_padded_with_white_keeping_aspect() -> None:
    out = decode_image(png_bytes((0, 0, 0), size=(40, 20)), 40)
    assert np.all(out[20, :] < 5)  # the black band spans the middle rows
    assert np.all(out[0, :] == 255) and np.all(out[-1, :] == 255)
    assert np.all(out[10:30, :] < 5)


def test_decode_rejects_garbage_and_bad_size(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImageError):
        decode_image(b"not an image at all", 8)
    with pytest.raises(UnreadableImageError):
        decode_image(png_bytes((1, 1, 1))[:60], 8)
    with pytest.raises(UnreadableImageError, match="not found"):
        decode_image(tmp_path / "missing.png", 8)
    with pytest.raises(InvalidParameterError):
        decode_image(png_bytes((1, 1, 1)), 0)


def test_crop_to_alpha_crops_and_pads_to_square() -> None:
    rgba = np.zeros((50, 60, 4), dtype=np.uint8)
    rgba[10:20, 5:45] = (9, 9, 9, 255)  # 10 x 40 visible block
    out = crop_to_alpha(rgba, pad_fraction=0.1)
    assert out.shape == (48, 48, 4)  # 40 * (1 + 2 * 0.1)
    ys, xs = np.nonzero(out[..., 3])
    assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (10, 40)
    assert xs.min() == 4 and out[0, 0, 3] == 0
    tight = crop_to_alpha(rgba)
    assert tight.shape == (40, 40, 4)
    empty = np.zeros((5, 7, 4), dtype=np.uint8)
    assert crop_to_alpha(empty).shape == (5, 7, 4)
    with pytest.raises(InvalidParameterError):
        crop_to_alpha(np.zeros((5, 5, 3), dtype=np.uint8))


# --- load_folder ----------------------------------------------------------------------------


def test_folder_jsonl_keeps_extra_fields(tmp_path: Path) -> None:
    names = write_images(tmp_path)
    rows = [{"file": n, "caption": f"colour {i}", "concept": f"c{i}"} for i, n in enumerate(names)]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_folder(tmp_path, 8)
    assert isinstance(data, ImageDataset) and len(data) == 4 and data.size == 8
    assert data.images.shape == (4, 8, 8, 3) and data.images.dtype == np.uint8
    assert data.captions == [f"colour {i}" for i in range(4)]
    assert data.ids == names
    assert data.extra[2] == {"concept": "c2"}
    assert tuple(data.images[0, 4, 4]) == (255, 0, 0)
    assert data.report.n_loaded == 4 and data.report.skipped == []


def test_folder_csv(tmp_path: Path) -> None:
    names = write_images(tmp_path)
    lines = ["file,caption,split"] + [f'{n},"a, b {i}",train' for i, n in enumerate(names)]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    data = load_folder(tmp_path, 6)
    assert len(data) == 4 and data.captions[1] == "a, b 1"
    assert data.extra[0] == {"split": "train"}


def test_folder_skips_corrupt_and_missing_with_paths(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    names = write_images(tmp_path)
    (tmp_path / "truncated.png").write_bytes(png_bytes((1, 2, 3), size=(64, 64))[:80])
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(500))
    rows = [{"file": n, "caption": "ok"} for n in names] + [
        {"file": "truncated.png", "caption": "x"},
        {"file": "random.png", "caption": "x"},
        {"file": "missing.png", "caption": "x"},
        {"file": names[0]},  # no caption
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\n{not json\n"
    (tmp_path / "captions.jsonl").write_text(text)
    data = load_folder(tmp_path, 8)
    assert len(data) == 4
    skipped = dict(data.report.skipped)
    for bad in ("truncated.png", "random.png", "missing.png"):
        assert str(tmp_path / bad) in skipped
    assert "not found" in skipped[str(tmp_path / "missing.png")]
    assert any("invalid JSON" in reason for reason in skipped.values())
    assert data.report.n_skipped == 5
    err = capsys.readouterr().err
    assert "loaded 4, skipped 5" in err and "missing.png" in err


def test_folder_without_captions_is_an_error(tmp_path: Path) -> None:
    write_images(tmp_path)
    with pytest.raises(InvalidParameterError, match="captions"):
        load_folder(tmp_path, 8)


def test_warning_lists_at_most_ten(capsys: pytest.CaptureFixture[str]) -> None:
    report = LoadReport(n_loaded=1, skipped=[(f"/p/{i}.png", "bad") for i in range(14)])
    warn_skipped(report, "somewhere")
    err = capsys.readouterr().err
    assert f"/p/{WARN_LIST_MAX - 1}.png" in err and f"/p/{WARN_LIST_MAX}.png" not in err
    assert "and 4 more" in err


# --- WebDataset -----------------------------------------------------------------------------


def write_shard(path: Path, start: int, count: int) -> None:
    with tarfile.open(path, "w") as archive:
        for i in range(start, start + count):
            key = f"sample{i:04d}"
            add_tar_member(archive, f"{key}.png", png_bytes(COLOURS[i % 4]))
            if i % 2 == 0:
                add_tar_member(archive, f"{key}.txt", f"caption {i}\n".encode())
            else:
                add_tar_member(archive, f"{key}.json",
                               json.dumps({"caption": f"caption {i}", "n": i}).encode())


def test_webdataset_brace_pattern_and_list(tmp_path: Path) -> None:
    write_shard(tmp_path / "shard-000.tar", 0, 3)
    write_shard(tmp_path / "shard-001.tar", 3, 3)
    data = load_webdataset(str(tmp_path / "shard-{000..001}.tar"), 8)
    assert len(data) == 6
    assert data.captions == [f"caption {i}" for i in range(6)]
    assert data.ids[0] == "sample0000"
    assert data.extra[1] == {"n": 1, "shard": "shard-000.tar"}
    assert tuple(data.images[2, 0, 0]) == (0, 0, 255)
    same = load_webdataset([tmp_path / "shard-000.tar", tmp_path / "shard-001.tar"], 8)
    assert np.array_equal(same.images, data.images)


def test_webdataset_skips_bad_samples_and_truncated_shards(tmp_path: Path) -> None:
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as archive:
        add_tar_member(archive, "good.png", png_bytes((0, 0, 0)))
        add_tar_member(archive, "good.txt", b"fine")
        add_tar_member(archive, "nocap.png", png_bytes((0, 0, 0)))
        add_tar_member(archive, "noimg.txt", b"lonely caption")
        add_tar_member(archive, "junk.png", b"\x89PNG garbage")
        add_tar_member(archive, "junk.txt", b"junk")
    write_shard(tmp_path / "big.tar", 0, 8)
    whole = (tmp_path / "big.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2 + 100])
    data = load_webdataset([shard, tmp_path / "cut.tar", tmp_path / "absent.tar"], 8, warn=False)
    reasons = dict(data.report.skipped)
    assert data.captions[0] == "fine"
    assert f"{shard}:nocap" in reasons and f"{shard}:noimg" in reasons
    assert f"{shard}:junk" in reasons
    assert str(tmp_path / "absent.tar") in reasons
    assert any(k == str(tmp_path / "cut.tar") or k.startswith(f"{tmp_path / 'cut.tar'}:")
               for k in reasons)
    assert 1 < len(data) < 1 + 8  # samples before the damage are kept


def test_expand_braces() -> None:
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


# --- Parquet --------------------------------------------------------------------------------


def test_parquet_bytes_structs_and_bad_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "side.png").write_bytes(png_bytes((0, 0, 255)))
    structs = pa.array(
        [{"bytes": png_bytes((255, 0, 0)), "path": None},
         {"bytes": None, "path": "side.png"},
         {"bytes": b"garbage", "path": None},
         {"bytes": None, "path": None}],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"image": structs, "caption": ["red", "blue", "bad", "empty"],
                      "label": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "structs.parquet")
    data = load_parquet(tmp_path / "structs.parquet", 8, batch_rows=2, warn=False)
    assert data.captions == ["red", "blue"]
    assert tuple(data.images[1, 3, 3]) == (0, 0, 255)
    assert data.extra[0] == {"label": 1}
    assert data.ids == ["structs.parquet:0", "structs.parquet:1"]
    assert [k for k, _ in data.report.skipped] == [f"{tmp_path / 'structs.parquet'}:2",
                                                   f"{tmp_path / 'structs.parquet'}:3"]

    plain = pa.table({"img": [png_bytes((0, 128, 0))], "text": ["green"], "id": ["k1"]})
    pq.write_table(plain, tmp_path / "plain.parquet")
    data = load_parquet(tmp_path / "plain.parquet", 4, image_column="img", caption_column="text")
    assert data.ids == ["k1"] and data.captions == ["green"]


def test_parquet_missing_column_is_reported(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "nocol.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    data = load_parquet(tmp_path, 4, warn=False)
    assert len(data) == 0 and data.images.shape == (0, 4, 4, 3)
    assert {k for k, _ in data.report.skipped} == {str(tmp_path / "nocol.parquet"),
                                                  str(tmp_path / "broken.parquet")}


# --- dispatch -------------------------------------------------------------------------------


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "folder"
    folder.mkdir()
    names = write_images(folder)
    (folder / "captions.csv").write_text("file,caption\n" + "".join(f"{n},c\n" for n in names))
    assert len(load_dataset(folder, 4)) == 4
    assert len(load_dataset(folder / "captions.csv", 4)) == 4

    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "s-0.tar", 0, 2)
    write_shard(shards / "s-1.tar", 2, 2)
    assert len(load_dataset(shards, 4)) == 4
    assert len(load_dataset(str(shards / "s-{0..1}.tar"), 4)) == 4
    assert len(load_dataset([shards / "s-0.tar"], 4)) == 2

    pq.write_table(pa.table({"image": [png_bytes((1, 1, 1))], "caption": ["c"]}),
                   tmp_path / "one.parquet")
    assert len(load_dataset(tmp_path / "one.parquet", 4)) == 1
    assert len(load_dataset([tmp_path / "one.parquet", tmp_path / "one.parquet"], 4)) == 2

    with pytest.raises(InvalidParameterError):
        load_dataset(tmp_path / "nowhere", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidParameterError):
        load_dataset(tmp_path / "empty", 4)


# --- own folders: recursive, captionless, datasets-imagefolder metadata ---------------------


def own_folder(root: Path) -> None:
    """A nested folder as a user has it: PNG/JPEG/WebP/GIF, one corrupt file, an SVG, a hidden
    file and a text file, no captions."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".thumbs").mkdir()
    (root / "a.png").write_bytes(png_bytes((255, 0, 0)))
    (root / "sub" / "b.JPG").write_bytes(png_bytes((0, 255, 0), fmt="JPEG"))
    (root / "sub" / "deeper" / "c.webp").write_bytes(png_bytes((0, 0, 255), fmt="WEBP"))
    (root / "sub" / "d.gif").write_bytes(png_bytes((9, 9, 9), fmt="GIF"))
    (root / "sub" / "broken.png").write_bytes(png_bytes((1, 2, 3))[:50])
    (root / "icon.svg").write_text("<svg/>")
    (root / "notes.txt").write_text("hello")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / ".thumbs" / "x.png").write_bytes(png_bytes((1, 1, 1)))


def test_plain_nested_folder_is_read_without_captions(tmp_path: Path) -> None:
    from dprdm.data import iter_image_folder, scan_image_folder

    own_folder(tmp_path)
    assert scan_image_folder(tmp_path) == ["a.png", "sub/b.JPG", "sub/broken.png", "sub/d.gif",
                                           "sub/deeper/c.webp"]
    report = LoadReport()
    batches = list(iter_image_folder(tmp_path, 8, 3, report, show_progress=False))
    assert [len(ids) for ids, _ in batches] == [3, 1]  # a gap, never an empty batch
    ids = [i for batch, _ in batches for i in batch]
    assert ids == ["a.png", "sub/b.JPG", "sub/d.gif", "sub/deeper/c.webp"]
    pixels = np.concatenate([p for _, p in batches])
    assert pixels.shape == (4, 8, 8, 3)
    assert np.abs(pixels[3, 4, 4].astype(int) - (0, 0, 255)).max() <= 4  # lossy WebP
    assert report.n_loaded == 4 and report.n_skipped == 3
    kinds = report.by_kind()
    assert kinds["corrupt"] == {"count": 1, "examples": [str(tmp_path / "sub" / "broken.png")]}
    assert kinds["unsupported_type"]["count"] == 2
    assert str(tmp_path / "icon.svg") in kinds["unsupported_type"]["examples"]
    assert ".svg" in dict(report.skipped)[str(tmp_path / "icon.svg")]


def test_datasets_imagefolder_metadata_jsonl(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    rows = []
    for i, colour in enumerate(COLOURS[:3]):
        (tmp_path / "train" / f"{i}.png").write_bytes(png_bytes(colour))
        rows.append({"file_name": f"train/{i}.png", "text": f"colour {i}", "label": i})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_folder(tmp_path, 8)
    assert data.ids == ["train/0.png", "train/1.png", "train/2.png"]
    assert data.captions == ["colour 0", "colour 1", "colour 2"]
    assert data.extra[1] == {"label": 1} and data.report.skipped == []
    assert len(load_dataset(tmp_path, 8)) == 3  # the dispatcher knows the layout too


def test_caption_column_option_and_clear_errors_for_other_columns(tmp_path: Path) -> None:
    names = write_images(tmp_path)
    lines = ["file,description"] + [f"{n},thing {i}" for i, n in enumerate(names)]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidParameterError,
                       match=r"no caption column .*'file', 'description'.*--caption-column"):
        load_folder(tmp_path, 8)
    with pytest.raises(InvalidParameterError, match=r"no column 'title'"):
        load_folder(tmp_path, 8, caption_column="title")
    data = load_folder(tmp_path, 8, caption_column="description")
    assert data.captions == [f"thing {i}" for i in range(4)]
    (tmp_path / "captions.csv").write_text("path,caption\nimg0.png,x\n")
    with pytest.raises(InvalidParameterError, match="no file-name column"):
        load_folder(tmp_path, 8)


def test_images_missing_from_the_captions_file_are_reported(tmp_path: Path) -> None:
    names = write_images(tmp_path)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "e.png").write_bytes(png_bytes((5, 5, 5)))
    rows = [{"file": n, "caption": "c"} for n in names[:3]]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_folder(tmp_path, 8, warn=False)
    assert data.ids == names[:3]
    kinds = data.report.by_kind()
    assert kinds["not_listed"]["count"] == 2
    assert set(kinds["not_listed"]["examples"]) == {str(tmp_path / names[3]),
                                                    str(tmp_path / "extra" / "e.png")}


def test_a_folder_load_with_nothing_loaded_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "bad.png", "caption": "x"}))
    with pytest.raises(InvalidParameterError, match=r"nothing could be loaded.*1 corrupt"):
        load_folder(tmp_path, 8)
