"""The image autoencoder: 32 x 32 RGB <-> an 8 x 8 x 4 latent, with a KL-regularised posterior.

The denoiser works in this latent (16x fewer numbers than the pixels, and 8 x 8 maps make every
convolution cheap on a CPU). The encoder outputs a diagonal Gaussian (mean, log-variance); training
decodes a SAMPLE and adds a small KL term, so the decoder learns to map a neighbourhood of every
latent to the same clean image -- what lets imperfect denoiser samples decode to clean emoji.
``scaling_factor`` (set after training to 1 / std of the latent means over the training images,
as in diffusers' ``AutoencoderKL``) brings latents to unit scale for the diffusion schedule.

Trained on PUBLIC images only (``dprdm train --stage autoencoder``). Layout (no GroupNorm, see
:mod:`dprdm.generation.layers`)::

    encoder  3 -> 32 @32x32 -> 64 @16x16 -> 128 @8x8 -> 2 x latent_channels (mean, logvar)
    decoder  latent_channels -> 128 @8x8 -> 64 @16x16 -> 32 @32x32 -> 3

Resolution changes are 2 x 2 stride-2 convolutions (down) and transposed convolutions (up): a
quarter of the cost of a 3 x 3 convolution at the higher resolution, and no overlap artefacts.

**A conditioned decoder** (``condition_dim`` > 0, ``dprdm train --stage decoder``): the decoder's
residual blocks also take FiLM from the generation condition (the same vector the denoiser reads,
L2-normalised), so the decoder can draw what the style asks for where the denoiser's latent
carries it only faintly (thin outlines, issue 18). Its FiLM layers start at zero: a conditioned
decoder made from an unconditioned one draws exactly what it drew. ``decode`` without a condition
uses a learned null condition (training drops the condition to it now and then), so round trips
and every caller that has no condition keep working. The encoder is never conditioned: the latent
space stays the one the denoiser was trained in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from dprdm.generation.layers import ResBlock


def _blocks(channels: int, count: int, emb_dim: int = 0) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(channels, emb_dim=emb_dim, norm=False) for _ in range(count)])


class Autoencoder(ModelMixin, ConfigMixin):
    """Images in [-1, 1], (B, 3, S, S) <-> latents (B, latent_channels, S/4, S/4)."""

    @register_to_config
    def __init__(self, in_channels: int = 3, latent_channels: int = 4,
                 channels: tuple[int, ...] = (32, 64, 128),
                 encoder_blocks: tuple[int, ...] = (1, 1, 1),
                 decoder_blocks: tuple[int, ...] = (1, 2, 2),
                 sample_size: int = 32, scaling_factor: float = 1.0,
                 condition_dim: int = 0, condition_emb_dim: int = 128) -> None:
        super().__init__()
        c = list(channels)
        levels = len(c)
        # encoder: full resolution first, a stride-2 conv between levels
        enc: list[nn.Module] = [nn.Conv2d(in_channels, c[0], 3, padding=1)]
        for i in range(levels):
            enc.append(_blocks(c[i], encoder_blocks[i]))
            if i + 1 < levels:
                enc.append(nn.Conv2d(c[i], c[i + 1], 2, stride=2))  # patchify-style, cheap
        enc += [nn.SiLU(), nn.Conv2d(c[-1], 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        # decoder: lowest resolution first, a stride-2 transposed conv between levels
        emb_dim = condition_emb_dim if condition_dim > 0 else 0
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, c[-1], 3, padding=1)]
        for i in reversed(range(levels)):
            dec.append(_blocks(c[i], decoder_blocks[i], emb_dim))
            if i > 0:
                dec.append(nn.ConvTranspose2d(c[i], c[i - 1], 2, stride=2))
        dec += [nn.SiLU(), nn.Conv2d(c[0], in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        if condition_dim > 0:  # the condition path (module docstring)
            self.condition_embed = nn.Sequential(nn.Linear(condition_dim, emb_dim), nn.SiLU(),
                                                 nn.Linear(emb_dim, emb_dim))
            self.null_condition = nn.Parameter(torch.randn(condition_dim) / condition_dim ** 0.5)

    @property
    def conditioned(self) -> bool:
        """True when the decoder reads the generation condition (``condition_dim`` > 0)."""
        return self.config.condition_dim > 0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> (mean, logvar) of the UNSCALED latent posterior."""
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: torch.Tensor, condition: torch.Tensor | None = None,
               drop: torch.Tensor | None = None) -> torch.Tensor:
        """UNSCALED latents -> images (not clamped; clamp to [-1, 1] for display).

        A conditioned decoder reads `condition` (B, condition_dim), the null condition where
        `drop` is True or when no condition is given; an unconditioned one ignores both."""
        if not self.conditioned:
            return self.decoder(latents)
        b = latents.shape[0]
        if condition is None:
            condition = self.null_condition.expand(b, -1)
        elif drop is not None:
            condition = torch.where(drop[:, None], self.null_condition.to(condition), condition)
        emb = F.silu(self.condition_embed(F.normalize(condition.to(latents.dtype), dim=-1)))
        h = latents
        for layer in self.decoder:
            if isinstance(layer, nn.Sequential):  # one level's residual blocks
                for block in layer:
                    h = block(h, emb)
            else:
                h = layer(h)
        return h

    def forward(self, images: torch.Tensor, sample: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct: (reconstruction, mean, logvar); decodes a posterior sample if `sample`."""
        mean, logvar = self.encode(images)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return self.decode(z), mean, logvar


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over every latent element."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of two image batches."""
    dx = F.l1_loss(a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1])
    dy = F.l1_loss(a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :])
    return dx + dy
