"""Timestep features and the time MLP shared by the student and the teacher (diffusers layout)."""

import math

import torch
from torch import nn


def timestep_sinusoid(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0
) -> torch.Tensor:
    """Sinusoidal timestep features [B, dim], always computed in float32.

    freqs_i = exp(-ln(10000) * i / (dim/2 - shift)); features = [sin(t f), cos(t f)], or
    [cos, sin] with flip_sin_to_cos (the released models). The released networks were run with
    this float32 rounding even in float64, and are sensitive to it, so callers cast the result.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - shift))
    args = timesteps.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoid (keys `linear_1`, `linear_2`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def expand_timesteps(timesteps: torch.Tensor | int | float, batch: int, device) -> torch.Tensor:
    """Timesteps of shape [], [1] or [B] -> [B] on `device`; any other shape is an error."""
    t = torch.as_tensor(timesteps, device=device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(
            f"timesteps must have shape [1] or [B]=[{batch}], got {list(t.shape)}; "
            "pass one timestep per sample or one for the whole batch"
        )
    return t.expand(batch)
