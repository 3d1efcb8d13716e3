"""The generator: conditioning vectors -> images, trained on PUBLIC images only.

Owns the latent diffusion model that turns ``c = lam * r + (1 - lam) * x`` (a noised private
aggregate r and a public text embedding x, see :mod:`dprdm.conditioning`) into an image:

* :mod:`dprdm.generation.layers`      -- GroupNorm-free residual blocks and attention.
* :mod:`dprdm.generation.autoencoder` -- :class:`Autoencoder`: 32 x 32 RGB <-> 8 x 8 x 4 (KL).
* :mod:`dprdm.generation.denoiser`    -- :class:`LatentDenoiser`: the condition enters as a spatial
  map concatenated to the input AND as FiLM with the timestep; a learned null condition for
  classifier-free guidance.
* :mod:`dprdm.generation.pipeline`    -- :class:`RetrievalDiffusionPipeline` (a diffusers pipeline:
  autoencoder + denoiser + swappable scheduler behind one ``__call__``) and :data:`DEFAULT_DIR`,
  the shipped demo weights.
* :mod:`dprdm.generation.training`    -- ``dprdm train``: the two training stages.

Nothing here reads private data: the generator only ever sees the released vectors it is given.
"""

from dprdm.generation.autoencoder import Autoencoder
from dprdm.generation.denoiser import LatentDenoiser
from dprdm.generation.pipeline import (DEFAULT_DIR, RetrievalDiffusionPipeline, default_scheduler,
                                       load_default)

__all__ = [
    "DEFAULT_DIR",
    "Autoencoder",
    "LatentDenoiser",
    "RetrievalDiffusionPipeline",
    "default_scheduler",
    "load_default",
]
