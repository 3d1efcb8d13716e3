"""The few building blocks the autoencoder and the denoiser share. None of them uses GroupNorm.

An earlier probe on this machine found GroupNorm's backward pass the bottleneck of a stock
diffusers UNet; at our shapes we measured GroupNorm about as costly as the per-pixel RMS norm
below, and normalising at all 5-30 % slower than not (``docs/generator.md``). So the autoencoder
uses no normalisation, the denoiser the cheap RMS norm, and both rely on skip-init residuals:

* :class:`ResBlock` -- ``x + conv(act(conv(act(x))))`` whose second conv starts at zero, so every
  block is the identity at initialisation and a deep stack starts stable ("skip-init"). An
  optional FiLM input (the time + condition embedding) scales and shifts the hidden activations.
* :func:`rms_norm` -- a per-pixel RMS over channels built from element-wise ops (no reductions
  across pixels); the denoiser uses it in every block, the autoencoder (whose 32 x 32 maps make
  element-wise ops expensive) does without.
* :class:`SelfAttention` -- multi-head self-attention over the pixels of a small feature map.
* :class:`CrossAttention` -- the pixels of a feature map attend to a few condition tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Divide every pixel's channel vector by its root mean square (no learned parameters)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


class ResBlock(nn.Module):
    """Residual 3x3 conv block, identity at init; FiLM from `emb` when ``emb_dim`` > 0."""

    def __init__(self, channels: int, out_channels: int | None = None, emb_dim: int = 0,
                 dropout: float = 0.0, norm: bool = True) -> None:
        super().__init__()
        self.use_norm = norm
        out_channels = out_channels or channels
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = (nn.Conv2d(channels, out_channels, 1) if out_channels != channels
                     else nn.Identity())
        self.film = nn.Linear(emb_dim, 2 * out_channels) if emb_dim > 0 else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(rms_norm(x) if self.use_norm else x))
        if self.film is not None:
            scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
            h = (rms_norm(h) if self.use_norm else h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over an (H, W) feature map, residual, zero-init out."""

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(rms_norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))  # (b, heads, hw, c/heads)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class CrossAttention(nn.Module):
    """Pre-norm multi-head attention from an (H, W) feature map's pixels (queries) to a set of
    tokens (B, T, token_dim) (keys and values); residual, zero-init out, so the identity at init."""

    def __init__(self, channels: int, token_dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(token_dim, 2 * channels)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(rms_norm(x)).reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2)
        k, v = self.kv(tokens).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))
