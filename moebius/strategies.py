"""Plan the native-size windows that cover a mask: pure geometry, no model, no pixels.

A model that runs only at its native square size N (512 when released) sees any input through
windows (IOPaint's "HD strategies", adapted to a fixed-size model):
  native  the image is exactly N x N: one window, the whole image (the original recipe).
  crop    one square window per group of mask regions, resized to N x N.
  resize  the whole image fitted into N x N (aspect kept, reflect-padded context).
  auto    native for N x N inputs, crop otherwise.
`plan` returns the windows; `moebius.composite` cuts their inputs and merges their results, and
the pipeline runs them through the model in batches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from moebius.options import STRATEGIES  # the names a user can type live in moebius.options

logger = logging.getLogger(__name__)

DEFAULT_MARGIN = 128  # context pixels around a region's bbox in a crop window (IOPaint's default)

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), ends exclusive


@dataclass(frozen=True)
class Window:
    """A box of the input (columns x0..x1-1, rows y0..y1-1) that the model sees at N x N.

    Crop and native windows are squares that fill the model's input. A resize window is the
    whole image placed, aspect kept, in `placed` = (x0, y0, x1, y1) of the N x N input; the rest
    of the input is padding.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    placed: tuple[int, int, int, int] | None = None

    def __post_init__(self):
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"a Window must be non-empty, got {self}")
        if self.placed is None and self.x1 - self.x0 != self.y1 - self.y0:
            raise ValueError(f"a Window without `placed` must be a square, got {self}")

    @property
    def side(self) -> int:
        return self.x1 - self.x0

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, upper, right, lower) for `PIL.Image.crop`."""
        return (self.x0, self.y0, self.x1, self.y1)

    def inner(self, native: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the model's N x N input that shows the box."""
        return self.placed if self.placed is not None else (0, 0, native, native)


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


def resize_window(height: int, width: int, native: int) -> Window:
    """The whole image fitted into N x N, aspect kept, centred (the resize strategy)."""
    scale = native / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    top, left = (native - h) // 2, (native - w) // 2
    return Window(0, 0, width, height, placed=(left, top, left + w, top + h))


def plan(
    fill: np.ndarray, native: int, strategy: str = "auto", margin: int = DEFAULT_MARGIN
) -> list[Window]:
    """The windows that fill `fill` (bool [H, W], True = fill) for a model of native side N.

    An empty mask needs no window. "auto" is "native" for N x N inputs and "crop" otherwise;
    "native" on another size is an error that names the strategies that handle it.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if fill.ndim != 2 or fill.dtype != bool:
        raise ValueError(f"plan takes a bool [H, W] fill mask, got {fill.dtype} {fill.shape}")
    if not fill.any():
        return []
    height, width = fill.shape
    is_native = (height, width) == (native, native)
    if strategy == "auto":
        strategy = "native" if is_native else "crop"
    if strategy == "native":
        if not is_native:
            raise ValueError(
                f"strategy 'native' needs a {native}x{native} image, got {width}x{height}; "
                "use 'crop' (or 'auto') or 'resize'"
            )
        return [Window(0, 0, native, native)]
    if strategy == "crop":
        return plan_crop_windows(fill, native, margin)
    return [resize_window(height, width, native)]
