"""The generic style augmentations: contract, determinism, and that each one visibly draws."""

from __future__ import annotations

import numpy as np
import pytest

from dprdm.data.styles import STYLE_AUGMENTATIONS, apply_style, box_blur, dilate, edges
from dprdm.errors import InvalidParameterError


def toy_icons(n: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    """Emoji-like pictures: a shaded coloured disc with a darker feature, on white."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.full((n, h, w, 3), 255, dtype=np.uint8)
    for i in range(n):
        cy, cx = h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)
        r = min(h, w) * rng.uniform(0.3, 0.42)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        colour = rng.integers(40, 220, size=3)
        shade = (1.0 - 0.4 * (yy - (cy - r)) / (2 * r))[..., None]  # a vertical gradient
        out[i][disc] = np.clip(colour * shade, 0, 255).astype(np.uint8)[disc]
        eye = (yy - cy + r / 3) ** 2 + (xx - cx) ** 2 < (r / 5) ** 2
        out[i][eye] = (90, 40, 20)
    return out


NAMES = sorted(STYLE_AUGMENTATIONS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 64, 64), (2, 24, 40)])
def test_contract_shape_dtype_and_input_untouched(name, shape):
    images = toy_icons(*shape)
    before = images.copy()
    out = STYLE_AUGMENTATIONS[name](images, np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(images, before)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_the_generator(name):
    images = toy_icons(6)
    a = STYLE_AUGMENTATIONS[name](images, np.random.default_rng(7))
    b = STYLE_AUGMENTATIONS[name](images, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_each_visibly_changes_the_picture(name):
    images = toy_icons(6, 64, 64)
    out = STYLE_AUGMENTATIONS[name](images, np.random.default_rng(0))
    changed = np.abs(out.astype(int) - images.astype(int)).max(axis=-1) > 24
    # every image changes, and by more than a handful of pixels
    assert (changed.reshape(len(images), -1).mean(axis=1) > 0.01).all(), name


@pytest.mark.parametrize("name", NAMES)
def test_white_stays_white(name):
    white = np.full((2, 32, 32, 3), 255, dtype=np.uint8)
    np.testing.assert_array_equal(STYLE_AUGMENTATIONS[name](white, np.random.default_rng(0)),
                                  white)


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name):
    empty = np.zeros((0, 32, 32, 3), dtype=np.uint8)
    assert STYLE_AUGMENTATIONS[name](empty, np.random.default_rng(0)).shape == empty.shape


def test_what_each_style_means():
    images = toy_icons(4, 64, 64)
    rng = np.random.default_rng
    grey = STYLE_AUGMENTATIONS["greyscale"](images, rng(0))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    lines = STYLE_AUGMENTATIONS["line_art"](images, rng(0))
    assert set(np.unique(lines.max(axis=-1))) <= set(range(48)) | {255}  # ink or paper only
    flat = STYLE_AUGMENTATIONS["flat"](images, rng(0))
    for image in flat:  # a handful of colours (<= 8 plus the untouched background)
        assert len(np.unique(image.reshape(-1, 3), axis=0)) <= 9
    stroke = STYLE_AUGMENTATIONS["thick_stroke"](images, rng(0))
    fg = (images < 240).any(-1)
    np.testing.assert_array_equal(stroke[fg], images[fg])  # interior untouched
    assert ((stroke.max(-1) < 48) & ~fg).any()  # dark ring outside it
    soft = STYLE_AUGMENTATIONS["soft"](images, rng(0))
    assert np.abs(np.diff(soft.astype(int), axis=2)).mean() < \
        np.abs(np.diff(images.astype(int), axis=2)).mean()
    hue = STYLE_AUGMENTATIONS["hue_shift"](images, rng(0))
    luma = np.array([0.299, 0.587, 0.114])
    assert np.abs(hue @ luma - images @ luma).max() < 40  # luminance roughly kept


def test_helpers():
    mask = np.zeros((1, 7, 7), bool)
    mask[0, 3, 3] = True
    assert dilate(mask, 1).sum() == 9 and dilate(mask, 2).sum() == 25
    x = np.zeros((1, 8, 8, 3), np.uint8)
    np.testing.assert_allclose(box_blur(x + 100, 2), 100.0)
    x[0, :, 4:] = 255
    e = edges(x)
    assert e[0, :, 3:5].all() and not e[0, :, :3].any()


def test_bad_input():
    with pytest.raises(InvalidParameterError):
        STYLE_AUGMENTATIONS["outline"](np.zeros((2, 8, 8, 3), np.float32),
                                       np.random.default_rng(0))
    with pytest.raises(InvalidParameterError):
        STYLE_AUGMENTATIONS["soft"](np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0))
    with pytest.raises(InvalidParameterError, match="unknown style"):
        apply_style("watercolour", toy_icons(1), np.random.default_rng(0))
    assert apply_style("greyscale", toy_icons(1), np.random.default_rng(0)).shape == (1, 32, 32, 3)


def test_outline_draws_one_pixel_lines_at_32_px_and_keeps_shading_as_fill():
    from dprdm.data.styles import outline

    image = np.full((1, 32, 32, 3), 255, np.uint8)
    image[0, 8:24, 8:16] = (200, 40, 40)  # red half ...
    image[0, 8:24, 16:24] = (40, 40, 200)  # ... blue half: one strong colour edge
    shaded = image.copy()
    shaded[0, 8:24, 8:16] = np.linspace(200, 150, 16).astype(np.uint8)[:, None, None]  # gradient
    for picture in (image, shaded):
        # radius draws below 1.5 (always at 32 px) keep lines one pixel wide
        out = outline(picture, np.random.default_rng(0))
        ink = (out != picture).any(axis=-1)[0]
        ring = np.zeros((32, 32), bool)
        ring[7:25, 7:25] = True
        ring[8:24, 8:24] = False
        inner = np.zeros((32, 32), bool)
        inner[8:24, 15] = True  # one side of the red | blue edge; the gradient stays fill
        np.testing.assert_array_equal(ink & ~ring, inner)
        assert ring.sum() == (ink & ring).sum()  # the whole silhouette ring, one pixel wide
