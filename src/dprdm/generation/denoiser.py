"""The latent denoiser: a small GroupNorm-free U-Net over the autoencoder's 8 x 8 latent.

Inputs: the noised latent ``z_t`` (B, 4, 8, 8), the diffusion timestep (B,), and the conditioning
vector ``c`` (B, cond_dim) -- lam * (noised mean of retrieved image embeddings) + (1 - lam) *
(text embedding). ``c`` is L2-normalised first (its norm only says how many neighbours were
averaged and how much noise was added, not what to draw), then reaches the network by TWO paths:

* a spatial map: ``c -> MLP -> (cond_map_channels, 8, 8)`` concatenated to ``z_t`` at the input,
  so every pixel of the first convolution sees the condition (layout, colours);
* FiLM: ``c -> MLP`` added to the timestep embedding; every residual block scales and shifts its
  activations with it (global content and style);
* optionally (``condition_tokens`` > 0, issue 18's capacity lever) a third: ``c -> MLP -> T
  tokens``, which every pixel reads by cross-attention after each level's blocks and the middle,
  so each place in the image can take what it needs of the condition. The cross-attention
  layers start at zero: a denoiser given tokens draws exactly what it drew without them.

Classifier-free guidance needs an unconditional branch: ``null_condition`` is a learned vector
that replaces ``c`` wherever ``drop`` is True (about 10 % of training samples).

Layout (defaults): conv_in -> [ResBlock @8x8, 96] -> down -> [ResBlock + attention @4x4, 192]
-> middle [ResBlock, attention, ResBlock @4x4] -> up path with skip connections -> conv_out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from dprdm.generation.layers import CrossAttention, ResBlock, SelfAttention, rms_norm


class LatentDenoiser(ModelMixin, ConfigMixin):
    """Predicts the diffusion target (v or epsilon, per the scheduler) from (z_t, t, c)."""

    @register_to_config
    def __init__(self, latent_channels: int = 4, latent_size: int = 8, cond_dim: int = 128,
                 channels: tuple[int, ...] = (96, 192), blocks: tuple[int, ...] = (1, 1),
                 attention: tuple[bool, ...] = (False, True), middle_blocks: int = 2,
                 emb_dim: int = 256, cond_map_channels: int = 16, heads: int = 4,
                 normalize_condition: bool = True, condition_tokens: int = 0) -> None:
        super().__init__()
        c = list(channels)
        self.time_proj = Timesteps(c[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(c[0], emb_dim)
        self.cond_embed = nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        self.cond_map = nn.Linear(emb_dim, cond_map_channels * latent_size * latent_size)
        self.null_condition = nn.Parameter(torch.randn(cond_dim) / cond_dim ** 0.5)
        self.conv_in = nn.Conv2d(latent_channels + cond_map_channels, c[0], 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = []
        for level, width in enumerate(c):
            layers = nn.ModuleList()
            for _ in range(blocks[level]):
                layers.append(ResBlock(width, emb_dim=emb_dim))
                if attention[level]:
                    layers.append(SelfAttention(width, heads))
            skip_channels.append(width)
            self.down.append(layers)
        self.downsample = nn.ModuleList(nn.Conv2d(c[i], c[i + 1], 2, stride=2)
                                        for i in range(len(c) - 1))
        self.middle = nn.ModuleList()
        for i in range(middle_blocks):
            self.middle.append(ResBlock(c[-1], emb_dim=emb_dim))
            if i + 1 < middle_blocks:
                self.middle.append(SelfAttention(c[-1], heads))
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(c))):
            layers = nn.ModuleList()
            for j in range(blocks[level]):
                in_width = width + skip_channels[level] if j == 0 else width
                layers.append(ResBlock(in_width, width, emb_dim=emb_dim))
                if attention[level]:
                    layers.append(SelfAttention(width, heads))
            self.up.append(layers)
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2)
                                      for i in reversed(range(len(c) - 1)))
        self.conv_out = nn.Conv2d(c[0], latent_channels, 3, padding=1)
        if condition_tokens > 0:  # the third condition path (module docstring)
            self.cond_tokens = nn.Linear(emb_dim, condition_tokens * emb_dim)
            places = [f"down{i}" for i in range(len(c))] + ["middle"] + [
                f"up{i}" for i in range(len(c))]
            widths = c + [c[-1]] + c[::-1]
            self.cross = nn.ModuleDict({place: CrossAttention(width, emb_dim, heads)
                                        for place, width in zip(places, widths)})
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def condition(self, condition: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """(B, cond_dim) -> the vector the network sees: null where `drop`, L2-normalised."""
        if drop is not None:
            condition = torch.where(drop[:, None], self.null_condition.to(condition), condition)
        if self.config.normalize_condition:
            condition = F.normalize(condition, dim=-1)
        return condition

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                condition: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        b = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        cond = self.cond_embed(self.condition(condition, drop))
        emb = F.silu(self.time_embed(self.time_proj(timestep).to(sample.dtype)) + cond)
        size = self.config.latent_size
        cond_map = self.cond_map(F.silu(cond)).reshape(b, -1, size, size)
        h = self.conv_in(torch.cat([sample, cond_map], dim=1))
        tokens = None
        if self.config.condition_tokens > 0:
            tokens = self.cond_tokens(F.silu(cond)).reshape(b, self.config.condition_tokens, -1)
            tokens = F.rms_norm(tokens, tokens.shape[-1:], eps=1e-6)  # each token to unit RMS

        skips = []
        for level, layers in enumerate(self.down):
            h = self._attend(self._run(layers, h, emb), tokens, f"down{level}")
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self._attend(self._run(self.middle, h, emb), tokens, "middle")
        for level, layers in enumerate(self.up):
            if level > 0:
                h = self.upsample[level - 1](h)
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb)
            h = self._attend(h, tokens, f"up{level}")
        return self.conv_out(F.silu(rms_norm(h)))

    def _attend(self, h: torch.Tensor, tokens: torch.Tensor | None, place: str) -> torch.Tensor:
        return h if tokens is None else self.cross[place](h, tokens)

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h
