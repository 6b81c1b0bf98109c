"""Training data: the jsonl manifest, the inpainting dataset (spec 4.2) and the sample order.

A manifest row is `{"image": path, "prompt": "background" | "foreground", "mask": path?}` with
paths relative to the manifest file. Every random choice of a sample (generated mask, dilation,
crop, flip) comes from a numpy Generator derived from (seed, epoch, index), so a sample is the same
whichever worker or process loads it and a resumed run sees exactly the samples it would have.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from moebius import images, mask_generators
from moebius.errors import UsageError
from moebius.recipe import category_ids

logger = logging.getLogger(__name__)

PROMPTS = ("background", "foreground")
MASK_SUFFIX = "_mask"  # IMAGE_DIR/NAME.ext pairs with MASK_DIR/NAME_mask.png or MASK_DIR/NAME.png
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DILATION_KERNELS = (3, 5, 7)  # square kernel sides of the random dilation (spec 4.2 step 4)
DILATION_ITERATIONS = (1, 2)
NUM_EMBEDDINGS = 20  # category tokens of the released networks: background 0..9, foreground 10..19


class DataError(UsageError):
    """A manifest or sample that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class Row:
    """One manifest row with absolute paths."""

    image: Path
    prompt: str = "background"
    mask: Path | None = None


# ----------------------------------------------------------------------------------- manifest
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and path.name[0] != "."


def _find_mask(mask_dir: Path, image: Path) -> Path | None:
    for stem in (image.stem + MASK_SUFFIX, image.stem):
        for path in sorted(mask_dir.glob(stem + ".*")):
            if _is_image(path) and path.resolve() != image.resolve():
                return path
    return None


def write_manifest(
    image_dir: str | os.PathLike,
    out: str | os.PathLike,
    masks: str | os.PathLike | None = None,
    prompt: str = "background",
) -> list[dict]:
    """Write a jsonl manifest of the images in `image_dir` (paths relative to `out`); the rows.

    With `masks`, each image takes MASK_DIR/NAME_mask.* or MASK_DIR/NAME.* (by name); `*_mask.*`
    files are never listed as images. "foreground" rows need a mask (the object), so an image
    without one is an error.
    """
    image_dir, out = Path(image_dir), Path(out)
    if prompt not in PROMPTS:
        raise DataError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    if not image_dir.is_dir():
        raise DataError(f"{image_dir} is not a folder of images")
    mask_dir = Path(masks) if masks is not None else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise DataError(f"--masks {mask_dir} is not a folder")
    paths = [p for p in sorted(image_dir.iterdir()) if _is_image(p)]
    paths = [p for p in paths if not p.stem.endswith(MASK_SUFFIX)]
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    base = out.resolve().parent
    rows = []
    for path in paths:
        row = {"image": os.path.relpath(path.resolve(), base), "prompt": prompt}
        mask = _find_mask(mask_dir, path) if mask_dir is not None else None
        if mask is not None:
            row["mask"] = os.path.relpath(mask.resolve(), base)
        elif prompt == "foreground":
            raise DataError(f"foreground row {path.name} needs an object mask in {mask_dir}")
        rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read_manifest(path: str | os.PathLike) -> list[Row]:
    """Parse and check a jsonl manifest; paths are resolved relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} not found; make one with `moebius data manifest`")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} is not a JSON object: {err}") from err
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise DataError(f'{where}: a row is {{"image": path, "prompt": ..., "mask": path?}}')
        unknown = sorted(set(item) - {"image", "prompt", "mask"})
        if unknown:
            raise DataError(f"{where}: unknown keys {unknown}")
        prompt = item.get("prompt", "background")
        if prompt not in PROMPTS:
            raise DataError(f"{where}: prompt must be one of {PROMPTS}, got {prompt!r}")
        mask = item.get("mask")
        if prompt == "foreground" and not mask:
            raise DataError(f"{where}: a foreground row needs its object mask")
        mask_path = (path.parent / mask) if mask else None
        rows.append(Row(path.parent / item["image"], prompt, mask_path))
    if not rows:
        raise DataError(f"manifest {path} has no rows")
    return rows


# ----------------------------------------------------------------------------------- samples
def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The Generator of one sample: a pure function of (seed, epoch, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def load_rgb(path: Path, side: int) -> Image.Image:
    """8-bit RGB, upright; a JPEG at least 2x larger than needed is decoded at 1/2-1/8 scale.

    JPEG's DCT scaling (PIL `draft`) keeps the shorter side >= `side`, so the LANCZOS resize that
    follows still downsamples; decoding a 2048 px photo for a 128 px crop is 10x cheaper.
    """
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                w, h = image.size
                scale = min(w, h) / side
                image.draft("RGB", (max(side, int(w / scale)), max(side, int(h / scale))))
            image.load()
            image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise images.ImageError(
            f"cannot read image file {str(path)!r} ({type(err).__name__}: {err}); it is corrupt, "
            "truncated, missing or not an image"
        ) from err
    return images.to_rgb(image)[0]


def resize_shorter(image: Image.Image, side: int, resample) -> Image.Image:
    """Resize so the shorter side is `side` (the longer one rounded like torchvision's Resize)."""
    w, h = image.size
    if w <= h:
        size = (side, max(side, int(side * h / w)))
    else:
        size = (max(side, int(side * w / h)), side)
    return image if size == (w, h) else image.resize(size, resample)


def random_dilation(mask: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """With chance `p`, dilate float [H, W] by a 3/5/7 square kernel, 1 or 2 times (spec 4.2.4)."""
    if rng.random() >= p:
        return mask
    k = int(rng.choice(DILATION_KERNELS))
    iterations = int(rng.choice(DILATION_ITERATIONS))
    return cv2.dilate(mask, np.ones((k, k), np.uint8), iterations=iterations)


def mask_aware_crop(mask: np.ndarray, side: int, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a side x side window containing the mask's bounding-box midpoint.

    The image's shorter side equals `side`, so only the start along the longer axis is drawn:
    uniformly among the starts whose window holds the midpoint; uniformly anywhere when the mask
    is empty (spec 4.2.5, RandomMaskCrop).
    """
    h, w = mask.shape
    axis, length = (0, h) if h > w else (1, w)
    if length == side:
        return 0, 0
    hits = np.nonzero((mask >= 0.5).any(axis=1 - axis))[0]
    lo, hi = 0, length - side  # inclusive range of starts
    if hits.size:
        mid = (int(hits[0]) + int(hits[-1])) // 2
        lo, hi = max(lo, mid - side + 1), min(hi, mid)
    start = int(rng.integers(lo, hi + 1))
    return (start, 0) if axis == 0 else (0, start)


class InpaintDataset(torch.utils.data.Dataset):
    """Manifest rows -> training samples; index with `(index, epoch)` (see `EpochSampler`).

    A sample is a dict: `image` [3, N, N] float32 in [-1, 1], `mask` [1, N, N] uint8 (1 = fill),
    `masked_image` = image * (1 - mask), `input_ids` [10] int64 (background 0..9, foreground
    10..19) and `index`. With `skip_unreadable`, an unreadable image is logged and the sample is
    None (the batch is then smaller); otherwise it raises DataError naming the file.
    """

    def __init__(
        self,
        rows: list[Row],
        resolution: int = 512,
        mask_protocol: str = "medium_512",
        generated_mask_p: float = 0.5,
        dilation_p: float = 0.99,
        flip_p: float = 0.5,
        seed: int = 42,
        skip_unreadable: bool = False,
    ):
        if mask_protocol not in mask_generators.PROTOCOLS:
            raise DataError(
                f"unknown mask protocol {mask_protocol!r}; choose one of "
                f"{list(mask_generators.PROTOCOLS)}"
            )
        self.rows, self.resolution, self.mask_protocol = rows, resolution, mask_protocol
        self.generated_mask_p, self.dilation_p, self.flip_p = generated_mask_p, dilation_p, flip_p
        self.seed, self.skip_unreadable = seed, skip_unreadable
        background, foreground = category_ids(NUM_EMBEDDINGS)
        self.ids = {"background": background, "foreground": foreground}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict | None:
        index, epoch = key
        try:
            return self.sample(index, sample_rng(self.seed, epoch, index))
        except images.ImageError as err:
            if not self.skip_unreadable:
                raise DataError(
                    f"{err}. Fix or remove row {index} of the manifest, or set "
                    "data.skip_unreadable=true to log and skip such rows"
                ) from err
            logger.warning("skipping unreadable row %d: %s", index, err)
            return None

    def _mask(self, row: Row, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """float32 [H, W] in [0, 1] (1 = fill) for an image of PIL `size` (W, H)."""
        own = row.mask is not None and (
            row.prompt == "foreground" or rng.random() >= self.generated_mask_p
        )
        if not own:
            w, h = size
            return mask_generators.random_mask(self.mask_protocol, h, w, rng).astype(np.float32)
        mask = images.load_image(row.mask).convert("L").resize(size)  # PIL default resample
        return np.asarray(mask, dtype=np.float32) / 255.0

    def sample(self, index: int, rng: np.random.Generator) -> dict:
        """Build sample `index` from `rng` (spec 4.2 steps 1-6)."""
        row, n = self.rows[index], self.resolution
        rgb = resize_shorter(load_rgb(row.image, n), n, Image.LANCZOS)
        mask = random_dilation(self._mask(row, rgb.size, rng), rng, self.dilation_p)
        top, left = mask_aware_crop(mask, n, rng)
        pixels = np.asarray(rgb)[top : top + n, left : left + n]  # (N, N, 3) uint8
        mask = mask[top : top + n, left : left + n]
        if rng.random() < self.flip_p:
            pixels, mask = pixels[:, ::-1], mask[:, ::-1]
        image = torch.from_numpy(pixels.transpose(2, 0, 1) / 127.5 - 1.0).float()  # (3, N, N)
        fill = torch.from_numpy(np.ascontiguousarray(mask >= 0.5)).to(torch.uint8)[None]
        return {
            "image": image,
            "mask": fill,
            "masked_image": image * (1 - fill),
            "input_ids": torch.tensor(self.ids[row.prompt]),
            "index": index,
        }


def collate(samples: list[dict | None]) -> dict | None:
    """Stack samples (skipped ones dropped); None when every sample of the batch was skipped."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    return {
        k: torch.stack([s[k] for s in samples]) if torch.is_tensor(samples[0][k])
        else torch.tensor([s[k] for s in samples])
        for k in samples[0]
    }  # fmt: skip


# ------------------------------------------------------------------------------- sample order
class EpochSampler(torch.utils.data.Sampler):
    """This rank's `(index, epoch)` keys from `DistributedSampler`'s shuffle, from a position on.

    Each epoch is DistributedSampler(shuffle=True, seed, drop_last=False) with set_epoch(epoch);
    `start` skips the first batches of the first epoch, so a resumed run continues mid-epoch.
    The sampler runs forever (an infinite loader, as the original).
    """

    def __init__(self, size: int, rank: int, world: int, seed: int, epoch: int = 0, start: int = 0):
        self.size, self.rank, self.world, self.seed = size, rank, world, seed
        self.epoch, self.start = epoch, start

    def epoch_indices(self, epoch: int) -> list[int]:
        sampler = torch.utils.data.DistributedSampler(
            range(self.size), self.world, self.rank, shuffle=True, seed=self.seed
        )
        sampler.set_epoch(epoch)
        return list(sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.start
        while True:
            for index in self.epoch_indices(epoch)[start:]:
                yield index, epoch
            epoch, start = epoch + 1, 0


@dataclass
class DataPosition:
    """Where the sample stream stands: the epoch and samples of it consumed by this rank."""

    epoch: int = 0
    offset: int = 0

    def advance(self, batch: int, per_epoch: int) -> None:
        """Account for one batch of `batch` keys drawn from an epoch of `per_epoch` keys."""
        self.offset += batch
        while self.offset >= per_epoch:
            self.epoch, self.offset = self.epoch + 1, self.offset - per_epoch
