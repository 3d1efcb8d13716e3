"""Turning one image file into the pixels dprdm works with.

Owns the single decoding path every loader uses, so all datasets look alike to the encoders:

* :func:`decode_image` -- bytes, a path, a PIL image or an array -> ``uint8 (size, size, 3)``:
  decode with Pillow, apply the EXIF orientation, convert to RGBA, composite onto WHITE, pad to a
  square with white (aspect ratio kept, content centred), then resize to ``size x size``.
* :func:`crop_to_alpha` -- crop RGBA artwork to the bounding box of its visible pixels and pad it
  to a square with a transparent margin (for icons and emoji drawn with wide transparent margins).
* :class:`UnreadableImageError` -- raised for anything Pillow cannot decode; loaders catch it,
  record the reason and skip the file.

Resampling filters: :data:`DOWNSCALE_FILTER` (Lanczos) when the padded square is larger than
``size``; :data:`UPSCALE_FILTER` (bicubic, which rings less than Lanczos when enlarging) when it is
smaller; no resampling when it already is ``size``. Compositing happens BEFORE resizing, so
transparent pixels (whatever colour they store) never bleed into the result.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from dprdm.errors import DprdmError, InvalidParameterError

DOWNSCALE_FILTER = Image.Resampling.LANCZOS
UPSCALE_FILTER = Image.Resampling.BICUBIC
WHITE = (255, 255, 255)

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike, Image.Image, np.ndarray]


class UnreadableImageError(DprdmError, ValueError):
    """An image could not be read or decoded (missing, truncated, not an image, too large).

    `kind` names the cause for reports: ``missing``, ``unreadable`` (permissions, a folder, an I/O
    error), ``corrupt`` (not an image, or truncated), ``too_large`` (a decompression bomb) or
    ``invalid`` (an array of the wrong shape or type).
    """

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind

    code = "unreadable_image"


def check_size(size: object) -> int:
    """Validate an output side length in pixels."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidParameterError(f"size must be a positive whole number of pixels, got {size!r}")
    return size


def _open(source: ImageSource) -> Image.Image:
    """Open and fully decode `source` (truncation surfaces here, not later)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source)
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* becomes an error: a loader skips the file instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray, memoryview)):
                image = Image.open(io.BytesIO(bytes(source)))
            else:
                image = Image.open(Path(source))
            image.load()
    except FileNotFoundError as error:
        raise UnreadableImageError(f"file not found: {error.filename}", "missing") from None
    except (PermissionError, IsADirectoryError) as error:
        raise UnreadableImageError(f"cannot read file: {error.strerror}", "unreadable") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImageError(f"image too large: {error}", "too_large") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UnreadableImageError(f"cannot decode image: {error}") from None
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise UnreadableImageError(
            f"an image array must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {array.dtype} "
            f"{array.shape}", "invalid"
        )
    if array.ndim == 3 and array.shape[2] not in (3, 4):
        raise UnreadableImageError(f"an image array needs 3 or 4 channels, got {array.shape}",
                                   "invalid")
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgba(image: Image.Image) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block is not worth losing the image over
        pass
    # Everything else (P with a transparent index, LA, L, RGB, CMYK, 1) via Pillow's converters.
    if image.mode == "RGBA":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High bit-depth greys: scale to 8 bits first (Pillow's converter would clip at 255).
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) or 1.0
        image = Image.fromarray((array * (255.0 / max(peak, 255.0))).astype(np.uint8))
    return image.convert("RGBA")


def composite_on_white(image: Image.Image) -> Image.Image:
    """RGBA (or anything convertible) -> RGB with transparent areas filled white."""
    rgba = _to_rgba(image)
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def pad_to_square(image: Image.Image, fill: tuple[int, ...] = WHITE) -> Image.Image:
    """Centre `image` on a square canvas of side max(width, height) filled with `fill`."""
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Resize a square image to size x size with the documented filter for the direction."""
    side = image.size[0]
    if side == size:
        return image
    resample = DOWNSCALE_FILTER if side > size else UPSCALE_FILTER
    return image.resize((size, size), resample=resample)


def decode_image(source: ImageSource, size: int) -> np.ndarray:
    """Decode `source` into a ``uint8`` array of shape ``(size, size, 3)`` on a white background.

    `source` may be encoded bytes, a path, a PIL image or a uint8 array (RGB or RGBA). Raises
    :class:`UnreadableImageError` when it cannot be decoded.
    """
    size = check_size(size)
    image = _open(source)
    if image.size[0] < 1 or image.size[1] < 1:
        raise UnreadableImageError(f"image has no pixels: {image.size}")
    rgb = composite_on_white(image)
    square = resize_square(pad_to_square(rgb), size)
    out = np.asarray(square, dtype=np.uint8)
    return np.ascontiguousarray(out.reshape(size, size, 3))


def crop_to_alpha(rgba: np.ndarray, pad_fraction: float = 0.0, threshold: int = 0) -> np.ndarray:
    """Crop RGBA artwork to its visible pixels and pad it to a transparent square.

    Pixels with alpha > `threshold` are visible. The crop is centred on a square of side
    ``round(longest_side * (1 + 2 * pad_fraction))``, so `pad_fraction` is the margin on each side
    as a fraction of the content's longer side. A fully transparent input is returned unchanged.
    """
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
        raise InvalidParameterError(f"crop_to_alpha needs a uint8 (H, W, 4) array, got "
                                    f"{rgba.dtype} {rgba.shape}")
    if not 0.0 <= pad_fraction <= 1.0:
        raise InvalidParameterError(f"pad_fraction must be in [0, 1], got {pad_fraction}")
    visible = rgba[:, :, 3] > threshold
    rows = np.flatnonzero(visible.any(axis=1))
    cols = np.flatnonzero(visible.any(axis=0))
    if rows.size == 0:
        return rgba.copy()
    content = rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = content.shape[:2]
    side = max(1, round(max(height, width) * (1.0 + 2.0 * pad_fraction)))
    out = np.zeros((side, side, 4), dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    out[top:top + height, left:left + width] = content
    return out
