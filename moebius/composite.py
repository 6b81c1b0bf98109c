"""Windows in and out of the model: cut a window's N x N input, merge its result back.

The merge is the one composite of the package, applied once per window at the input's resolution:
the result is resized back to the window's box and pasted with the original's feather (the mask
blurred with radius 3 px at the model's scale), optionally shifted in colour toward the ring
around the hole (compensate), with one rounding rule (truncation, as the original). At the native
size this is exactly the original's post-processing (shared/spec/pipeline.md 4.5). `paste=False`
writes the raw generated pixels into the whole box instead, at every size.

Only window crops are converted to arrays: a 12000 x 12000 photo with a small mask costs a few
native-size buffers here, never a whole-image float copy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from moebius.strategies import Window

PASTE_BLUR_RADIUS = 3  # PIL GaussianBlur radius of the original's paste-back feather (model px)
COMPENSATE_RING = 10  # the compensation ring box is the hole's bbox grown by this (h+10, w+10)
COMPENSATE_FACTOR = 1.1  # share of the ring's colour difference added to the fill


# ---------------------------------------------------------------------------------- resizing
def resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """LANCZOS to shrink, BICUBIC to enlarge (less ringing), the image itself when unchanged."""
    if image.size == size:
        return image
    shrink = size[0] < image.size[0]
    return image.resize(size, Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [H, W] -> (W, H) `size` by adaptive max-pooling: fill where any pixel under it fills.

    Unlike NEAREST this never drops a thin stroke when shrinking; enlarging is nearest-like.
    """
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    x = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
    return F.adaptive_max_pool2d(x, (size[1], size[0]))[0, 0].numpy() > 0


# ---------------------------------------------------------------------------------- window in
def window_input(
    image: Image.Image, fill: np.ndarray, window: Window, native: int
) -> tuple[np.ndarray, np.ndarray]:
    """The model's input for `window`: RGB uint8 [N, N, 3] and bool fill [N, N].

    The box is resized into the window's `inner` box of the N x N input; the rest (resize
    strategy only) is reflect-padded context that is never part of the mask.
    """
    x0, y0, x1, y1 = window.box
    ix0, iy0, ix1, iy1 = window.inner(native)
    pixels = np.asarray(resize_image(image.crop(window.box), (ix1 - ix0, iy1 - iy0)))
    hole = resize_mask(fill[y0:y1, x0:x1], (ix1 - ix0, iy1 - iy0))
    pad = ((iy0, native - iy1), (ix0, native - ix1))
    if any(any(p) for p in pad):
        pixels = np.pad(pixels, (*pad, (0, 0)), mode="reflect")
        hole = np.pad(hole, pad)
    return pixels, hole


# ---------------------------------------------------------------------------------- window out
def feather_radius(window: Window, native: int) -> float:
    """The original's 3 px blur radius, scaled from the model's pixels to the input's."""
    ix0, _, ix1, _ = window.inner(native)
    return PASTE_BLUR_RADIUS * (window.box[2] - window.box[0]) / (ix1 - ix0)


def feather_reach(radius: float) -> int:
    """Max distance (Chebyshev, px) from the mask at which the blurred mask can be non-zero."""
    return math.ceil(3 * radius) + 2  # PIL's GaussianBlur is 3 box passes of half-width ~radius


def blur_mask(hole: np.ndarray, radius: float) -> np.ndarray:
    """bool [H, W] -> float64 [H, W] in [0, 1]: PIL GaussianBlur of the 0/255 mask, / 255."""
    blurred = Image.fromarray(hole.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(blurred) / 255


def compensate_ring(hole: np.ndarray) -> np.ndarray:
    """Ring of known pixels around the hole's bounding box, where colours are compared.

    The bbox rows r0..r1 (height h = r1 - r0 + 1) is re-centred at cr = (r0 + r1) // 2 with height
    nh = h + 10: rows [max(0, cr - nh//2), min(H-1, cr + nh//2)] inclusive, columns alike, minus
    the hole. (The reference vectors, whose holes touch the borders, do not pin h vs r1 - r0.)
    """
    rows, cols = np.nonzero(hole.any(axis=1))[0], np.nonzero(hole.any(axis=0))[0]
    if rows.size == 0:
        return np.zeros_like(hole)
    height, width = hole.shape
    box = np.zeros_like(hole)
    (r0, r1), (c0, c1) = (rows[0], rows[-1]), (cols[0], cols[-1])
    cr, cc = (r0 + r1) // 2, (c0 + c1) // 2
    nh, nw = r1 - r0 + 1 + COMPENSATE_RING, c1 - c0 + 1 + COMPENSATE_RING
    top, bottom = max(0, cr - nh // 2), min(height - 1, cr + nh // 2)  # inclusive
    left, right = max(0, cc - nw // 2), min(width - 1, cc + nw // 2)
    box[top : bottom + 1, left : right + 1] = True
    return box & ~hole


def blend(
    result: np.ndarray, image: np.ndarray, soft: np.ndarray, shift: np.ndarray | None = None
) -> np.ndarray:
    """uint8 [H, W, 3] of result * soft + (1 - soft) * image, in [0, 1], truncated (the original).

    `shift` (3,) in 0..255 units is added to the result first (compensation); then the blend is
    clipped to [0, 1]. Same operation order as the original, so native results are bit-exact.
    """
    soft = soft[..., None]  # (H, W, 1)
    if shift is None:
        return np.uint8(((result / 255) * soft + (1 - soft) * (image / 255)) * 255)
    mixed = (result / 255 + shift / 255) * soft + (1 - soft) * image / 255
    return np.uint8(np.clip(mixed, 0, 1) * 255)


def _paste_region(hole: np.ndarray, reach: int) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the hole's bbox grown by `reach`, clipped; None for an empty hole."""
    rows, cols = np.nonzero(hole.any(axis=1))[0], np.nonzero(hole.any(axis=0))[0]
    if rows.size == 0:
        return None
    height, width = hole.shape
    return (max(cols[0] - reach, 0), max(rows[0] - reach, 0),
            min(cols[-1] + reach + 1, width), min(rows[-1] + reach + 1, height))  # fmt: skip


def merge(
    out: Image.Image,
    fill: np.ndarray,
    window: Window,
    result: np.ndarray,
    native: int,
    *,
    paste: bool = True,
    compensate: bool = False,
) -> None:
    """Composite the model's `result` (uint8 [N, N, 3]) for `window` into `out`, in place.

    paste: blend with the input's fill (bool [H, W]) inside the box, blurred at the window's
    scale; pixels farther than `feather_reach` from the fill stay byte-identical. compensate:
    first shift the result by COMPENSATE_FACTOR x (ring mean of input - result) per channel.
    No paste: the box becomes the raw generated pixels.
    """
    x0, y0, x1, y1 = window.box
    ix0, iy0, ix1, iy1 = window.inner(native)
    generated = Image.fromarray(result[iy0:iy1, ix0:ix1])
    if not paste:
        out.paste(resize_image(generated, (x1 - x0, y1 - y0)), (x0, y0))
        return
    radius = feather_radius(window, native)
    reach = feather_reach(radius)
    hole = fill[y0:y1, x0:x1]
    # The blur sees the hole up to `reach` beyond the pasted region: values equal a whole-box blur.
    outer = _paste_region(hole, 2 * reach)
    if outer is None:
        return
    ox0, oy0, ox1, oy1 = outer
    soft = blur_mask(hole[oy0:oy1, ox0:ox1], radius)
    rx0, ry0, rx1, ry1 = _paste_region(hole[oy0:oy1, ox0:ox1], reach)  # inside `outer`
    box = (x0 + ox0 + rx0, y0 + oy0 + ry0, x0 + ox0 + rx1, y0 + oy0 + ry1)
    src = (ox0 + rx0, oy0 + ry0, ox0 + rx1, oy0 + ry1)  # the same region in box coordinates
    back = np.asarray(_resized_crop(generated, (x1 - x0, y1 - y0), src))
    here = np.asarray(out.crop(box))
    shift = None
    if compensate:  # the ring lies within 6 px of the hole's bbox, inside the region
        ring = compensate_ring(hole[src[1] : src[3], src[0] : src[2]])
        shift = np.zeros(3)
        if ring.any():
            shift = COMPENSATE_FACTOR * (here[ring].mean(axis=0) - back[ring].mean(axis=0))
    soft = soft[ry0:ry1, rx0:rx1]
    out.paste(Image.fromarray(blend(back, here, soft, shift)), box[:2])


def _resized_crop(
    generated: Image.Image, size: tuple[int, int], region: tuple[int, int, int, int]
) -> Image.Image:
    """`region` of `generated` resized to `size`, without resizing the rest when it is large."""
    if generated.size == size:
        return generated.crop(region)
    return resize_image(generated, size).crop(region)
