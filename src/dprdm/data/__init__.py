"""Captioned image datasets: decoding, on-disk loaders, and the offline emoji demo domains.

* :mod:`dprdm.data.images`  -- one decoding path: any image -> uint8 (size, size, 3) on white.
* :mod:`dprdm.data.loaders` -- :class:`ImageDataset` from a folder + captions file, WebDataset
  shards or Parquet, and captionless image folders batch by batch; bad files are skipped and
  reported (counted per cause), never fatal.
* :mod:`dprdm.data.emoji`   -- the Twemoji / Noto (public) and OpenMoji (private + holdout) demo
  domains, built from pinned npm packages (imported on demand: it needs cairosvg).
"""

from dprdm.data.images import UnreadableImageError, crop_to_alpha, decode_image
from dprdm.data.loaders import (ImageDataset, LoadReport, describe_skips, iter_image_folder,
                                load_dataset, load_folder, load_parquet, load_webdataset,
                                scan_image_folder)

__all__ = [
    "ImageDataset",
    "LoadReport",
    "UnreadableImageError",
    "crop_to_alpha",
    "decode_image",
    "describe_skips",
    "iter_image_folder",
    "load_dataset",
    "load_folder",
    "load_parquet",
    "load_webdataset",
    "scan_image_folder",
]
