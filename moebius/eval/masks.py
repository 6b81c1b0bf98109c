"""Protocol mask sets: one NAME_mask.png (L, 255 = fill, the image's size) per image + masks.json.

Each image's mask is drawn from `image_rng(seed, file name)`, so the files are byte-identical on
any machine and for any number of processes sharing the work.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from moebius.eval.data import MASK_SUFFIX, MASKS_JSON, ProcessGroup, Shard, image_rng, list_images
from moebius.mask_generators import PROTOCOLS, random_mask

logger = logging.getLogger(__name__)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as shown upright (EXIF orientation applied)."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
            width, height = height, width
    return width, height


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Bool mask -> 8-bit PNG, 255 = fill (PIL's encoder is deterministic for equal pixels)."""
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path, format="PNG")


def make_mask_set(
    images: str | os.PathLike,
    protocol: str,
    out: str | os.PathLike,
    seed: int = 0,
    shard: Shard | None = None,
) -> dict:
    """Write the masks of one protocol for every image of a folder; returns masks.json's content."""
    if protocol not in PROTOCOLS:
        names = ", ".join(PROTOCOLS)
        raise ValueError(f"unknown mask protocol {protocol!r}; choose one of {names}")
    shard = shard or Shard.from_env()
    paths = list_images(images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with ProcessGroup(shard) as group:
        fractions = {}
        for path in shard.take(paths):
            width, height = image_size(path)
            mask = random_mask(protocol, height, width, image_rng(seed, path.name))
            write_mask(out / f"{path.stem}{MASK_SUFFIX}.png", mask)
            fractions[path.stem] = float(mask.mean())
        merged = {k: v for part in group.gather(fractions) for k, v in part.items()}
    summary = {
        "protocol": protocol,
        "seed": seed,
        "count": len(merged),
        "mean_hole_fraction": float(np.mean(list(merged.values()))),
        "hole_fraction": dict(sorted(merged.items())),
    }
    if shard.rank == 0:
        (out / MASKS_JSON).write_text(json.dumps(summary, indent=1) + "\n")
        logger.info("%d %s masks in %s, mean hole fraction %.3f", summary["count"], protocol, out,
                    summary["mean_hole_fraction"])  # fmt: skip
    return summary
