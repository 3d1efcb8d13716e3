"""The offline emoji demo domains: seven public styles and one "private" style.

Owns turning eight npm packages into folders that :func:`dprdm.data.loaders.load_folder` reads:

* public  ``data/twemoji/``   -- Twemoji 64 px PNGs from ``emoji-datasource-twitter`` (CC-BY 4.0)
* public  ``data/google/``    -- Noto Emoji 64 px PNGs from ``emoji-datasource-google`` (Apache-2.0)
* public  ``data/fluent/``    -- Microsoft Fluent Emoji "flat" SVGs from
  ``@lobehub/fluent-emoji-flat`` (MIT), rasterised and cropped like OpenMoji (their 32-unit
  viewBox leaves ~6 % blank per side)
* public  ``data/emojione/``  -- EmojiOne 2.x 64 px PNGs from ``emojione`` (artwork CC BY 4.0)
* public  ``data/fluent3d/``  -- Microsoft Fluent Emoji "3D" 256 px WebPs (with alpha) from
  ``@lobehub/fluent-emoji-3d`` (MIT), cropped and padded like Fluent flat (same ~6 % margins)
* public  ``data/blob/``      -- Google's "blob" emoji (Android 7.1 Nougat, the designs Blobmoji
  continues; artwork Apache-2.0) as 64 px PNGs from ``emoji-datasource-google`` 3.0.0, installed
  under the npm alias ``emoji-datasource-google-blob`` beside the current 16.0.0 (``@svgmoji/blob``
  ships no artwork, only code that loads a sprite from a CDN)
* public  ``data/fluent_hc/``  -- Microsoft Fluent Emoji "high contrast" (black line art, no
  colour) from ``@iconify-json/fluent-emoji-high-contrast`` (MIT): one JSON of SVG bodies and a
  ``chars.json`` (code points -> icon name), unpacked into ``npm/iconify/fluent_hc/CODEPOINTS.svg``
  and then rasterised and cropped like Fluent flat. The demo's default validation domain
  (:mod:`dprdm.validation`): a real style far from every colour style the generators train on
* private ``data/openmoji_private/`` and evaluation ``holdout/`` -- OpenMoji colour SVGs from
  ``openmoji`` (CC-BY-SA 4.0), rasterised with cairosvg, cropped to their visible pixels, padded to
  a square with a small margin (the public PNGs are near full-bleed), and split BY CONCEPT with a
  fixed seed into ~85 % private retrieval set and ~15 % held-out evaluation set.

Fluent, Fluent 3D, EmojiOne, Blob and Fluent High Contrast files are named by code points; they are
joined to emoji-datasource's (Twemoji's) list of emoji by concept, which gives them the same
filtering, categories and captions as the other public styles (files of concepts not in that list,
skin tones among them, are left out and counted).

The demo's own models and public index use :data:`DEMO_PUBLIC_SPLITS` (Twemoji + Noto) only; the
other public splits are there for training data that names them explicitly.

Every style drops skin-tone variants, the Flags and Component categories (OpenMoji also its
non-Unicode "extras" groups), and exact duplicate images (by hash of the final pixels, first in
emoji order wins). A record's concept is its code point sequence without U+FE0F (``1F636-200D-
1F32B``), the key that joins styles; its caption is the CLDR short name (OpenMoji's ``annotation``,
used for the public styles too when the concept exists in OpenMoji, else the Unicode name in lower
case). Each folder holds ``CONCEPT.png`` files (RGB on white, ``size`` px) and ``captions.jsonl``
rows ``{file, caption, concept, category, style}``; ``data/manifest.json`` records counts, package
versions, licences and what each split was made from. The manifest lists complete splits only; a
re-run reuses every split whose record matches and prepares only what is missing or stale (an
older manifest's splits are reused as they are when their settings match).

Only npm downloads anything (``npm install`` of the versions pinned in :data:`NPM_PACKAGES`).
Run ``python -m dprdm.data.emoji ROOT [--size N] [--seed S] [--splits A,B]`` to prepare by hand.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dprdm.data.images import UnreadableImageError, check_size, crop_to_alpha, decode_image
from dprdm.errors import DprdmError, InvalidParameterError

# Exact versions (``npm view NAME version``, checked when this module was written).
NPM_PACKAGES: dict[str, str] = {
    "emoji-datasource-twitter": "16.0.0",
    "emoji-datasource-google": "16.0.0",
    "openmoji": "17.0.0",
    "@lobehub/fluent-emoji-flat": "1.1.0",
    "emojione": "2.2.7",
    "@lobehub/fluent-emoji-3d": "1.1.0",
    "emoji-datasource-google-blob": "3.0.0",
    "@iconify-json/fluent-emoji-high-contrast": "1.2.6",
}
# Pinned packages installed under another name (npm alias): name -> the registry's package.
# emoji-datasource-google 3.0.0 holds the Android 7.1 "blob" images; 16.0.0 is installed too.
NPM_ALIASES: dict[str, str] = {"emoji-datasource-google-blob": "emoji-datasource-google"}
# 2: per-split records ("made_from"). New splits need no new format: a split is reused by its
# own record, and a manifest's unknown splits are ignored by older code.
FORMAT_VERSION = 2
HOLDOUT_FRACTION = 0.15
OPENMOJI_PAD_FRACTION = 0.03  # margin per side, as a fraction of the content's longer side
# Fluent's flat SVGs leave ~6 % of the side blank on each edge (median over the set; the 3D
# WebPs too: 16 of 256 px); cropped and padded like OpenMoji they are framed like the near
# full-bleed Twemoji / Noto PNGs.
FLUENT_PAD_FRACTION = 0.03
MIN_RENDER_SIZE = 256  # SVGs are rendered at max(4 * size, this) and then downscaled

SKIN_TONE_MODIFIERS = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
VARIATION_SELECTOR_16 = "FE0F"
EXCLUDED_CATEGORIES = frozenset({"Flags", "Component"})
# OpenMoji group slug -> the emoji-datasource / CLDR category name. Groups not listed
# (extras-openmoji: OpenMoji's own icons and logos; extras-unicode: non-emoji symbols, regional
# indicators, subdivision flags) have no counterpart in the public styles and are dropped.
OPENMOJI_GROUPS: dict[str, str] = {
    "smileys-emotion": "Smileys & Emotion",
    "people-body": "People & Body",
    "animals-nature": "Animals & Nature",
    "food-drink": "Food & Drink",
    "travel-places": "Travel & Places",
    "activities": "Activities",
    "objects": "Objects",
    "symbols": "Symbols",
    "flags": "Flags",
    "component": "Component",
}


@dataclass(frozen=True)
class Style:
    """One emoji style: where its images live in its npm package, and its terms."""

    name: str
    title: str  # as people name it (reports, docs)
    package: str
    role: str  # "public" or "private"
    licence: str
    attribution: str
    image_dir: str = ""  # inside the package: the image files
    image_type: str = "png"  # their extension (also the progress label)


TWEMOJI = Style(
    "twemoji", "Twemoji", "emoji-datasource-twitter", "public", "CC-BY-4.0",
    "Twemoji graphics (c) Twitter, Inc. and other contributors (jdecked/twemoji fork), "
    "CC-BY 4.0; emoji metadata from emoji-datasource (c) Cal Henderson, MIT.",
    "img/twitter/64",
)
GOOGLE = Style(
    "google", "Noto", "emoji-datasource-google", "public", "Apache-2.0",
    "Noto Emoji graphics (c) Google, Apache License 2.0; emoji metadata from emoji-datasource "
    "(c) Cal Henderson, MIT.",
    "img/google/64",
)
OPENMOJI = Style(
    "openmoji", "OpenMoji", "openmoji", "private", "CC-BY-SA-4.0",
    "All emojis designed by OpenMoji (openmoji.org), the open-source emoji and icon project. "
    "License: CC BY-SA 4.0. The rasterised PNGs are adaptations under the same licence.",
    "color/svg", "svg",
)
FLUENT = Style(
    "fluent", "Fluent", "@lobehub/fluent-emoji-flat", "public", "MIT",
    "Fluent Emoji (flat) (c) Microsoft Corporation, MIT License (microsoft/fluentui-emoji), "
    "as packaged by LobeHub (@lobehub/fluent-emoji-flat, MIT).",
    "assets", "svg",
)
EMOJIONE = Style(
    "emojione", "EmojiOne", "emojione", "public", "CC-BY-4.0",
    "Emoji artwork provided by EmojiOne (emojione 2.2.7), licensed under CC BY 4.0 "
    "(https://creativecommons.org/licenses/by/4.0/); EmojiOne code MIT.",
    "assets/png",
)
FLUENT_3D = Style(
    "fluent3d", "Fluent 3D", "@lobehub/fluent-emoji-3d", "public", "MIT",
    "Fluent Emoji (3D) (c) Microsoft Corporation, MIT License (microsoft/fluentui-emoji), "
    "as packaged by LobeHub (@lobehub/fluent-emoji-3d, MIT).",
    "assets", "webp",
)
BLOB = Style(
    "blob", "Blob", "emoji-datasource-google-blob", "public", "Apache-2.0",
    "Android 7.1 (Nougat) \"blob\" emoji graphics (c) The Android Open Source Project / Google, "
    "Apache License 2.0 (googlefonts/noto-emoji; continued as Blobmoji, c1710/blobmoji, "
    "Apache-2.0), as packaged in emoji-datasource-google 3.0.0 (c) Cal Henderson, MIT, whose "
    "README credits them to The Android Open Source Project (2b65d03 / 2017-04-10).",
    "img/google/64",
)
FLUENT_HC = Style(
    "fluent_hc", "Fluent High Contrast", "@iconify-json/fluent-emoji-high-contrast", "public",
    "MIT",
    "Fluent Emoji (high contrast) (c) Microsoft Corporation, MIT License "
    "(microsoft/fluentui-emoji), as packaged by Iconify (@iconify-json/fluent-emoji-high-contrast, "
    "MIT).",
    "icons.json", "svg",
)
PUBLIC_STYLES = (TWEMOJI, GOOGLE)  # the emoji-datasource styles (their own emoji.json)
# Files named by code points, joined to Twemoji's list by concept.
JOINED_STYLES = (FLUENT, EMOJIONE, FLUENT_3D, BLOB, FLUENT_HC)
# Iconify icon sets: SVG bodies in one JSON, unpacked to code-point-named files before the join.
ICONIFY_STYLES = (FLUENT_HC,)
ICONIFY_COLOUR = "#000000"  # what ``currentColor`` (the set's one colour) is drawn in
INDEX_STYLE = TWEMOJI  # whose emoji.json lists the emoji (concepts, categories) for the joins

# Output layout under ROOT: split name -> (folder, style, role).
SPLITS: dict[str, tuple[str, Style, str]] = {
    "twemoji": ("data/twemoji", TWEMOJI, "public"),
    "google": ("data/google", GOOGLE, "public"),
    "openmoji_private": ("data/openmoji_private", OPENMOJI, "private"),
    "holdout": ("holdout", OPENMOJI, "evaluation"),
    "fluent": ("data/fluent", FLUENT, "public"),
    "emojione": ("data/emojione", EMOJIONE, "public"),
    "fluent3d": ("data/fluent3d", FLUENT_3D, "public"),
    "blob": ("data/blob", BLOB, "public"),
    "fluent_hc": ("data/fluent_hc", FLUENT_HC, "public"),
}
# The public splits the demo's shipped models were trained on and its public index holds.
# Readers of "public" splits default to these (name others explicitly).
DEMO_PUBLIC_SPLITS = ("twemoji", "google")
# What `make demo` prepares (the rest: ``python -m dprdm.data.emoji ROOT``).
DEMO_SPLITS = ("twemoji", "google", "openmoji_private", "holdout")
OPENMOJI_SPLITS = ("openmoji_private", "holdout")  # rendered and split together
MANIFEST = "data/manifest.json"
CAPTIONS = "captions.jsonl"

_stderr = Console(stderr=True)


@dataclass(frozen=True)
class EmojiRecord:
    """One emoji of one style, before rendering."""

    concept: str
    caption: str
    category: str
    source: Path  # the PNG or SVG file


# ---------------------------------------------------------------------------------------------
# pure helpers (tested without npm)


def codepoints(sequence: str) -> list[str]:
    """``'1f636-200d-1F32B-fe0f'`` or ``'1F636 200D'`` -> upper-case code points."""
    return [part.upper() for part in sequence.replace(" ", "-").split("-") if part]


def concept_key(sequence: str) -> str:
    """The style-independent concept of a code point sequence: upper case, without U+FE0F."""
    return "-".join(cp for cp in codepoints(sequence) if cp != VARIATION_SELECTOR_16)


def has_skin_tone(sequence: str) -> bool:
    """True when the sequence contains a Fitzpatrick skin-tone modifier (or is one)."""
    return any(cp in SKIN_TONE_MODIFIERS for cp in codepoints(sequence))


def datasource_records(entries: Iterable[dict[str, Any]], image_dir: Path,
                       names: dict[str, str], dropped: dict[str, int]) -> list[EmojiRecord]:
    """emoji-datasource ``emoji.json`` entries -> records (base forms only, filters applied).

    Skin-tone variants live under each entry's ``skin_variations`` and are never expanded;
    entries whose own sequence has a modifier are dropped too. `names` maps concept -> CLDR
    name (from OpenMoji); `dropped` counts what was left out and why.
    """
    records: list[EmojiRecord] = []
    seen: set[str] = set()
    for entry in sorted(entries, key=lambda e: (e.get("sort_order", 0), e["unified"])):
        unified = entry["unified"]
        dropped["skin_tone_variant"] += len(entry.get("skin_variations") or {})
        if has_skin_tone(unified):
            dropped["skin_tone_variant"] += 1
            continue
        category = entry.get("category") or ""
        if category in EXCLUDED_CATEGORIES:
            dropped["excluded_category"] += 1
            continue
        concept = concept_key(unified)
        if concept in seen:
            dropped["duplicate_concept"] += 1
            continue
        seen.add(concept)
        caption = names.get(concept) or str(entry.get("name") or "").strip().lower()
        records.append(EmojiRecord(concept, caption, category, image_dir / entry["image"]))
    return records


def code_point_files(paths: Iterable[Path]) -> dict[str, Path]:
    """concept -> file for files named by code points (``0023-fe0f-20e3.svg``, ``1f600.png``).

    Names that are not code point sequences are ignored. When several files share a concept
    (with and without U+FE0F), the one with the most code points (the fully qualified form)
    wins, then the first in name order."""
    chosen: dict[str, tuple[int, str, Path]] = {}
    for path in paths:
        stem = path.name.split(".")[0]
        points = codepoints(stem)
        if not points or not all(_is_hex(cp) for cp in points):
            continue
        key = concept_key(stem)
        rank = (-len(points), path.name, path)
        if key not in chosen or rank[:2] < chosen[key][:2]:
            chosen[key] = rank
    return {key: rank[2] for key, rank in chosen.items()}


def _is_hex(text: str) -> bool:
    return 1 <= len(text) <= 6 and all(c in "0123456789ABCDEF" for c in text)


def joined_records(entries: Iterable[dict[str, Any]], files: dict[str, Path],
                   names: dict[str, str], dropped: dict[str, int]) -> list[EmojiRecord]:
    """Records of a style whose `files` (concept -> file) are joined to emoji-datasource's list.

    The list's filtering, order, categories and captions are those of
    :func:`datasource_records`; its concepts without a file count as ``no_image``, files whose
    concept is not in the filtered list (skin tones, flags, components, emoji the list lacks) as
    ``not_in_list``."""
    listed = datasource_records(entries, Path(), names, dropped)
    records = [EmojiRecord(r.concept, r.caption, r.category, files[r.concept])
               for r in listed if r.concept in files]
    dropped["no_image"] = dropped.get("no_image", 0) + len(listed) - len(records)
    dropped["not_in_list"] = dropped.get("not_in_list", 0) + len(
        set(files) - {r.concept for r in listed})
    return records


def openmoji_records(entries: Iterable[dict[str, Any]], svg_dir: Path,
                     dropped: dict[str, int]) -> list[EmojiRecord]:
    """OpenMoji ``openmoji.json`` entries -> records (no skin tones, flags or extras)."""
    records: list[EmojiRecord] = []
    seen: set[str] = set()
    for entry in sorted(entries, key=lambda e: (e.get("order") or 0, e["hexcode"])):
        hexcode = entry["hexcode"]
        if entry.get("skintone") not in ("", None) or has_skin_tone(hexcode):
            dropped["skin_tone_variant"] += 1
            continue
        category = OPENMOJI_GROUPS.get(entry.get("group", ""))
        if category is None or category in EXCLUDED_CATEGORIES:
            dropped["excluded_category"] += 1
            continue
        concept = concept_key(hexcode)
        if concept in seen:
            dropped["duplicate_concept"] += 1
            continue
        seen.add(concept)
        records.append(EmojiRecord(concept, str(entry.get("annotation", "")).strip(), category,
                                   svg_dir / f"{hexcode}.svg"))
    return records


def openmoji_names(entries: Iterable[dict[str, Any]]) -> dict[str, str]:
    """concept -> OpenMoji annotation (the CLDR short name), base forms only."""
    names: dict[str, str] = {}
    for entry in entries:
        annotation = str(entry.get("annotation", "")).strip()
        if annotation and entry.get("skintone") in ("", None):
            names.setdefault(concept_key(entry["hexcode"]), annotation)
    return names


def image_hash(pixels: np.ndarray) -> str:
    """SHA-256 of an image's shape and bytes: equal hashes mean identical pixels."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def dedupe_images(images: Sequence[np.ndarray]) -> list[int]:
    """Indices of the first occurrence of every distinct image, in order."""
    seen: set[str] = set()
    keep: list[int] = []
    for index, pixels in enumerate(images):
        key = image_hash(pixels)
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return keep


def split_concepts(concepts: Iterable[str], holdout_fraction: float = HOLDOUT_FRACTION,
                   seed: int = 0) -> tuple[list[str], list[str]]:
    """Split distinct concepts into (private, holdout), deterministically for a given seed.

    The concepts are sorted, permuted with ``numpy.random.default_rng(seed)``, and the first
    ``round(holdout_fraction * n)`` go to the holdout (at least one each side when n >= 2).
    Both lists come back sorted; together they are the input set, and they never overlap.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise InvalidParameterError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    unique = sorted(set(concepts))
    n = len(unique)
    n_holdout = round(holdout_fraction * n)
    if n >= 2:
        n_holdout = min(max(n_holdout, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    holdout = sorted(unique[i] for i in order[:n_holdout])
    private = sorted(unique[i] for i in order[n_holdout:])
    return private, holdout


def rasterize_svg(svg: bytes | str | Path, render_size: int) -> np.ndarray:
    """Render an SVG (bytes, text or a path) to a ``uint8 (render_size, render_size, 4)`` RGBA.

    The SVG is scaled to a render_size square (OpenMoji's viewBox is a 72 x 72 square).
    """
    import cairosvg  # imported here: only the demo preparation needs cairo

    render_size = check_size(render_size)
    if isinstance(svg, Path):
        svg = svg.read_bytes()
    data = svg.encode("utf-8") if isinstance(svg, str) else svg
    try:
        png = cairosvg.svg2png(bytestring=data, output_width=render_size,
                               output_height=render_size)
    except Exception as error:  # cairosvg raises XML, value and cairo errors alike
        raise UnreadableImageError(f"cannot rasterise SVG: {error}") from None
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGBA"), dtype=np.uint8).copy()


def read_rgba(path: Path) -> np.ndarray:
    """A raster image file (PNG, WebP, ...) -> its ``uint8 (H, W, 4)`` RGBA pixels."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGBA"), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as error:
        raise UnreadableImageError(f"cannot decode image: {error}") from None


def render_cropped(rgba: np.ndarray, size: int, pad_fraction: float) -> np.ndarray:
    """RGBA artwork -> ``uint8 (size, size, 3)``: crop to alpha, pad, put on white, resize."""
    return decode_image(crop_to_alpha(rgba, pad_fraction), size)


def render_openmoji(svg: bytes | str | Path, size: int,
                    pad_fraction: float = OPENMOJI_PAD_FRACTION) -> np.ndarray:
    """OpenMoji SVG -> ``uint8 (size, size, 3)``: rasterise, crop to alpha, pad, resize."""
    return render_cropped(rasterize_svg(svg, max(4 * size, MIN_RENDER_SIZE)), size, pad_fraction)


def render_fluent(svg: bytes | str | Path, size: int) -> np.ndarray:
    """Fluent Emoji flat SVG -> ``uint8 (size, size, 3)``, cropped and padded like OpenMoji."""
    return render_openmoji(svg, size, FLUENT_PAD_FRACTION)


def render_fluent3d(path: Path, size: int) -> np.ndarray:
    """Fluent Emoji 3D WebP (256 px, alpha) -> ``uint8 (size, size, 3)``, framed like flat."""
    return render_cropped(read_rgba(path), size, FLUENT_PAD_FRACTION)


def _renderer(style: Style, size: int) -> Callable[[Path], np.ndarray]:
    """How one image file of a public style becomes its ``uint8 (size, size, 3)`` pixels."""
    if style in (FLUENT, FLUENT_HC):
        return lambda path: render_fluent(path, size)
    if style is FLUENT_3D:
        return lambda path: render_fluent3d(path, size)
    return lambda path: decode_image(path, size)  # PNGs drawn near full-bleed


def iconify_svgs(icon_set: dict[str, Any], chars: dict[str, str],
                 dropped: dict[str, int] | None = None) -> dict[str, str]:
    """An Iconify icon set (``icons.json``) and its ``chars.json`` -> code points -> SVG text.

    Each icon's ``body`` is wrapped in an ``<svg>`` with its own (or the set's) viewBox, and
    ``currentColor`` is drawn in :data:`ICONIFY_COLOUR`. An alias stands for its parent icon when
    it is a plain rename; an alias that flips or rotates its parent, or a name the set lacks, is
    left out (counted in ``dropped["unusable_icon"]``)."""
    icons, aliases = icon_set.get("icons") or {}, icon_set.get("aliases") or {}
    out: dict[str, str] = {}
    for sequence, name in chars.items():
        alias = aliases.get(name)
        if alias is not None and set(alias) == {"parent"}:
            name = alias["parent"]
        icon = icons.get(name)
        if icon is None or not isinstance(icon.get("body"), str):
            if dropped is not None:
                dropped["unusable_icon"] = dropped.get("unusable_icon", 0) + 1
            continue
        left, top = icon.get("left", icon_set.get("left", 0)), icon.get("top",
                                                                         icon_set.get("top", 0))
        width = icon.get("width", icon_set.get("width", 16))
        height = icon.get("height", icon_set.get("height", 16))
        body = icon["body"].replace("currentColor", ICONIFY_COLOUR)
        out[sequence] = (f'<svg xmlns="http://www.w3.org/2000/svg" '
                         f'viewBox="{left} {top} {width} {height}">{body}</svg>')
    return out


def unpack_iconify(package: Path, out: Path, dropped: dict[str, int] | None = None) -> Path:
    """Write an Iconify package's emoji as ``out/CODEPOINTS.svg`` (all or nothing); returns
    `out`."""
    try:
        icon_set = json.loads((package / "icons.json").read_text(encoding="utf-8"))
        chars = json.loads((package / "chars.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DprdmError(f"cannot read the Iconify set in {package}: {error}") from None
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for sequence, svg in iconify_svgs(icon_set, chars, dropped).items():
        (staging / f"{sequence}.svg").write_text(svg, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


# ---------------------------------------------------------------------------------------------
# npm


def npm_dir(root: Path) -> Path:
    return root / "npm"


def installed_versions(prefix: Path,
                       names: Iterable[str] | None = None) -> dict[str, str | None]:
    """Version of each pinned package (or of `names`) under ``prefix/node_modules``."""
    versions: dict[str, str | None] = {}
    for name in (NPM_PACKAGES if names is None else names):
        package_json = prefix / "node_modules" / name / "package.json"
        try:
            versions[name] = json.loads(package_json.read_text(encoding="utf-8")).get("version")
        except (OSError, json.JSONDecodeError):
            versions[name] = None
    return versions


def install_packages(prefix: Path, needed: Iterable[str] | None = None) -> dict[str, str]:
    """``npm install`` the `needed` pinned packages (default: all) under `prefix` unless they
    are already there. The pinned packages installed before are named in the install too, so npm
    keeps (never prunes) them; the others are not downloaded (``make demo`` fetches only what
    the demo's splits are made from)."""
    needed = list(NPM_PACKAGES if needed is None else needed)
    pinned = {name: NPM_PACKAGES[name] for name in needed}
    if installed_versions(prefix, needed) == pinned:
        return pinned
    npm = shutil.which("npm")
    if npm is None:
        raise DprdmError("npm is not on PATH; it is needed once to fetch the emoji packages")
    prefix.mkdir(parents=True, exist_ok=True)
    keep = {name: version for name, version in installed_versions(prefix).items()
            if version == NPM_PACKAGES[name]}
    wanted = {name: NPM_PACKAGES[name] for name in NPM_PACKAGES if name in pinned or name in keep}
    specs = [_npm_spec(name, version) for name, version in wanted.items()]
    command = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), *specs]
    _stderr.print(f"[bold]installing[/] {' '.join(specs)} into {prefix}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise DprdmError(f"npm install failed (exit {result.returncode}): {' | '.join(tail)}")
    found = installed_versions(prefix, wanted)
    if found != wanted:
        raise DprdmError(f"npm installed {found}, expected {wanted}")
    return pinned


def _npm_spec(name: str, version: str) -> str:
    """``name@version``, or ``alias@npm:package@version`` for :data:`NPM_ALIASES`."""
    if name in NPM_ALIASES:
        return f"{name}@npm:{NPM_ALIASES[name]}@{version}"
    return f"{name}@{version}"


# ---------------------------------------------------------------------------------------------
# preparation


def _config(size: int, seed: int, holdout_fraction: float) -> dict[str, Any]:
    """The settings of a run (recorded in the manifest; each split also records its own)."""
    return {"format_version": FORMAT_VERSION, "size": size, "seed": seed,
            "holdout_fraction": holdout_fraction, "packages": dict(NPM_PACKAGES),
            "openmoji_pad_fraction": OPENMOJI_PAD_FRACTION,
            "fluent_pad_fraction": FLUENT_PAD_FRACTION}


def made_from(name: str, size: int, seed: int, holdout_fraction: float,
              packages: dict[str, str] | None = None,
              openmoji_pad_fraction: float = OPENMOJI_PAD_FRACTION) -> dict[str, Any]:
    """What split `name` is made from: a re-run reuses the split while this is unchanged."""
    packages = NPM_PACKAGES if packages is None else packages
    style = SPLITS[name][1]
    out: dict[str, Any] = {"size": size, "package": style.package,
                           "version": packages.get(style.package),
                           "captions_from": f"openmoji@{packages.get(OPENMOJI.package)}"}
    if style in JOINED_STYLES:
        out["list_from"] = f"{INDEX_STYLE.package}@{packages.get(INDEX_STYLE.package)}"
    if style in (FLUENT, FLUENT_3D, FLUENT_HC):
        out["pad_fraction"] = FLUENT_PAD_FRACTION
    if style is OPENMOJI:
        out.update(seed=seed, holdout_fraction=holdout_fraction,
                   pad_fraction=openmoji_pad_fraction)
    return out


def _recorded_made_from(manifest: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A manifest's record of what split `name` was made from (format 1: from its config)."""
    entry = manifest.get("splits", {}).get(name) or {}
    config = manifest.get("config") or {}
    if "made_from" in entry:
        return entry["made_from"]
    if config.get("format_version") == 1:  # one config for the whole (then four-split) run
        try:
            return made_from(name, config["size"], config["seed"], config["holdout_fraction"],
                             config["packages"], config["openmoji_pad_fraction"])
        except (KeyError, TypeError):
            return None
    return None


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _read_manifest(root: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        return {}
    if (manifest.get("config") or {}).get("format_version", 0) > FORMAT_VERSION:
        return {}
    return manifest


def _reusable(root: Path, manifest: dict[str, Any],
              wanted: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The manifest's split entries (with ``made_from``) that match `wanted` and whose folder is
    complete (as many PNGs and captions rows as the manifest counted)."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in manifest.get("splits", {}).items():
        if name not in SPLITS or _recorded_made_from(manifest, name) != wanted[name]:
            continue
        folder = root / SPLITS[name][0]
        captions = folder / CAPTIONS
        expected = entry.get("count")
        if not captions.is_file() or _count_lines(captions) != expected:
            continue
        if sum(1 for _ in folder.glob("*.png")) != expected:
            continue
        out[name] = {**entry, "made_from": wanted[name]}
    return out


def _render_all(records: Sequence[EmojiRecord], render: Callable[[Path], np.ndarray],
                label: str, show_progress: bool, dropped: dict[str, int]
                ) -> tuple[list[EmojiRecord], list[np.ndarray]]:
    """Render every record (skipping unreadable ones), then drop exact duplicate images."""
    kept: list[EmojiRecord] = []
    images: list[np.ndarray] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=_stderr, transient=False,
                  disable=not show_progress) as progress:
        task = progress.add_task(label, total=len(records))
        for record in records:
            try:
                images.append(render(record.source))
                kept.append(record)
            except UnreadableImageError as error:
                dropped["unreadable"] += 1
                _stderr.print(f"[yellow]warning:[/] skipped {record.source}: {error}")
            progress.advance(task)
    unique = dedupe_images(images)
    dropped["duplicate_image"] += len(images) - len(unique)
    return [kept[i] for i in unique], [images[i] for i in unique]


def _write_split(folder: Path, style: str, records: Sequence[EmojiRecord],
                 images: Sequence[np.ndarray]) -> int:
    """Write CONCEPT.png files and captions.jsonl into a fresh `folder`."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    lines = []
    for record, pixels in zip(records, images):
        file = f"{record.concept.lower()}.png"
        Image.fromarray(pixels).save(folder / file)
        lines.append(json.dumps({"file": file, "caption": record.caption,
                                 "concept": record.concept, "category": record.category,
                                 "style": style}, ensure_ascii=False))
    (folder / CAPTIONS).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def _new_dropped() -> dict[str, int]:
    return {"skin_tone_variant": 0, "excluded_category": 0, "duplicate_concept": 0,
            "unreadable": 0, "duplicate_image": 0}


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically: readers see the old one or the new one, never a part."""
    from dprdm.files import write_bytes_atomically

    (root / MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _check_split_names(splits: Iterable[str] | None) -> tuple[str, ...]:
    if splits is None:
        return tuple(SPLITS)
    names = tuple(dict.fromkeys(splits))
    unknown = [name for name in names if name not in SPLITS]
    if unknown or not names:
        raise InvalidParameterError(f"unknown splits {unknown or names}; choose from "
                                    f"{', '.join(SPLITS)}")
    if set(OPENMOJI_SPLITS) & set(names):  # made together from one split of the concepts
        names = tuple(dict.fromkeys(names + OPENMOJI_SPLITS))
    return names


def _packages_needed(names: Iterable[str]) -> set[str]:
    needed = {OPENMOJI.package}  # its names are every style's captions
    for name in names:
        style = SPLITS[name][1]
        needed.add(style.package)
        if style in JOINED_STYLES:
            needed.add(INDEX_STYLE.package)
    return needed


def prepare_demo_data(root: Path, size: int = 64, seed: int = 0, *,
                      holdout_fraction: float = HOLDOUT_FRACTION, force: bool = False,
                      show_progress: bool = True,
                      splits: Iterable[str] | None = None) -> dict[str, Any]:
    """Install the emoji packages under ``root/npm`` and write the demo domains under `root`.

    `splits` names the splits wanted (default: all of :data:`SPLITS`; ``make demo`` asks for
    :data:`DEMO_SPLITS`). A split the manifest records as made from the same settings and
    packages, with a complete folder, is reused as it is; only the others are prepared (`force`
    redoes the wanted ones). Returns the manifest (also written to ``root/data/manifest.json``,
    listing every complete split, wanted or not); its ``"reused"`` key is True when nothing was
    redone. The manifest is rewritten after each split, and a split about to be rewritten is
    first taken out of it, so it never lists a split that is not complete.
    """
    size = check_size(size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidParameterError(f"seed must be a non-negative whole number, got {seed!r}")
    names = _check_split_names(splits)
    root = Path(root)
    config = _config(size, seed, holdout_fraction)
    wanted = {name: made_from(name, size, seed, holdout_fraction) for name in SPLITS}
    old = _read_manifest(root)
    reusable = _reusable(root, old, wanted)
    todo = [name for name in names if force or name not in reusable]
    if set(OPENMOJI_SPLITS) & set(todo):
        todo = list(dict.fromkeys(todo + list(OPENMOJI_SPLITS)))
    if not todo:
        return {**old, "reused": True}

    started = time.monotonic()
    kept = {name: entry for name, entry in reusable.items() if name not in todo}
    kept_styles = {SPLITS[name][1].name for name in kept}
    manifest: dict[str, Any] = {
        "config": config,
        "packages": {},
        "splits": kept,
        "dropped": {k: v for k, v in (old.get("dropped") or {}).items() if k in kept_styles},
        "licences": {},
        "seconds": 0.0,
        "created_utc": "",
    }

    def save() -> None:
        styles = {SPLITS[name][1] for name in manifest["splits"]}
        manifest["packages"] = {s.package: NPM_PACKAGES[s.package]
                                for s in sorted(styles, key=lambda s: s.name)}
        manifest["licences"] = {s.name: {"licence": s.licence, "package": s.package,
                                         "attribution": s.attribution}
                                for s in sorted(styles, key=lambda s: s.name)}
        manifest["seconds"] = round(time.monotonic() - started, 1)
        manifest["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write_manifest(root, manifest)

    save()  # the splits about to be rewritten are no longer listed
    prefix = npm_dir(root)
    install_packages(prefix, _packages_needed(todo))
    modules = prefix / "node_modules"
    openmoji_entries = json.loads(
        (modules / "openmoji" / "data" / "openmoji.json").read_text(encoding="utf-8"))
    names_of = openmoji_names(openmoji_entries)

    def finish(name: str, kept_records: Sequence[EmojiRecord], images: Sequence[np.ndarray]):
        folder, style, role = SPLITS[name]
        count = _write_split(root / folder, style.name, kept_records, images)
        manifest["splits"][name] = {**_split_entry(folder, style, role, count),
                                    "made_from": wanted[name]}
        save()

    for style in (*PUBLIC_STYLES, *JOINED_STYLES):
        if style.name not in todo:
            continue
        package = modules / style.package
        dropped = manifest["dropped"][style.name] = _new_dropped()
        if style in PUBLIC_STYLES:
            entries = json.loads((package / "emoji.json").read_text(encoding="utf-8"))
            records = datasource_records(entries, package / style.image_dir, names_of, dropped)
        else:
            entries = json.loads((modules / INDEX_STYLE.package / "emoji.json"
                                  ).read_text(encoding="utf-8"))
            image_dir = (unpack_iconify(package, prefix / "iconify" / style.name, dropped)
                         if style in ICONIFY_STYLES else package / style.image_dir)
            files = code_point_files(sorted(image_dir.glob(f"*.{style.image_type}")))
            records = joined_records(entries, files, names_of, dropped)
        kept_records, images = _render_all(records, _renderer(style, size),
                                           f"{style.name:>9} {style.image_type.upper()}",
                                           show_progress, dropped)
        finish(style.name, kept_records, images)

    if set(OPENMOJI_SPLITS) & set(todo):
        dropped = manifest["dropped"][OPENMOJI.name] = _new_dropped()
        records = openmoji_records(openmoji_entries,
                                   modules / OPENMOJI.package / OPENMOJI.image_dir, dropped)
        kept_records, images = _render_all(records, lambda p: render_openmoji(p, size),
                                           " openmoji SVG", show_progress, dropped)
        private, holdout = split_concepts((r.concept for r in kept_records), holdout_fraction,
                                          seed)
        for name, concepts in (("openmoji_private", set(private)), ("holdout", set(holdout))):
            chosen = [i for i, record in enumerate(kept_records) if record.concept in concepts]
            finish(name, [kept_records[i] for i in chosen], [images[i] for i in chosen])
    return {**manifest, "reused": False}


def _split_entry(folder: str, style: Style, role: str, count: int) -> dict[str, Any]:
    return {"path": folder, "style": style.name, "role": role, "count": count,
            "package": style.package, "version": NPM_PACKAGES[style.package],
            "licence": style.licence}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dprdm.data.emoji ROOT [--size N] [--seed S] [--force] [--splits A,B]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dprdm.data.emoji",
                                     description="Prepare the offline emoji demo domains.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="redo even if the manifest matches")
    parser.add_argument("--splits", default="",
                        help=f"comma-separated splits (default: all: {','.join(SPLITS)})")
    args = parser.parse_args(argv)
    wanted = [part.strip() for part in args.splits.split(",") if part.strip()] or None
    try:
        manifest = prepare_demo_data(args.root, args.size, args.seed, force=args.force,
                                     splits=wanted)
    except DprdmError as error:
        _stderr.print(f"[bold red]error:[/] {error}")
        return 2
    counts = {name: split["count"] for name, split in manifest["splits"].items()}
    print(json.dumps({"root": str(args.root), "reused": manifest["reused"], "counts": counts,
                      "seconds": manifest["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
