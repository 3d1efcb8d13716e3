"""A procedural family of public drawing styles: thousands of distinct "sources" from a few real ones.

Owns :class:`StyleRecipe` (the parameters of one style), :func:`sample_recipe` (draws one from wide
ranges), :func:`style_family` (a fixed, seeded list of them), :func:`apply_recipe`, and
:func:`family_sources` (the training sources both the demo encoder and the generator use).

Why a family and not a handful of augmentations: a generator trained on 16 fixed sources learns to
snap its condition to the nearest of them; trained on hundreds of sources that differ along every
axis a drawing style has (line width and colour, fill, palette, lightness, shading, shadow,
background), the only way to draw the target's style is to read it from the condition. Unlike
:mod:`dprdm.data.styles`, whose transforms draw new parameters for every image, a recipe is FIXED:
every image of a source is drawn the same way, as a real style would draw it.

A recipe is applied to ``uint8 (N, H, W, 3)`` images on white (what
:func:`dprdm.data.decode_image` produces); it is deterministic and never modifies its input. Line
widths and blur radii are given for a 32 px image and scale with the side. The recipes were
written from the names of generic drawing styles, never tuned on a private collection.

Order of operations (each step optional, as the recipe says):

0. ``margin``: the drawing shrunk to leave this fraction of the side blank on each edge (framing:
   full-bleed icons versus icons with room for an outline);
1. fill: ``keep`` | ``flat`` (light blur + median-cut palette of ``n_colours``) | ``posterise``
   (``n_colours`` levels per channel) | ``none`` (white: stroke only);
2. colour of the fill: hue rotation, saturation scale, lightening towards white (or darkening);
3. ``soft``: a blur of the fill (airbrush look);
4. lines: a ring of ``outline_width`` px outside the silhouette and, with ``inner_lines``, one
   side of every strong colour edge inside it (always 1 px at 32 px: thick inner lines merge into
   blots at this size), in ``line_colour``;
5. ``shadow``: the silhouette, shifted down-right by ``shadow`` px, in grey behind the drawing;
6. ``background``: the white page replaced by a pale colour.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dprdm.data.styles import (box_blur, check_images, dilate, foreground, hue_rotation,
                               one_sided_edges)
from dprdm.errors import InvalidParameterError

FILLS = ("keep", "flat", "posterise", "none")
INNER_EDGE_THRESHOLD = 90.0  # colour change (0-255) inked by ``inner_lines``


@dataclass(frozen=True)
class StyleRecipe:
    """One drawing style. Widths are pixels at 32 px; colours are RGB 0-255."""

    margin: float = 0.0  # blank fraction of the side on each edge
    fill: str = "keep"
    n_colours: int = 6
    hue_degrees: float = 0.0
    saturation: float = 1.0  # 0 = greyscale, 1 = unchanged, > 1 = more vivid
    lightness: float = 0.0  # > 0 mixes the fill towards white, < 0 towards black
    soft: int = 0  # blur radius of the fill
    outline_width: int = 0  # 0 = no outline
    inner_lines: bool = False
    line_colour: tuple[int, int, int] = (0, 0, 0)
    shadow: int = 0  # drop-shadow offset, 0 = none
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.fill not in FILLS:
            raise InvalidParameterError(f"fill must be one of {FILLS}, got {self.fill!r}")
        if not 2 <= int(self.n_colours) <= 32:
            raise InvalidParameterError(f"n_colours must be in [2, 32], got {self.n_colours}")
        if not 0.0 <= self.margin <= 0.25:
            raise InvalidParameterError(f"margin must be in [0, 0.25], got {self.margin}")
        if not 0.0 <= self.saturation <= 2.0 or not -1.0 <= self.lightness <= 1.0:
            raise InvalidParameterError("saturation must be in [0, 2] and lightness in [-1, 1]")
        for name in ("soft", "outline_width", "shadow"):
            if not 0 <= int(getattr(self, name)) <= 8:
                raise InvalidParameterError(f"{name} must be in [0, 8], got {getattr(self, name)}")
        for name in ("line_colour", "background"):
            colour = getattr(self, name)
            if len(colour) != 3 or not all(0 <= int(c) <= 255 for c in colour):
                raise InvalidParameterError(f"{name} must be an RGB triple in 0-255")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StyleRecipe:
        data = dict(data)
        for name in ("line_colour", "background"):
            if name in data:
                data[name] = tuple(int(c) for c in data[name])
        return cls(**data)


def sample_recipe(rng: np.random.Generator) -> StyleRecipe:
    """One recipe with every parameter drawn from a wide range (all independent)."""
    fill = str(rng.choice(FILLS, p=[0.35, 0.35, 0.15, 0.15]))
    outline_width = int(rng.choice([0, 1, 1, 2, 3]))
    if fill == "none":
        outline_width = max(outline_width, 1)  # stroke only needs a stroke
    dark = rng.random() < 0.75
    if dark:
        line_colour = tuple(int(v) for v in np.full(3, rng.integers(0, 70)))
    else:  # a coloured ink
        line_colour = tuple(int(v) for v in rng.integers(0, 200, size=3))
    lightness = float(rng.uniform(-0.25, 0.5)) if rng.random() < 0.6 else 0.0
    background = (255, 255, 255)
    if rng.random() < 0.15:
        background = tuple(int(v) for v in rng.integers(215, 256, size=3))
    return StyleRecipe(
        margin=float(rng.uniform(0.0, 0.12)) if rng.random() < 0.6 else 0.0,
        fill=fill,
        n_colours=int(rng.integers(3, 13)),
        hue_degrees=float(rng.uniform(0, 360)) if rng.random() < 0.4 else 0.0,
        saturation=float(rng.uniform(0.0, 1.5)) if rng.random() < 0.5 else 1.0,
        lightness=lightness,
        soft=int(rng.random() < 0.15),
        outline_width=outline_width,
        inner_lines=bool(outline_width > 0 and rng.random() < 0.6),
        line_colour=line_colour,
        shadow=int(rng.choice([0, 0, 0, 0, 1, 2])),
        background=background,
    )


def style_family(n: int, seed: int) -> list[StyleRecipe]:
    """``n`` recipes drawn with ``numpy.random.default_rng(seed)``: the same list every time."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidParameterError(f"n must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    return [sample_recipe(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# applying a recipe


def _px(width: int, images: np.ndarray) -> int:
    """A width given at 32 px, for the images' actual side (at least 1 when width > 0)."""
    if width <= 0:
        return 0
    return max(1, round(width * min(images.shape[1], images.shape[2]) / 32.0))


def _shrink(images: np.ndarray, margin: float) -> np.ndarray:
    """Each image scaled down to (1 - 2 margin) of its side and centred on white."""
    n, h, w, _ = images.shape
    inner_h, inner_w = max(1, round(h * (1 - 2 * margin))), max(1, round(w * (1 - 2 * margin)))
    top, left = (h - inner_h) // 2, (w - inner_w) // 2
    out = np.full_like(images, 255)
    for i, pixels in enumerate(images):
        small = Image.fromarray(pixels).resize((inner_w, inner_h), Image.Resampling.LANCZOS)
        out[i, top:top + inner_h, left:left + inner_w] = np.asarray(small)
    return out


def _flat_fill(images: np.ndarray, n_colours: int) -> np.ndarray:
    radius = max(1, _px(1, images) // 2)  # a light blur: 1 px up to 64 px images
    smooth = np.clip(np.rint(box_blur(images, radius)), 0, 255).astype(np.uint8)
    out = np.empty_like(images)
    for i, pixels in enumerate(smooth):
        quantised = Image.fromarray(pixels).quantize(
            colors=n_colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        out[i] = np.asarray(quantised.convert("RGB"))
    return out


def _posterise(images: np.ndarray, n_levels: int) -> np.ndarray:
    step = 255.0 / (n_levels - 1)
    return np.clip(np.rint(np.rint(images / step) * step), 0, 255).astype(np.uint8)


def _recolour(fill: np.ndarray, recipe: StyleRecipe) -> np.ndarray:
    x = fill.astype(np.float32)
    if recipe.hue_degrees:
        x = np.einsum("nhwc,dc->nhwd", x, hue_rotation(recipe.hue_degrees))
    if recipe.saturation != 1.0:
        grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        x = grey[..., None] + recipe.saturation * (x - grey[..., None])
    if recipe.lightness > 0:
        x = x * (1.0 - recipe.lightness) + 255.0 * recipe.lightness
    elif recipe.lightness < 0:
        x = x * (1.0 + recipe.lightness)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def apply_recipe(images: np.ndarray, recipe: StyleRecipe) -> np.ndarray:
    """Draw ``uint8 (N, H, W, 3)`` images (on white) in ``recipe``'s style; a new array."""
    images = check_images(images)
    if not isinstance(recipe, StyleRecipe):
        raise InvalidParameterError(f"recipe must be a StyleRecipe, got {type(recipe).__name__}")
    if recipe.margin > 0:
        images = _shrink(images, recipe.margin)
    fg = foreground(images)
    if recipe.fill == "flat":
        fill = _flat_fill(images, int(recipe.n_colours))
    elif recipe.fill == "posterise":
        fill = _posterise(images, int(recipe.n_colours))
    elif recipe.fill == "none":
        fill = np.full_like(images, 255)
    else:
        fill = images.copy()
    edge_source = fill if recipe.fill != "none" else images
    if recipe.fill != "none":
        fill = _recolour(fill, recipe)
        if recipe.soft:
            blurred = box_blur(fill, _px(recipe.soft, images))
            fill = np.clip(np.rint(blurred), 0, 255).astype(np.uint8)
    out = np.where(fg[..., None], fill, 255).astype(np.uint8)

    if recipe.outline_width:
        width = _px(recipe.outline_width, images)
        lines = dilate(fg, width) & ~fg
        if recipe.inner_lines:
            inner = one_sided_edges(edge_source, INNER_EDGE_THRESHOLD, fg)
            thin = _px(1, images)
            lines |= (dilate(inner, thin - 1) & fg) if thin > 1 else inner
        out = np.where(lines[..., None], np.array(recipe.line_colour, np.uint8), out)
        drawn = fg | lines
    else:
        drawn = fg

    if recipe.shadow:
        shift = _px(recipe.shadow, images)
        shadow = np.zeros_like(drawn)
        shadow[:, shift:, shift:] = drawn[:, :-shift, :-shift]
        shadow &= ~drawn
        out = np.where(shadow[..., None], np.uint8(170), out)
        drawn = drawn | shadow

    if recipe.background != (255, 255, 255):
        out = np.where(drawn[..., None], out, np.array(recipe.background, np.uint8))
    return out.astype(np.uint8)


def family_sources(styles: Sequence[np.ndarray], size: int, seed: int, per_source: int,
                   rng: np.random.Generator) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Training sources: ``(j, base, rows, images)`` per recipe j of ``style_family(size,
    seed)``, drawn on ``per_source`` distinct images (`rows`, positions in ``styles[base]``) of
    the real style ``base = j % len(styles)``."""
    for j, recipe in enumerate(style_family(size, seed)):
        base = j % len(styles)
        rows = rng.choice(len(styles[base]), size=min(per_source, len(styles[base])),
                          replace=False)
        yield j, base, rows, apply_recipe(styles[base][rows], recipe)
