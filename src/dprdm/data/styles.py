"""Generic style augmentations: turn any public image set into extra, differently drawn "sources".

Owns :data:`STYLE_AUGMENTATIONS`, a name -> transform table. Every transform takes a batch
``uint8 (N, H, W, 3)`` of images on a white background (what :func:`dprdm.data.decode_image`
produces) and a :class:`numpy.random.Generator`, and returns a new ``uint8 (N, H, W, 3)`` batch.
Per-image parameters (thickness, number of colour levels, hue angle, ...) are drawn from the
generator, so a transform is deterministic given the generator's state; the input is never
modified. Line widths and blur radii scale with the image side, so 32 px and 64 px images look
alike. Everything is vectorised numpy (shifted copies and masks) except ``flat``, which runs
Pillow's quantiser image by image; all of them take seconds on a few thousand icons.

The transforms are GENERIC drawing styles a user would apply to any public collection (icons,
clip art, emoji) to teach an encoder that style is a direction of its own: they were written from
the style names below, never tuned against a private collection.

=============  ================================================================================
``outline``     thin dark lines around the silhouette and on strong colour edges, fill kept
``flat``        flat colour: a light blur removes shading, then a 4-8 colour median-cut palette
``thick_stroke`` a thick dark stroke around the silhouette only (sticker / badge look)
``line_art``    dark edge lines on white, fill removed (colouring-book look)
``greyscale``   luminance only
``hue_shift``   every hue rotated by 60-300 degrees (white and greys stay put)
``soft``        blurred, slightly washed out (airbrush / low-resolution look)
=============  ================================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from dprdm.errors import InvalidParameterError

StyleAugmentation = Callable[[np.ndarray, np.random.Generator], np.ndarray]

BACKGROUND_THRESHOLD = 240  # a pixel is background when every channel is at least this
EDGE_THRESHOLD = 40.0  # colour change (max over channels, 0-255) that counts as an edge
OUTLINE_EDGE_THRESHOLD = 90.0  # ... that `outline` inks (shading below it stays fill)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# helpers (all batched: images (N, H, W, 3), masks (N, H, W))


def check_images(images: object) -> np.ndarray:
    """The input contract of every augmentation: a ``uint8 (N, H, W, 3)`` array."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InvalidParameterError(
            f"images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images))}"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidParameterError(f"images must have shape (N, H, W, 3), got {images.shape}")
    return images


def _scale(images: np.ndarray) -> float:
    """Line widths are given for a 32 px image; this is the factor for the actual size."""
    return min(images.shape[1], images.shape[2]) / 32.0


def foreground(images: np.ndarray, threshold: int = BACKGROUND_THRESHOLD) -> np.ndarray:
    """bool (N, H, W): pixels that are not (near-)white background (some channel < threshold)."""
    return (images < threshold).any(axis=-1)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of (N, H, W) masks by a (2r+1)^2 square, as r passes of a 3x3 max."""
    out = mask
    for _ in range(max(int(radius), 0)):
        padded = np.pad(out, ((0, 0), (1, 1), (1, 1)))
        rows = padded[:, :-2] | padded[:, 1:-1] | padded[:, 2:]
        out = rows[:, :, :-2] | rows[:, :, 1:-1] | rows[:, :, 2:]
    return out


def colour_changes(images: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dy): whether each pixel's colour differs from its right / lower neighbour by more
    than `threshold` (max over channels), shapes (N, H, W-1) and (N, H-1, W)."""
    x = images.astype(np.int16)
    dx = np.abs(x[:, :, 1:] - x[:, :, :-1]).max(axis=-1) > threshold
    dy = np.abs(x[:, 1:] - x[:, :-1]).max(axis=-1) > threshold
    return dx, dy


def edges(images: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """bool (N, H, W): pixels whose colour differs from a right or lower neighbour by > threshold.

    The silhouette counts too: the image is compared as is, and white background against a
    coloured pixel is a large change.
    """
    dx, dy = colour_changes(images, threshold)
    mask = np.zeros(images.shape[:3], dtype=bool)
    mask[:, :, 1:] |= dx
    mask[:, :, :-1] |= dx
    mask[:, 1:] |= dy
    mask[:, :-1] |= dy
    return mask


def box_blur(images: np.ndarray, radius: int) -> np.ndarray:
    """float32 separable box blur of (N, H, W, C) with edge padding; radius 0 is a copy."""
    x = images.astype(np.float32)
    if radius <= 0:
        return x
    k = 2 * radius + 1
    for axis in (1, 2):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        c = np.cumsum(np.pad(x, pad, mode="edge"), axis=axis, dtype=np.float32)
        zero_shape = list(c.shape)
        zero_shape[axis] = 1
        c = np.concatenate([np.zeros(zero_shape, np.float32), c], axis=axis)
        n = x.shape[axis]
        hi = np.take(c, np.arange(k, k + n), axis=axis)
        lo = np.take(c, np.arange(0, n), axis=axis)
        x = (hi - lo) / k
    return x


def _dark_colours(n: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 1, 1, 3): near-black ink, one grey level per image."""
    level = rng.integers(0, 48, size=n)
    return np.repeat(level[:, None], 3, axis=1).astype(np.uint8)[:, None, None, :]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _paint(images: np.ndarray, mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Copy of `images` with the pixels in `mask` set to each image's colour."""
    return np.where(mask[..., None], colours, images).astype(np.uint8)


def _per_image_radius(images: np.ndarray, rng: np.random.Generator, low: float,
                      high: float) -> np.ndarray:
    """int (N,): a radius in [low, high] * scale per image, at least 1."""
    scale = _scale(images)
    return np.maximum(1, np.rint(rng.uniform(low, high, size=len(images)) * scale)).astype(int)


def _dilate_each(mask: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Dilate each image's mask by its own radius (grouped by radius: few distinct values)."""
    out = np.empty_like(mask)
    for radius in np.unique(radii):
        chosen = radii == radius
        out[chosen] = dilate(mask[chosen], int(radius))
    return out


# ---------------------------------------------------------------------------------------------
# the transforms


def one_sided_edges(images: np.ndarray, threshold: float, within: np.ndarray) -> np.ndarray:
    """bool (N, H, W): pixels whose colour differs from their right or lower neighbour by more
    than `threshold`, both pixels inside the `within` mask -- one pixel per colour change
    (:func:`edges` marks both sides, and the silhouette)."""
    dx, dy = colour_changes(images, threshold)
    mask = np.zeros(images.shape[:3], dtype=bool)
    mask[:, :, :-1] |= dx & within[:, :, 1:] & within[:, :, :-1]
    mask[:, :-1] |= dy & within[:, 1:] & within[:, :-1]
    return mask


def outline(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thin dark lines around the silhouette and along strong colour edges; the fill is kept.

    One pixel per line at 32 px (1-2 at 64 px): a ring just outside the silhouette, and one side
    of every colour change above OUTLINE_EDGE_THRESHOLD inside it (shading gradients stay fill).
    Until 2026-11-28 this marked both sides of every change above EDGE_THRESHOLD, which at 32 px
    turned most icons into near-black blots; the shipped demo encoder and evaluation classifiers
    were trained with that version, the generator from v4 on with this one (docs/generator.md).
    """
    images = check_images(images)
    fg = foreground(images)
    lines = (dilate(fg, 1) & ~fg) | one_sided_edges(images, OUTLINE_EDGE_THRESHOLD, fg)
    thick = _per_image_radius(images, rng, 0.0, 0.6) > 1  # at 32 px: 1 px lines; at 64 px: 1-2
    lines = np.where(thick[:, None, None], dilate(lines, 1), lines)
    return _paint(images, lines, _dark_colours(len(images), rng))


def flat(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat colour: shading and texture removed, each image reduced to a 4-8 colour palette.

    A light blur first, then Pillow's median-cut quantiser (no dithering) per image, so every
    region becomes one flat colour close to its original hue. Background stays as it was.
    """
    images = check_images(images)
    smooth = _to_uint8(box_blur(images, max(1, round(_scale(images) * 0.5))))
    colours = rng.integers(4, 9, size=len(images))
    out = np.empty_like(images)
    for i, (pixels, n_colours) in enumerate(zip(smooth, colours)):
        quantised = Image.fromarray(pixels).quantize(
            colors=int(n_colours), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        out[i] = np.asarray(quantised.convert("RGB"))
    return np.where(foreground(images)[..., None], out, images).astype(np.uint8)


def thick_stroke(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A thick dark stroke around the silhouette (outside it), interior untouched."""
    images = check_images(images)
    fg = foreground(images)
    ring = _dilate_each(fg, _per_image_radius(images, rng, 1.5, 2.5)) & ~fg
    return _paint(images, ring, _dark_colours(len(images), rng))


def line_art(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Only the edges, drawn dark on a white page (the fill is removed)."""
    images = check_images(images)
    lines = edges(images)
    thick = _per_image_radius(images, rng, 0.0, 0.6) > 1
    lines = np.where(thick[:, None, None], dilate(lines, 1), lines)
    white = np.full_like(images, 255)
    return _paint(white, lines, _dark_colours(len(images), rng))


def greyscale(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Luminance only (ITU-R 601 weights), as three equal channels."""
    images = check_images(images)
    luma = _to_uint8(images.astype(np.float32) @ _LUMA)
    return np.repeat(luma[..., None], 3, axis=-1)


def hue_shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate every hue by an angle in [60, 300] degrees about the grey axis.

    A rotation in the YIQ chroma plane: luminance and greys (white included) are unchanged.
    """
    images = check_images(images)
    degrees = rng.uniform(60.0, 300.0, size=len(images))
    matrices = np.array([hue_rotation(angle) for angle in degrees],
                        dtype=np.float32).reshape(-1, 3, 3)
    out = np.einsum("nhwc,ndc->nhwd", images.astype(np.float32), matrices)
    return _to_uint8(out)


_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                    [0.211, -0.523, 0.312]], dtype=np.float64)


def hue_rotation(degrees: float) -> np.ndarray:
    """float32 (3, 3): rotates RGB column colours' hue by `degrees` about the grey axis (a
    rotation in the YIQ chroma plane; luminance and greys, white included, stay put)."""
    theta = np.deg2rad(float(degrees))
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    return (np.linalg.inv(_TO_YIQ) @ rot @ _TO_YIQ).astype(np.float32)


def soft(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blurred and a little washed out (mixed 15-30 % towards white)."""
    images = check_images(images)
    radii = _per_image_radius(images, rng, 1.0, 1.5)
    out = np.empty(images.shape, dtype=np.float32)
    for radius in np.unique(radii):
        chosen = radii == radius
        out[chosen] = box_blur(images[chosen], int(radius))
    wash = rng.uniform(0.15, 0.30, size=len(images)).astype(np.float32)[:, None, None, None]
    return _to_uint8(out * (1.0 - wash) + 255.0 * wash)


STYLE_AUGMENTATIONS: dict[str, StyleAugmentation] = {
    "outline": outline,
    "flat": flat,
    "thick_stroke": thick_stroke,
    "line_art": line_art,
    "greyscale": greyscale,
    "hue_shift": hue_shift,
    "soft": soft,
}


def apply_style(name: str, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``STYLE_AUGMENTATIONS[name](images, rng)`` with a clear error for an unknown name."""
    try:
        transform = STYLE_AUGMENTATIONS[name]
    except KeyError:
        known = ", ".join(STYLE_AUGMENTATIONS)
        raise InvalidParameterError(
            f"unknown style augmentation {name!r}; known: {known}") from None
    return transform(images, rng)
