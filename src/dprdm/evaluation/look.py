"""Pixel statistics of an emoji's look: how heavy its dark lines are and how its fills are coloured.

The style networks say whether images look like a style; these numbers say in which way they
differ, for things a reviewer checks by eye (issue 18: "outlines thin and even, fills flat and
light"). Images are uint8 (N, S, S, 3) on a white background. Per image, each pixel is

* background: every channel above 0.92 (near white);
* ink: HLS lightness below 0.25 (outlines, dark strokes, black fills);
* fill: the rest of the foreground.

and :func:`look_statistics` averages over the images:

* ``ink_share``       -- ink pixels / foreground pixels (the weight of the outlines);
* ``fill_lightness``  -- mean HLS lightness of fill pixels;
* ``fill_saturation`` -- mean HLS saturation of fill pixels;
* ``fill_flatness``   -- share of pairs of neighbouring fill pixels (side by side or stacked)
  whose colours differ by under 0.03 in every channel (flat colour areas, not gradients);
* ``foreground_share`` -- foreground pixels / all pixels.

An image with no foreground counts for ``foreground_share`` only; one with no fill pixels is left
out of the fill statistics.
"""

from __future__ import annotations

import numpy as np

from dprdm.data.styles import colour_changes, foreground
from dprdm.evaluation.metrics import _check_images

BACKGROUND_MIN = 235  # of 255 (0.92): every channel at least this is background
INK_LIGHTNESS = 0.25
FLAT_STEP = 7  # of 255 (under 0.03): a flat area, not a soft gradient
LOOK_KEYS = ("ink_share", "fill_lightness", "fill_saturation", "fill_flatness",
             "foreground_share")


def _lightness_saturation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HLS lightness and saturation of float images in [0, 1] (..., 3)."""
    high, low = x.max(-1), x.min(-1)
    lightness = (high + low) / 2
    chroma = high - low
    denominator = 1.0 - np.abs(2.0 * lightness - 1.0)
    saturation = np.where(denominator > 1e-6, chroma / np.maximum(denominator, 1e-6), 0.0)
    return lightness, np.clip(saturation, 0.0, 1.0)


def look_statistics(images: np.ndarray) -> dict[str, float]:
    """The mean look statistics of uint8 images (N, S, S, 3) on white (module docstring)."""
    images = _check_images(images, "images")
    lightness, saturation = _lightness_saturation(images.astype(np.float32) / 255.0)
    is_foreground = foreground(images, BACKGROUND_MIN)
    ink = is_foreground & (lightness < INK_LIGHTNESS)
    fill = is_foreground & ~ink
    changes_across, changes_down = colour_changes(images, FLAT_STEP)
    pairs_across, pairs_down = fill[:, :, 1:] & fill[:, :, :-1], fill[:, 1:] & fill[:, :-1]
    flat = ((pairs_across & ~changes_across).sum((1, 2))
            + (pairs_down & ~changes_down).sum((1, 2)))
    pairs = pairs_across.sum((1, 2)) + pairs_down.sum((1, 2))
    per_image: dict[str, list[float]] = {key: [] for key in LOOK_KEYS}
    for i in range(len(images)):
        per_image["foreground_share"].append(float(is_foreground[i].mean()))
        if is_foreground[i].any():
            per_image["ink_share"].append(float(ink[i][is_foreground[i]].mean()))
        if fill[i].any():
            per_image["fill_lightness"].append(float(lightness[i][fill[i]].mean()))
            per_image["fill_saturation"].append(float(saturation[i][fill[i]].mean()))
            if pairs[i]:
                per_image["fill_flatness"].append(float(flat[i] / pairs[i]))
    return {key: (float(np.mean(values)) if values else float("nan"))
            for key, values in per_image.items()}
