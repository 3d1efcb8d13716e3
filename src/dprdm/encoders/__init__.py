"""Encoders: text and images -> unit-norm embeddings in one shared space.

The first stage of the prompt's path (encoder -> private step -> ledger -> generator). Owns:

* :mod:`dprdm.encoders.base`  -- the :class:`Encoder` contract (``encode_text``,
  ``encode_images``: ``float32 (N, dim)``, unit rows, batched, deterministic) and
  :func:`load_encoder` (``"demo"`` or a checkpoint directory; never downloads).
* :mod:`dprdm.encoders.clip`  -- :class:`ClipEncoder`, any Hugging Face CLIP checkpoint on disk.
* :mod:`dprdm.encoders.demo`  -- :class:`DemoEncoder`, frozen MiniLM text + a small trained CNN,
  the shipped emoji demo encoder (``dprdm/weights/demo-encoder``).
* :mod:`dprdm.encoders.train_demo` -- how the demo weights are trained (public data only).
* :mod:`dprdm.encoders.evaluate` -- content-retrieval and style-retention measurements.

Nothing here touches privacy: encoders see whatever they are given; the private step decides
what may be released.
"""

from dprdm.encoders.base import (DEFAULT_BATCH_SIZE, Encoder, EncoderLoadError, check_images,
                                 check_texts, load_encoder)
from dprdm.encoders.clip import ClipEncoder
from dprdm.encoders.demo import DemoEncoder, DemoEncoderConfig, shipped_weights_dir

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "ClipEncoder",
    "DemoEncoder",
    "DemoEncoderConfig",
    "Encoder",
    "EncoderLoadError",
    "check_images",
    "check_texts",
    "load_encoder",
    "shipped_weights_dir",
]
