"""The SDXL-style AutoencoderKL of the release: loading, posterior sampling, decoding.

The VAE is diffusers' `AutoencoderKL`, read from a `vae/` folder (`config.json` +
`diffusion_pytorch_model.bin` or `.safetensors`). Its config is the one home of two constants:
`scaling_factor` (0.13025 for the released VAE) and the latent factor (2 ** (levels - 1) = 8).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def load_vae(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Load an `AutoencoderKL` folder (.bin or .safetensors weights) in eval mode."""
    from diffusers import AutoencoderKL

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} is not a VAE folder: expected config.json and "
            "diffusion_pytorch_model.bin or diffusion_pytorch_model.safetensors"
        )
    safetensors = (directory / "diffusion_pytorch_model.safetensors").is_file()
    # low_cpu_mem_usage needs `accelerate`; without it diffusers would warn and fall back anyway.
    vae = AutoencoderKL.from_pretrained(
        directory, use_safetensors=safetensors, low_cpu_mem_usage=False
    )
    vae.to(device=device)
    if dtype is not None:
        vae.to(dtype=dtype)
    return vae.eval()


def latent_factor(vae) -> int:
    """Pixels per latent cell: each encoder level but the last halves the size (8 for 4 levels)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Shape [B, C, h, w] of the latents of a [B, 3, height, width] image."""
    factor = latent_factor(vae)
    if height % factor or width % factor:
        raise ValueError(
            f"image size {width}x{height} is not a multiple of the VAE factor {factor}"
        )
    return (batch, vae.config.latent_channels, height // factor, width // factor)


def encode(vae, image: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Scaled posterior sample z = (mean + std * eps) * scaling_factor of image [B,3,H,W] in [-1,1].

    `eps` ~ N(0, I) [B, C, h, w] is given, not drawn, so a call can reproduce the original's draws.
    NaNs (the original guards against them) become 0. Computed in the VAE's dtype, returned float32.
    """
    posterior = vae.encode(image.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = posterior.mean + posterior.std * eps.to(device=vae.device, dtype=vae.dtype)
    z = torch.nan_to_num(z, nan=0.0)
    return z.float() * vae.config.scaling_factor


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Image [B,3,H,W] = decoder(latents / scaling_factor), float32 in about [-1, 1], not clamped.

    The same range as `encode` takes; (x + 1) / 2 gives the original's [0, 1] image.
    """
    z = (latents / vae.config.scaling_factor).to(device=vae.device, dtype=vae.dtype)
    return vae.decode(z).sample.float()
