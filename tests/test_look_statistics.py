"""The look statistics (dprdm.evaluation.look): outline weight and fill colour of drawn images."""

import colorsys

import numpy as np
import pytest

from dprdm.errors import InvalidParameterError
from dprdm.evaluation.look import look_statistics

SIZE = 32


def outlined_square(fill_rgb, width: int) -> np.ndarray:
    """A white image with a 20x20 square: a black border `width` px wide around a flat fill."""
    image = np.full((SIZE, SIZE, 3), 255, np.uint8)
    image[6:26, 6:26] = 0
    image[6 + width:26 - width, 6 + width:26 - width] = fill_rgb
    return image


def test_outline_weight_and_flat_light_fill_are_measured():
    fill = (200, 230, 250)  # a light, flat blue
    stats = look_statistics(np.stack([outlined_square(fill, 2)]))
    assert stats["foreground_share"] == pytest.approx(400 / SIZE**2)
    assert stats["ink_share"] == pytest.approx((400 - 16 * 16) / 400)
    lightness, saturation = colorsys.rgb_to_hls(*(c / 255 for c in fill))[1:]
    assert stats["fill_lightness"] == pytest.approx(lightness, abs=1e-4)
    assert stats["fill_saturation"] == pytest.approx(saturation, abs=1e-4)
    assert stats["fill_flatness"] == 1.0


def test_thicker_outlines_weigh_more_and_averages_are_over_images():
    thin, thick = outlined_square((250, 200, 120), 1), outlined_square((250, 200, 120), 4)
    one = look_statistics(thin[None])["ink_share"]
    other = look_statistics(thick[None])["ink_share"]
    assert one < other
    assert look_statistics(np.stack([thin, thick]))["ink_share"] == pytest.approx(
        (one + other) / 2)


def test_a_gradient_fill_is_not_flat_and_a_saturated_fill_is_saturated():
    image = outlined_square((0, 0, 0), 1)
    ramp = 100 + 9 * np.arange(18)  # steps of 9 / 255 down (red) and across (green)
    image[7:25, 7:25, 0] = ramp[:, None]
    image[7:25, 7:25, 1] = ramp[None, :]
    image[7:25, 7:25, 2] = 200
    assert look_statistics(image[None])["fill_flatness"] == 0.0  # a soft gradient, not flat
    image[7:25, 7:16] = 120  # the left half one flat grey
    assert 0.4 < look_statistics(image[None])["fill_flatness"] < 0.6
    red = look_statistics(outlined_square((230, 20, 20), 1)[None])
    grey = look_statistics(outlined_square((150, 150, 150), 1)[None])
    assert red["fill_saturation"] > 0.8 and grey["fill_saturation"] == 0.0


def test_blank_and_ink_only_images_are_left_out_of_what_they_lack():
    blank = np.full((SIZE, SIZE, 3), 255, np.uint8)
    black = outlined_square((0, 0, 0), 10)  # ink only: no fill pixels
    stats = look_statistics(np.stack([blank, black]))
    assert stats["foreground_share"] == pytest.approx(400 / SIZE**2 / 2)
    assert stats["ink_share"] == 1.0  # the blank image has no foreground to weigh
    assert np.isnan(stats["fill_lightness"]) and np.isnan(stats["fill_flatness"])


def test_bad_images_are_refused():
    with pytest.raises(InvalidParameterError, match="uint8"):
        look_statistics(np.zeros((1, SIZE, SIZE, 3), np.float32))
