"""Masks: binarise (polarity, threshold, modes, size), dilate, shrink to the latent grid.

Polarity everywhere in the package: True / 255 / white = hole to fill, False / 0 = keep (as
IOPaint and the original release). `prepare_mask` is the one place a mask is thresholded: the
pipeline calls it once per image, and everything downstream works on its bool array.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from moebius.images import HIGH_BIT_DEPTH, alpha_channel, gray_to_8bit, to_rgb

logger = logging.getLogger(__name__)

MASK_THRESHOLD = 127.5  # 8-bit mask value: below -> keep, at or above -> fill (the original's rule)


class MaskError(ValueError):
    """A mask does not fit its image (size, shape, mode); the message says what to do."""


def _mask_to_gray(mask: Image.Image) -> Image.Image:
    """A PIL mask of any mode -> 'L' whose values are compared with MASK_THRESHOLD.

    RGBA / LA / PA / P-with-transparency: when the alpha channel is not uniform, the alpha *is* the
    mask (strokes painted on a transparent layer, as editors export them); a uniform alpha is
    ignored and the colour is used. Colour masks use PIL's luma ('L'), like the original; a warning
    is logged when the mask is not grey, because e.g. pure red (luma 76) then reads as "keep".
    16-bit / float masks are scaled to 8 bits over their full range first (65535 / 1.0 = fill).
    """
    if mask.mode == "L":
        return mask  # read only: no copy of a 12000 x 12000 mask
    if mask.mode == "1":
        return mask.convert("L")
    if mask.mode in HIGH_BIT_DEPTH:
        return gray_to_8bit(mask)
    alpha = alpha_channel(mask)
    if alpha is not None and alpha.getextrema()[0] != alpha.getextrema()[1]:
        return alpha
    rgb = np.asarray(to_rgb(mask)[0])  # every other mode, via the image rules
    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
        logger.warning(
            "mask of mode %s has coloured pixels; it is read as grey luma (< %s keeps), so "
            "dark colours such as pure red count as 'keep': paint holes white on black",
            mask.mode,
            MASK_THRESHOLD,
        )
    return Image.fromarray(rgb).convert("L")


def _array_to_bool(mask: np.ndarray) -> np.ndarray:
    """2-D array -> bool: bool as is, floats in [0, 1] (>= 0.5 fills), ints vs MASK_THRESHOLD."""
    if mask.dtype == bool:
        return mask.copy()
    if np.issubdtype(mask.dtype, np.floating):
        return mask >= 0.5
    if np.issubdtype(mask.dtype, np.integer):
        return mask >= MASK_THRESHOLD
    raise MaskError(f"mask array of dtype {mask.dtype} is not supported; use bool or uint8 0/255")


def _dilate_rows(mask: np.ndarray, k: int) -> np.ndarray:
    """Along axis 1: True where any of the 2k+1 neighbours (clipped at the border) is True."""
    height, width = mask.shape
    counts = np.zeros((height, width + 2 * k + 1), np.int32)  # k zeros of padding on each side
    np.cumsum(mask, axis=1, out=counts[:, k + 1 : k + 1 + width])
    counts[:, k + 1 + width :] = counts[:, k + width : k + width + 1]  # running sum stays flat
    # counts[:, j] = number of True among padded columns [0, j); window of x = [x, x + 2k + 1)
    return counts[:, 2 * k + 1 :] > counts[:, :width]


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a bool mask by `pixels` in every direction, diagonals included (square element).

    Equals cv2.dilate with np.ones((2k+1, 2k+1)), i.e. the original's mask_dilate_kernel_size 2k+1:
    a pixel fills when any mask pixel lies within Chebyshev distance k. Separable (rows, then
    columns) running sums over the mask's bbox + k only: cheap on big photos with small masks.
    """
    if pixels < 0:
        raise MaskError(f"dilation must be >= 0 pixels, got {pixels}")
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if pixels == 0 or rows.size == 0:
        return mask.copy()
    y0, y1 = max(rows[0] - pixels, 0), min(rows[-1] + pixels + 1, mask.shape[0])
    x0, x1 = max(cols[0] - pixels, 0), min(cols[-1] + pixels + 1, mask.shape[1])
    grown = _dilate_rows(mask[y0:y1, x0:x1], pixels)
    grown = _dilate_rows(grown.T, pixels).T
    out = np.zeros_like(mask, dtype=bool)
    out[y0:y1, x0:x1] = grown
    return out


def prepare_mask(
    mask: Image.Image | np.ndarray,
    size: tuple[int, int],
    *,
    invert: bool = False,
    dilation: int = 0,
    resize: bool = False,
) -> np.ndarray:
    """Any mask -> bool [H, W], True = fill, for an image of `size` (W, H).

    Binarised with MASK_THRESHOLD after `_mask_to_gray` (PIL) or `_array_to_bool` (arrays; a 3-D
    uint8 array is read as a PIL image); `invert=True` swaps fill and keep (for masks where black is
    the hole). A size mismatch raises MaskError unless `resize=True`, which resizes the binary
    mask with NEAREST (aspect ratio not preserved). `dilation=k` then grows the fill by k pixels
    in every direction (`dilate`).
    """
    if isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if isinstance(mask, np.ndarray) and mask.ndim == 3:
        if mask.dtype != np.uint8:
            raise MaskError(f"a 3-D mask array must be uint8 (H, W, C), got {mask.dtype}")
        mask = Image.fromarray(mask)
    if isinstance(mask, Image.Image):
        fill = np.asarray(_mask_to_gray(mask)) >= MASK_THRESHOLD
    elif isinstance(mask, np.ndarray) and mask.ndim == 2:
        fill = _array_to_bool(mask)
    else:
        shape = getattr(mask, "shape", None)
        kind = type(mask).__name__
        raise MaskError(f"mask must be a PIL image or a 2-D array, got {kind} {shape}")
    mask_size = (fill.shape[1], fill.shape[0])
    if mask_size != tuple(size):
        if not resize:
            raise MaskError(
                f"mask size {mask_size[0]}x{mask_size[1]} does not match image size "
                f"{size[0]}x{size[1]} (W x H); pass a mask of the image's size, or resize=True "
                "(--resize-mask) to stretch it with nearest-neighbour"
            )
        fill = np.asarray(mask_to_image(fill).resize(tuple(size), Image.Resampling.NEAREST)) > 0
    if invert:
        fill = ~fill
    return dilate(fill, dilation) if dilation else fill


def mask_to_image(mask_bool: np.ndarray) -> Image.Image:
    """bool [H, W] -> PIL 'L' with 255 = fill, 0 = keep."""
    return Image.fromarray(np.asarray(mask_bool, dtype=bool).astype(np.uint8) * 255)


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[B, 1, H, W] -> [B, 1, h, w] by default-nearest F.interpolate, as the original.

    Nearest samples pixel (floor(i*H/h), floor(j*W/w)) = (8i, 8j) for the VAE's factor 8: the
    top-left pixel of each 8x8 cell, no pooling, so a hole thinner than 8 px can vanish here.
    """
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"latent_mask expects [B, 1, H, W], got {tuple(mask.shape)}")
    return F.interpolate(mask, size=tuple(latent_hw))
