"""Moebius image inpainting: the released latent-diffusion remover, fast and faithful.

Public API: `InpaintPipeline` (moebius.pipeline) and `load_image` (moebius.images). They are
imported on first use, so `import moebius` (and the CLI's start-up) does not pull in torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["InpaintPipeline", "load_image"]

_LAZY = {"InpaintPipeline": "moebius.pipeline", "load_image": "moebius.images"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moebius' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
