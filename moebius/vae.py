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

from moebius.errors import MissingFileError
from moebius.hub import CONFIG_NAME, VAE_WEIGHTS_NAMES
from moebius.models.checkpoints import CheckpointError, load_state_dict_file, read_json

logger = logging.getLogger(__name__)


def load_vae(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Load an `AutoencoderKL` folder (.bin or .safetensors weights) in eval mode.

    Every failure is a one-line error naming the file: a folder without config.json or weights
    (MissingFileError), a malformed config.json, a corrupt, truncated or pickled weights file, or
    weights that do not fit the config (CheckpointError). Nothing is initialised at random.
    """
    from diffusers import AutoencoderKL

    directory = Path(directory)
    weights = next((directory / n for n in VAE_WEIGHTS_NAMES if (directory / n).is_file()), None)
    if not (directory / CONFIG_NAME).is_file() or weights is None:
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else None
        raise MissingFileError(
            f"{directory} is not a VAE folder: expected {CONFIG_NAME} and "
            f"{' or '.join(VAE_WEIGHTS_NAMES)} in it"
            + (f" (found: {', '.join(found) or 'nothing'})" if found is not None else "")
        )
    read_json(directory / CONFIG_NAME)  # a malformed file is reported by name
    try:
        # low_cpu_mem_usage needs `accelerate`; without it diffusers would warn and fall back.
        vae, info = AutoencoderKL.from_pretrained(
            directory,
            use_safetensors=weights.suffix == ".safetensors",
            low_cpu_mem_usage=False,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        load_state_dict_file(weights)  # names what is wrong with the file itself, if anything
        raise _misfit(weights, directory, _reason(err)) from err
    if info.get("unexpected_keys"):  # harmless (ignored), but say so
        logger.warning("%s: %d tensors the VAE does not use, e.g. %s", weights,
                       len(info["unexpected_keys"]), info["unexpected_keys"][:2])  # fmt: skip
    missing = info.get("missing_keys", []) + info.get("mismatched_keys", [])
    if missing:  # diffusers would leave these at their random init
        raise _misfit(weights, directory, f"{len(missing)} tensors missing, e.g. {missing[:2]}")
    if info.get("error_msgs"):
        raise _misfit(weights, directory, _reason(info["error_msgs"][0]))
    vae.to(device=device)
    if dtype is not None:
        vae.to(dtype=dtype)
    return vae.eval()


def _reason(err: object) -> str:
    """The informative line of a (multi-line) loader error: the first one naming a tensor."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "size mismatch" in line or "key" in line.lower()]
    return (named or lines or [type(err).__name__])[0][:300]


def _misfit(weights: Path, directory: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{weights} does not fit {directory / CONFIG_NAME} ({reason}); use the VAE folder "
        "these weights came in, with its own config.json (a diffusers AutoencoderKL folder)"
    )


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
