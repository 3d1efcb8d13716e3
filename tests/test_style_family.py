"""The procedural style family: recipes are fixed styles, deterministic, and do what they say."""

import numpy as np
import pytest

from dprdm.data.style_family import StyleRecipe, apply_recipe, sample_recipe, style_family
from dprdm.data.styles import foreground
from dprdm.errors import InvalidParameterError


def _icons(n=6, size=32, seed=0):
    """White pages with a coloured two-tone disc (a strong inner edge) in the middle."""
    rng = np.random.default_rng(seed)
    images = np.full((n, size, size, 3), 255, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        r = size * rng.uniform(0.2, 0.3)
        disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r
        images[i][disc] = rng.integers(0, 200, size=3)
        images[i][disc & (xx > size / 2)] = rng.integers(0, 200, size=3)
    return images


def test_family_is_seeded_and_varied():
    a, b = style_family(200, seed=3), style_family(200, seed=3)
    assert a == b
    assert style_family(200, seed=4) != a
    assert len(set(a)) == 200  # distinct sources
    assert {r.fill for r in a} == {"keep", "flat", "posterise", "none"}
    assert {r.outline_width for r in a} == {0, 1, 2, 3}
    assert any(r.background != (255, 255, 255) for r in a)
    assert all(r.outline_width >= 1 for r in a if r.fill == "none")


def test_identity_recipe_keeps_images_and_input_untouched():
    images = _icons()
    before = images.copy()
    assert np.array_equal(apply_recipe(images, StyleRecipe()), images)
    for recipe in style_family(30, seed=0):
        out = apply_recipe(images, recipe)
        assert out.dtype == np.uint8 and out.shape == images.shape
        assert np.array_equal(apply_recipe(images, recipe), out)  # deterministic
    assert np.array_equal(images, before)


def test_outline_is_a_ring_of_the_given_width_in_the_line_colour():
    images = _icons()
    fg = foreground(images)
    out = apply_recipe(images, StyleRecipe(outline_width=2, line_colour=(10, 20, 30)))
    inked = (out == np.array([10, 20, 30], np.uint8)).all(axis=-1)
    assert inked.any() and not (inked & fg).any()  # outside the silhouette only
    # every inked pixel is within 2 px of the silhouette, and the fill is unchanged
    from dprdm.data.styles import dilate
    assert not (inked & ~dilate(fg, 2)).any()
    assert np.array_equal(out[fg], images[fg])


def test_inner_lines_are_thin_and_stroke_only_removes_the_fill():
    images = _icons()
    fg = foreground(images)
    out = apply_recipe(images, StyleRecipe(fill="none", outline_width=1, inner_lines=True))
    inside_ink = (out[fg] == 0).all(axis=-1)
    assert 0 < inside_ink.sum() < 0.25 * fg.sum()  # a line across the disc, not a blot
    assert ((out[fg] == 255).all(axis=-1) | inside_ink).all()  # the rest of the fill is white


def test_fills_and_colours():
    images = _icons()
    fg = foreground(images)
    flat = apply_recipe(images, StyleRecipe(fill="posterise", n_colours=2))
    assert set(np.unique(flat[fg])) <= {0, 255}
    light = apply_recipe(images, StyleRecipe(lightness=0.5))
    assert (light[fg].astype(int) >= images[fg].astype(int)).all()
    grey = apply_recipe(images, StyleRecipe(saturation=0.0))
    assert (np.ptp(grey[fg].astype(int), axis=-1) <= 1).all()
    page = apply_recipe(images, StyleRecipe(background=(230, 240, 250)))
    assert (page[~fg] == np.array([230, 240, 250], np.uint8)).all()


def test_margin_and_shadow():
    images = np.zeros((2, 32, 32, 3), np.uint8)  # full bleed
    framed = apply_recipe(images, StyleRecipe(margin=0.2))
    assert (framed[:, :5] == 255).all() and (framed[:, :, :5] == 255).all()
    shadowed = apply_recipe(_icons(), StyleRecipe(shadow=2))
    assert ((shadowed == 170).all(axis=-1)).any()


@pytest.mark.parametrize("bad", [dict(fill="crayon"), dict(n_colours=1), dict(margin=0.4),
                                 dict(outline_width=-1), dict(line_colour=(0, 0, 300)),
                                 dict(saturation=3.0)])
def test_bad_recipes_are_refused(bad):
    with pytest.raises(InvalidParameterError):
        StyleRecipe(**bad)


def test_recipe_round_trips_through_a_dict():
    recipe = sample_recipe(np.random.default_rng(5))
    assert StyleRecipe.from_dict(recipe.to_dict()) == recipe
