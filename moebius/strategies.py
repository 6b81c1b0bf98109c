"""Any input size for a model that runs only at its native square size N (512 when released).

Strategies (IOPaint's "HD strategies", adapted to a fixed-size model):
  native  the image is exactly N x N: one run, its output returned as is (the original recipe).
  crop    one square window per group of mask regions, resized to N, run, resized back, composited.
  resize  the whole image fitted into N x N (aspect kept, reflect-padded), run, resized back.
  auto    native for N x N inputs, crop otherwise.
Compositing happens at the original resolution with a feather outside the mask, so every pixel
farther than `feather_reach` from the mask is byte-identical to the input.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from moebius.masks import PASTE_BLUR_RADIUS, MaskError, mask_to_image
from moebius.options import STRATEGIES  # the names a user can type live in moebius.options

logger = logging.getLogger(__name__)

DEFAULT_MARGIN = 128  # context pixels around a region's bbox in a crop window (IOPaint's default)

# run(images, masks) -> results: RGB N x N images, 'L' {0, 255} N x N masks, RGB N x N results.
RunFn = Callable[[list[Image.Image], list[Image.Image]], list[Image.Image]]
Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), ends exclusive


@dataclass(frozen=True)
class Window:
    """A square box in the original image: columns x0..x1-1, rows y0..y1-1."""

    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self):
        if self.x1 - self.x0 != self.y1 - self.y0 or self.x1 <= self.x0:
            raise ValueError(f"a Window must be a non-empty square, got {self}")

    @property
    def side(self) -> int:
        return self.x1 - self.x0

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, upper, right, lower) for `PIL.Image.crop`."""
        return (self.x0, self.y0, self.x1, self.y1)


# ---------------------------------------------------------------------------------------------
# Connected regions (8-connectivity) without scipy: label horizontal runs, join touching runs.


def _mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True: (row, start, end) arrays, end exclusive, in row-major order."""
    used_rows = np.nonzero(mask.any(axis=1))[0]  # only rows with a hole (big photos, small masks)
    used_cols = np.nonzero(mask.any(axis=0))[0]
    if used_rows.size == 0:
        return used_rows, used_rows, used_rows
    c0, c1 = used_cols[0], used_cols[-1] + 1
    padded = np.zeros((used_rows.size, c1 - c0 + 2), np.int8)
    padded[:, 1:-1] = mask[used_rows, c0:c1]
    steps = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past its end
    sub_rows, starts = np.nonzero(steps == 1)
    _, ends = np.nonzero(steps == -1)  # same row-major order: the k-th end closes the k-th start
    return used_rows[sub_rows], starts + c0, ends + c0


def _run_edges(rows, starts, ends, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of runs that touch (8-connectivity) in consecutive rows, as index arrays (u, v)."""
    stride = width + 2  # key = row * stride + column orders runs row-major, rows never overlap
    key_start, key_end = rows * stride + starts, rows * stride + ends
    prev_row = (rows - 1) * stride
    # Run a (row r-1) touches run b (row r) iff a.start <= b.end and a.end >= b.start (ends
    # exclusive, diagonals included). Those a form the contiguous index range [lo, hi).
    lo = np.searchsorted(key_end, prev_row + starts, side="left")
    hi = np.searchsorted(key_start, prev_row + ends, side="right")
    touching = (rows > 0) & (lo < hi)
    b, lo, count = np.nonzero(touching)[0], lo[touching], (hi - lo)[touching]
    # b joins the first of its range; consecutive runs of the range join each other (k, k+1).
    chain_len = count - 1
    firsts = np.repeat(lo, chain_len)
    offsets = np.arange(chain_len.sum()) - np.repeat(np.cumsum(chain_len) - chain_len, chain_len)
    u = np.concatenate([b, firsts + offsets])
    v = np.concatenate([lo, firsts + offsets + 1])
    return u, v


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Component root (smallest member index) of each of n nodes, given edges (u, v)."""
    parent = np.arange(n)
    while True:
        pu, pv = parent[u], parent[v]  # roots of both ends (parent is fully compressed here)
        differ = pu != pv
        if not differ.any():
            return parent
        # hook the larger root under the smaller; parent[i] <= i always, so no cycles
        np.minimum.at(parent, np.maximum(pu, pv)[differ], np.minimum(pu, pv)[differ])
        while True:  # pointer jumping until every node points at a root
            grand = parent[parent]
            if (grand == parent).all():
                break
            parent = grand


def region_boxes(mask: np.ndarray) -> list[Box]:
    """Bounding box (y0, x0, y1, x1), ends exclusive, of each 8-connected region, top-left first."""
    rows, starts, ends = _mask_runs(mask)
    if rows.size == 0:
        return []
    u, v = _run_edges(rows, starts, ends, mask.shape[1])
    roots, label = np.unique(_components(rows.size, u, v), return_inverse=True)
    n = roots.size
    y0, x0 = np.full(n, mask.shape[0]), np.full(n, mask.shape[1])
    y1, x1 = np.zeros(n, int), np.zeros(n, int)
    np.minimum.at(y0, label, rows)
    np.minimum.at(x0, label, starts)
    np.maximum.at(y1, label, rows + 1)
    np.maximum.at(x1, label, ends)
    return [(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(y0, x0, y1, x1, strict=True)]


# ---------------------------------------------------------------------------------------------
# Window planning


def _window_for_box(box: Box, native: int, margin: int, height: int, width: int) -> Window | None:
    """The square window for one bbox, or None when the bbox is longer than the image's short side.

    side = min(max(longest bbox side + 2 * margin, native), min(H, W)): at least N so small
    regions run 1:1 (never upscaled when the image allows it), at most the image's short side.
    The window is centred on the bbox, then shifted inside the image (same size, more context).
    """
    y0, x0, y1, x1 = box
    short = min(height, width)
    extent = max(y1 - y0, x1 - x0)
    if extent > short:
        return None
    side = min(max(extent + 2 * margin, native), short)
    wx = min(max(x0 - (side - (x1 - x0)) // 2, 0), width - side)
    wy = min(max(y0 - (side - (y1 - y0)) // 2, 0), height - side)
    return Window(wx, wy, wx + side, wy + side)


def _split_windows(box: Box, margin: int, height: int, width: int) -> list[Window]:
    """Short-side squares tiling a bbox longer than the image's short side, along the long axis.

    The span bbox +- margin (clipped to the image) is covered by k evenly spaced squares of side
    S = min(H, W), neighbours overlapping by at least min(margin, S // 2) pixels.
    """
    short = min(height, width)
    y0, x0, y1, x1 = box
    along_x = width >= height
    lo, hi, limit = (x0, x1, width) if along_x else (y0, y1, height)
    start, end = max(0, lo - margin), min(limit, hi + margin)
    step = max(short - margin, short - short // 2)
    count = math.ceil((end - start - short) / step) + 1
    positions = [start + round(i * (end - start - short) / (count - 1)) for i in range(count)]
    if along_x:
        return [Window(p, 0, p + short, short) for p in positions]
    return [Window(0, p, short, p + short) for p in positions]


def plan_crop_windows(mask: np.ndarray, native: int, margin: int = DEFAULT_MARGIN) -> list[Window]:
    """Square windows that together cover every mask pixel, each with context around its regions.

    One window per 8-connected region (`_window_for_box`); two windows that overlap are replaced
    by the window of their regions' union bbox when that still fits the image's short side,
    repeated until no overlapping pair can merge. A region longer than the image's short side,
    e.g. a stroke across a panorama, gets `_split_windows` instead (composited in plan order:
    where split windows overlap, the later one wins).
    """
    height, width = mask.shape
    boxes = region_boxes(mask)
    wins = [_window_for_box(b, native, margin, height, width) for b in boxes]
    fits = np.array([w is not None for w in wins], bool)
    coords = np.array([w.box if w is not None else (0, 0, 0, 0) for w in wins]).reshape(-1, 4)
    i = 0
    while i < len(boxes):  # invariant: windows before i have no mergeable overlap with any window
        merged = False
        if fits[i]:
            x0, y0, x1, y1 = coords[i]
            overlap = fits & (coords[:, 0] < x1) & (x0 < coords[:, 2])
            overlap &= (coords[:, 1] < y1) & (y0 < coords[:, 3])
            overlap[i] = False
            for j in np.nonzero(overlap)[0]:
                a, b = boxes[i], boxes[j]
                union = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                window = _window_for_box(union, native, margin, height, width)
                if window is None:
                    continue
                boxes[i], coords[i] = union, window.box
                del boxes[j]
                fits, coords = np.delete(fits, j), np.delete(coords, j, axis=0)
                i -= int(j < i)
                merged = True
                break
        i += 0 if merged else 1
    windows = []
    for box, fit, c in zip(boxes, fits, coords, strict=True):
        if fit:
            windows.append(Window(*(int(v) for v in c)))
        else:
            windows.extend(_split_windows(box, margin, height, width))
    logger.debug("crop windows for %d regions: %s", len(boxes), windows)
    return windows


# ---------------------------------------------------------------------------------------------
# Resizing and compositing


def _resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """LANCZOS to shrink, BICUBIC to enlarge (less ringing), a copy when the size is unchanged."""
    if image.size == size:
        return image.copy()
    shrink = size[0] < image.size[0]
    return image.resize(size, Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool mask -> (W, H) `size` by adaptive max-pooling: fill where any pixel under it fills.

    Unlike NEAREST this never drops a thin stroke when shrinking; enlarging is nearest-like.
    """
    if (mask.shape[1], mask.shape[0]) == size:
        return mask.copy()
    x = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
    return F.adaptive_max_pool2d(x, (size[1], size[0]))[0, 0].numpy() > 0


def feather_radius(side: int, native: int) -> float:
    """Feather blur radius at the original resolution: the original's 3 px, scaled by side / N."""
    return PASTE_BLUR_RADIUS * side / native


def feather_reach(radius: float) -> int:
    """Max distance (Chebyshev, px) from the mask at which `feather` can be non-zero."""
    return math.ceil(3 * radius) + 2  # PIL's GaussianBlur is 3 box passes of half-width ~radius


def feather(mask: np.ndarray, radius: float) -> np.ndarray:
    """bool [H, W] -> float32 weight of the result: 1 on the mask, a blur tail outside it."""
    blurred = mask_to_image(mask).filter(ImageFilter.GaussianBlur(radius=radius))
    return np.maximum(np.asarray(blurred, np.float32) / 255, mask.astype(np.float32))


def _composite(
    out: np.ndarray, result: np.ndarray, mask: np.ndarray, y: int, x: int, radius: float
):
    """Blend `result` (h, w, 3) into `out` at (y, x) where feather(mask crop) > 0, in place."""
    h, w = result.shape[:2]
    soft = feather(mask[y : y + h, x : x + w], radius)  # (h, w)
    rows, cols = np.nonzero(soft.any(axis=1))[0], np.nonzero(soft.any(axis=0))[0]
    if rows.size == 0:
        return
    sy, sx = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)  # bbox of the feather
    region = out[y : y + h, x : x + w][sy, sx]  # view into out
    weight = soft[sy, sx, None]
    blend = np.rint(result[sy, sx] * weight + region * (1 - weight)).astype(np.uint8)
    np.copyto(region, blend, where=weight > 0)


# ---------------------------------------------------------------------------------------------
# Strategies


def _run_batched(run: RunFn, images, masks, native: int, batch_size: int | None):
    """Call `run` on chunks of `batch_size` (all at once when None) and check what it returns."""
    step = batch_size or len(images)
    results = []
    for s in range(0, len(images), step):
        out = list(run(images[s : s + step], masks[s : s + step]))
        if len(out) != len(images[s : s + step]):
            raise ValueError(
                f"run returned {len(out)} images for {len(images[s : s + step])} inputs"
            )
        for img in out:
            if not isinstance(img, Image.Image) or img.mode != "RGB" or img.size != (native,) * 2:
                got = (getattr(img, "mode", type(img).__name__), getattr(img, "size", None))
                raise ValueError(f"run must return RGB {native}x{native} PIL images, got {got}")
        results.extend(out)
    return results


def _crop(image, mask, native, run, margin, batch_size) -> Image.Image:
    """The crop strategy: windows from `plan_crop_windows`, one batch, composited in plan order."""
    windows = plan_crop_windows(mask, native, margin)
    crops = [_resize_image(image.crop(w.box), (native, native)) for w in windows]
    crop_masks = [
        mask_to_image(_resize_mask(mask[w.y0 : w.y1, w.x0 : w.x1], (native, native)))
        for w in windows
    ]
    results = _run_batched(run, crops, crop_masks, native, batch_size)
    out = np.array(image)
    for w, res in zip(windows, results, strict=True):
        res = np.asarray(_resize_image(res, (w.side, w.side)))
        _composite(out, res, mask, w.y0, w.x0, feather_radius(w.side, native))
    return Image.fromarray(out)


def _resize(image, mask, native, run, batch_size) -> Image.Image:
    """The resize strategy: fit into N x N (aspect kept), reflect-pad, run, un-pad, enlarge back."""
    width, height = image.size
    scale = native / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    top, left = (native - h) // 2, (native - w) // 2
    pad = ((top, native - h - top), (left, native - w - left))
    # Reflected context fills the pad; the pad is never part of the mask.
    small = np.pad(np.asarray(_resize_image(image, (w, h))), (*pad, (0, 0)), mode="reflect")
    small_mask = np.pad(_resize_mask(mask, (w, h)), pad)
    (result,) = _run_batched(
        run, [Image.fromarray(small)], [mask_to_image(small_mask)], native, batch_size
    )
    back = _resize_image(result.crop((left, top, left + w, top + h)), (width, height))
    out = np.array(image)
    _composite(out, np.asarray(back), mask, 0, 0, feather_radius(max(width, height), native))
    return Image.fromarray(out)


def inpaint_any_size(
    image: Image.Image,
    mask: np.ndarray,
    native: int,
    run: RunFn,
    strategy: str = "auto",
    margin: int = DEFAULT_MARGIN,
    *,
    batch_size: int | None = None,
) -> Image.Image:
    """Fill `mask` (bool [H, W], True = fill) in an RGB image of any size with a native-size `run`.

    `run(images, masks)` inpaints a batch of N x N RGB images with 'L' {0, 255} masks and returns
    N x N RGB images (already pasted, as the original recipe does). All windows of one image go to
    `run` in one call, or in chunks of `batch_size`. An empty mask returns a copy, without a run.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if image.mode != "RGB":
        raise ValueError(f"inpaint_any_size expects an RGB image, got {image.mode!r}; use to_rgb")
    if mask.shape != (image.size[1], image.size[0]) or mask.dtype != bool:
        raise MaskError(
            f"mask must be bool [H, W] = [{image.size[1]}, {image.size[0]}] like the image, got "
            f"{mask.dtype} {list(mask.shape)}; use prepare_mask(mask, image.size)"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    if not mask.any():
        return image.copy()
    is_native = image.size == (native, native)
    if strategy == "auto":
        strategy = "native" if is_native else "crop"
    if strategy == "native":
        if not is_native:
            raise ValueError(
                f"strategy 'native' needs a {native}x{native} image, got "
                f"{image.size[0]}x{image.size[1]}; use 'crop' (or 'auto') or 'resize'"
            )
        return _run_batched(run, [image], [mask_to_image(mask)], native, batch_size)[0]
    if strategy == "crop":
        return _crop(image, mask, native, run, margin, batch_size)
    return _resize(image, mask, native, run, batch_size)
