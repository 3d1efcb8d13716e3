"""Writing generated images: single PNGs (atomically) and labelled grids for people to look at."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dprdm.files import write_bytes_atomically


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: Path, image: np.ndarray) -> None:
    write_bytes_atomically(path, png_bytes(image))


def image_grid(
    images: np.ndarray,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    scale: int = 2,
    gap: int = 4,
) -> np.ndarray:
    """(R, C, H, W, 3) uint8 -> one (.., .., 3) uint8 picture, nearest-upscaled by `scale`, with
    optional row labels on the left and column labels on top."""
    images = np.asarray(images, dtype=np.uint8)
    rows, cols, height, width = images.shape[:4]
    cell_h, cell_w = height * scale, width * scale
    font = ImageFont.load_default()
    label_w = 8 + 7 * max((len(label) for label in row_labels), default=0)
    label_h = 16 if column_labels else 0
    canvas = Image.new(
        "RGB",
        (label_w + cols * (cell_w + gap) + gap, label_h + rows * (cell_h + gap) + gap),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels):
        draw.text((label_w + gap + c * (cell_w + gap), 2), label, fill="black", font=font)
    for r in range(rows):
        top = label_h + gap + r * (cell_h + gap)
        if r < len(row_labels):
            draw.text((4, top + cell_h // 2 - 6), row_labels[r], fill="black", font=font)
        for c in range(cols):
            tile = Image.fromarray(images[r, c]).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + gap + c * (cell_w + gap), top))
    return np.asarray(canvas)
