"""Layers of the PixelHacker teacher: the Stable Diffusion 1.5 UNet parts with GLA self-attention.

Module and parameter names follow the released checkpoint (diffusers layout), so a state dict
loads with `strict=True`: `resnets.N.{norm1,conv1,time_emb_proj,norm2,conv2,conv_shortcut}`,
`attentions.N.{norm,proj_in,transformer_blocks.0,proj_out}`, `{down,up}samplers.0.conv`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moebius.models.blocks import TRANSFORMER_NORM_EPS
from moebius.models.gla import GatedLinearAttention


class ResnetBlock2D(nn.Module):
    """h = conv1(SiLU(GN1 x)) + Linear(SiLU emb); h = conv2(SiLU(GN2 h)); out = shortcut(x) + h."""

    def __init__(
        self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 projection exists iff the width changes (true of every up-path resnet: skip concat).
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W], emb [B, C_emb] -> [B, C_out, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # per-channel timestep bias
        h = self.conv2(F.silu(self.norm2(h)))  # dropout 0
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class CrossAttention(nn.Module):
    """Softmax attention of image tokens over the context tokens: softmax(Q K^T / sqrt(d)) V."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])  # [1] was dropout(0)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, N, C], context [B, L, C_ctx] -> [B, N, C]."""

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, n, C) -> (B, heads, n, C / heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C / heads)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """h, gate = Linear(C -> 2F)(x).chunk(2); h * GELU(gate) with exact (erf) GELU."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., C] -> [..., F]."""
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU (C -> 4C) then Linear (4C -> C); `net.1` (dropout 0 in the original) is an identity."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., C] -> [..., C]."""
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x += GLA(LN1 x); x += CrossAttention(LN2 x, c); x += FF(LN3 x)."""

    def __init__(self, dim: int, context_dim: int, heads: int, gla_kwargs: dict):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5, affine
        self.attn1 = GatedLinearAttention(dim, num_heads=heads, **gla_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] tokens in raster order, context [B, L, C_ctx] -> [B, N, C]."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """GroupNorm -> 1x1 proj_in -> tokens -> one TransformerBlock -> 1x1 proj_out -> + input."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int, gla_kwargs: dict):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, context_dim, heads, gla_kwargs)]
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], context [B, L, C_ctx] -> [B, C, H, W]."""
        height, width = x.shape[-2:]
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C): row-major raster order = GLA scan order
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).unflatten(2, (height, width))  # (B, C, H, W)
        return self.proj_out(h) + x
