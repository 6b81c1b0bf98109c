"""Moebius image inpainting: the released latent-diffusion remover, fast and faithful."""

__version__ = "0.1.0"
