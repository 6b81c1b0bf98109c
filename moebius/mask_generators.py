"""Random inpainting masks: LaMa-style irregular strokes and boxes, plus a 40-50% area protocol.

Shared by training (random holes for the dataset) and evaluation (protocol mask sets). numpy +
OpenCV only, no torch. Every function takes an explicit `numpy.random.Generator`; nothing reads
global random state, so a seed gives the same mask on any machine and in any process.

Polarity: True = hole to fill (as everywhere in the package). The six LaMa presets carry the
generator parameters of the original training configs `random_{thin,medium,thick}_{256,512}`
(spec/training.md 4.3). Two details of the original are kept on purpose because they shape the
hole statistics: the stroke count is uniform in {min_times, ..., max_times + 1} (one more than the
config says), and the kind of mask is drawn once per mask with the normalised probabilities
irregular 1 : box 0.3 (76.9% / 23.1%). The original's thin presets crash at construction; here
they work. Its unused `max_tamper_area` is not applied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


def _cv2():
    """OpenCV, imported on first use so the protocol names are readable without it."""
    try:
        import cv2
    except ImportError as error:  # an optional dependency: say which extra brings it
        raise ImportError(
            "random masks need OpenCV: pip install 'moebius-inpaint[train]' (or [eval], or just "
            "opencv-python-headless)"
        ) from error
    return cv2


@dataclass(frozen=True)
class IrregularConfig:
    """Brush strokes: each of N strokes starts at a uniform pixel and has 1-5 straight segments."""

    min_times: int
    max_times: int  # the stroke count reaches max_times + 1 (the original's off-by-one, kept)
    max_width: int  # brush width = 5 + randint(max_width) pixels
    max_len: int  # segment length = 10 + randint(max_len) pixels
    max_angle: int = 4  # segment angle = 0.01 + randint(max_angle) radians


@dataclass(frozen=True)
class BoxConfig:
    """Axis-aligned rectangles, integer sides in [min_size, max_size], `margin` from the edge."""

    margin: int
    min_size: int
    max_size: int
    min_times: int
    max_times: int


@dataclass(frozen=True)
class MixedConfig:
    """One kind per mask: irregular with weight 1, box with weight `box_proba` (normalised)."""

    irregular: IrregularConfig
    box: BoxConfig | None = None
    box_proba: float = 0.3

    @property
    def irregular_probability(self) -> float:
        """P(irregular) after normalising the weights 1 : box_proba (0.769 for 0.3)."""
        return 1.0 if self.box is None else 1.0 / (1.0 + self.box_proba)


@dataclass(frozen=True)
class AreaConfig:
    """Strokes and boxes added one at a time until the hole fraction reaches a uniform target.

    The target is drawn in [min_fraction, max_fraction]; a stroke or box that would push the
    fraction past max_fraction is drawn again, so every mask lands inside the interval. Sizes are
    the medium_512 ones scaled by min(height, width) / 512.
    """

    base: MixedConfig  # stroke and box parameters at 512 px (medium_512 in PROTOCOLS)
    min_fraction: float = 0.40
    max_fraction: float = 0.50
    max_tries: int = 10_000  # rejected additions before giving up (never reached at >= 32 px)


def _lama(irregular, box=None) -> MixedConfig:
    return MixedConfig(IrregularConfig(*irregular), None if box is None else BoxConfig(*box))


# spec/training.md 4.3: (min_times, max_times, max_width, max_len, max_angle) and
# (margin, min_size, max_size, min_times, max_times); measured mean hole fraction in comments.
LAMA_PRESETS: dict[str, MixedConfig] = {
    "thin_256": _lama((4, 50, 10, 40, 4)),
    "thin_512": _lama((4, 70, 20, 100, 4)),
    "medium_256": _lama((4, 5, 50, 100, 4), (0, 10, 50, 1, 5)),  # 0.25
    "medium_512": _lama((4, 10, 100, 200, 4), (0, 30, 150, 1, 5)),  # 0.315 (training default)
    "thick_256": _lama((1, 5, 100, 200, 4), (10, 30, 150, 1, 3)),  # 0.40
    "thick_512": _lama((1, 5, 250, 450, 4), (10, 30, 300, 1, 4)),  # 0.49
}
PROTOCOLS: dict[str, MixedConfig | AreaConfig] = {
    **LAMA_PRESETS,
    "area_40_50": AreaConfig(base=LAMA_PRESETS["medium_512"]),
}


# ---- primitives: each draws into a uint8 (H, W) canvas with value 1 -----------------------------


def draw_stroke(
    canvas: np.ndarray, cfg: IrregularConfig, rng: np.random.Generator, mirror: bool
) -> None:
    """One brush stroke of 1-5 segments; `mirror` flips the angle to 2*pi - angle (even strokes)."""
    height, width = canvas.shape
    line = _cv2().line
    x, y = int(rng.integers(width)), int(rng.integers(height))
    for _ in range(1 + int(rng.integers(5))):
        angle = 0.01 + rng.integers(cfg.max_angle)
        if mirror:
            angle = 2 * np.pi - angle
        length = 10 + int(rng.integers(cfg.max_len))
        brush_width = 5 + int(rng.integers(cfg.max_width))
        # endpoint clipped to the image, so the next segment starts on it
        end_x = int(np.clip(int(x + length * np.sin(angle)), 0, width - 1))
        end_y = int(np.clip(int(y + length * np.cos(angle)), 0, height - 1))
        line(canvas, (x, y), (end_x, end_y), 1, brush_width)
        x, y = end_x, end_y


def _box_sides(cfg: BoxConfig, height: int, width: int) -> tuple[int, int]:
    """Inclusive side range: [min_size, max_size], the upper end capped at H-2m and W-2m."""
    high = min(cfg.max_size, height - 2 * cfg.margin, width - 2 * cfg.margin)
    if high < 1:
        raise ValueError(
            f"a {height}x{width} mask cannot hold a box with margin {cfg.margin}: the image must "
            f"be larger than {2 * cfg.margin} pixels on both sides"
        )
    return min(cfg.min_size, high), high


def draw_box(canvas: np.ndarray, cfg: BoxConfig, rng: np.random.Generator) -> None:
    """One rectangle with uniform integer sides, placed uniformly inside the margin."""
    height, width = canvas.shape
    low, high = _box_sides(cfg, height, width)
    box_w, box_h = int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))
    x = int(rng.integers(cfg.margin, width - cfg.margin - box_w + 1))
    y = int(rng.integers(cfg.margin, height - cfg.margin - box_h + 1))
    canvas[y : y + box_h, x : x + box_w] = 1


# ---- generators: (height, width, rng) -> bool (H, W) -------------------------------------------


def irregular_mask(
    height: int, width: int, cfg: IrregularConfig, rng: np.random.Generator
) -> np.ndarray:
    """LaMa irregular mask: {min_times..max_times+1} strokes, even ones mirrored."""
    canvas = np.zeros((height, width), np.uint8)
    for i in range(int(rng.integers(cfg.min_times, cfg.max_times + 2))):
        draw_stroke(canvas, cfg, rng, mirror=i % 2 == 0)
    return canvas.astype(bool)


def box_mask(height: int, width: int, cfg: BoxConfig, rng: np.random.Generator) -> np.ndarray:
    """LaMa box mask: {min_times..max_times} rectangles."""
    canvas = np.zeros((height, width), np.uint8)
    _box_sides(cfg, height, width)  # validate before drawing the count
    for _ in range(int(rng.integers(cfg.min_times, cfg.max_times + 1))):
        draw_box(canvas, cfg, rng)
    return canvas.astype(bool)


def mixed_mask(height: int, width: int, cfg: MixedConfig, rng: np.random.Generator) -> np.ndarray:
    """LaMa MixedMaskGenerator: choose irregular or box once, then draw that kind."""
    if cfg.box is None or rng.random() < cfg.irregular_probability:
        return irregular_mask(height, width, cfg.irregular, rng)
    return box_mask(height, width, cfg.box, rng)


def _scaled(cfg: MixedConfig, scale: float) -> MixedConfig:
    """Stroke length/width and box sizes times `scale` (at least 1 pixel); counts unchanged."""

    def px(value: int) -> int:
        return max(1, round(value * scale))

    irr, box = cfg.irregular, cfg.box
    irregular = replace(irr, max_width=px(irr.max_width), max_len=px(irr.max_len))
    if box is not None:
        margin = px(box.margin) if box.margin else 0
        box = replace(box, margin=margin, min_size=px(box.min_size), max_size=px(box.max_size))
    return replace(cfg, irregular=irregular, box=box)


def area_mask(height: int, width: int, cfg: AreaConfig, rng: np.random.Generator) -> np.ndarray:
    """A hole fraction in [min_fraction, max_fraction]: add strokes/boxes up to a uniform target."""
    base = _scaled(cfg.base, min(height, width) / 512)
    target = rng.uniform(cfg.min_fraction, cfg.max_fraction)
    limit = int(np.floor(cfg.max_fraction * height * width))  # max hole pixels allowed
    canvas = np.zeros((height, width), np.uint8)
    holes, tries, stroke = 0, 0, 0
    while holes < target * height * width:
        trial = canvas.copy()
        if base.box is None or rng.random() < base.irregular_probability:
            draw_stroke(trial, base.irregular, rng, mirror=stroke % 2 == 0)
            stroke += 1
        else:
            draw_box(trial, base.box, rng)
        count = int(np.count_nonzero(trial))
        if count <= limit:
            canvas, holes = trial, count
            continue
        tries += 1
        if tries > cfg.max_tries:
            raise RuntimeError(
                f"no {height}x{width} mask with hole fraction in [{cfg.min_fraction}, "
                f"{cfg.max_fraction}] after {cfg.max_tries} tries; use a larger image"
            )
    return canvas.astype(bool)


def random_mask(protocol: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random (height, width) bool mask (True = fill) of a protocol in PROTOCOLS."""
    if protocol not in PROTOCOLS:
        names = ", ".join(PROTOCOLS)
        raise ValueError(f"unknown mask protocol {protocol!r}; choose one of {names}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
    cfg = PROTOCOLS[protocol]
    if isinstance(cfg, AreaConfig):
        return area_mask(int(height), int(width), cfg, rng)
    return mixed_mask(int(height), int(width), cfg, rng)
