"""Prediction: fill every image of a folder with one method and write OUT/NAME.png.

Methods: the Moebius student and the PixelHacker teacher through `InpaintPipeline`, and three
classical baselines that run anywhere (OpenCV Telea, OpenCV Navier-Stokes, mean colour of the
known pixels). Done files are skipped (resumable); a failing file is reported and the rest go on.
Under `torchrun` each rank fills its slice of the sorted names; per-image noise comes from the
seed and the file name, so the union of the ranks' files equals a single process's byte for byte.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from moebius import options
from moebius.eval.data import ProcessGroup, Shard, image_torch_seed, list_images, mask_path

logger = logging.getLogger(__name__)

DIFFUSION_METHODS = options.MODELS
CLASSICAL_METHODS = options.BASELINES
METHODS = options.EVAL_METHODS
INPAINT_RADIUS = 3  # OpenCV inpaint neighbourhood radius in pixels (the value of its examples)
EMPTY_FILL = 128  # mean-colour fill of an image without a single known pixel: mid grey

Predictor = Callable[[str, Image.Image, Image.Image], Image.Image]  # (name, rgb, mask L) -> rgb


def classical_fill(method: str, image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 + (H, W) bool hole -> (H, W, 3) uint8; known pixels are left unchanged."""
    if method == "mean":
        out = image.copy()
        known = image[~hole]  # (K, 3)
        colour = np.round(known.mean(axis=0)) if len(known) else np.full(3, EMPTY_FILL)
        out[hole] = colour.astype(np.uint8)
        return out
    import cv2

    flag = {"telea": cv2.INPAINT_TELEA, "navier-stokes": cv2.INPAINT_NS}[method]
    # cv2.inpaint treats the three channels alike, so RGB order needs no BGR conversion
    return cv2.inpaint(np.ascontiguousarray(image), hole.astype(np.uint8), INPAINT_RADIUS, flag)


def classical_predictor(method: str) -> Predictor:
    """A Predictor for telea / navier-stokes / mean."""
    from moebius.masks import MASK_THRESHOLD

    def predict(name: str, image: Image.Image, mask: Image.Image) -> Image.Image:
        hole = np.asarray(mask) >= MASK_THRESHOLD
        return Image.fromarray(classical_fill(method, np.asarray(image), hole))

    return predict


@dataclass(frozen=True)
class DiffusionOptions:
    """Weights, device and recipe options of a moebius / pixelhacker run (None = recipe default)."""

    weights: str | None = None
    variant: str | None = None
    cache_dir: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0  # per-image noise seed = f(seed, file name)
    recipe: dict = field(default_factory=dict)  # pipeline keywords: steps, guidance_scale, ...


def diffusion_predictor(method: str, options: DiffusionOptions, shard: Shard) -> Predictor:
    """Load the pipeline of `method` once; the Predictor seeds the noise from the file name."""
    import torch

    from moebius import hub
    from moebius.pipeline import InpaintPipeline

    variant = options.variant or hub.DEFAULT_VARIANT
    files = hub.resolve(options.weights, variant, model=method, cache_dir=options.cache_dir)
    device = options.device
    if device == "auto":
        device = f"cuda:{shard.local_rank}" if torch.cuda.is_available() else "cpu"
    pipe = InpaintPipeline.from_files(files, model=method).to(device, getattr(torch, options.dtype))
    pipe.set_progress_bar_config(disable=True)
    recipe = {k: v for k, v in options.recipe.items() if v is not None}

    def predict(name: str, image: Image.Image, mask: Image.Image) -> Image.Image:
        generator = torch.Generator().manual_seed(image_torch_seed(options.seed, name))
        return pipe(image, mask, generator=generator, **recipe)

    return predict


def _predict_one(predict: Predictor, image_path: Path, mask_dir: Path, out: Path) -> None:
    from moebius.images import load_image, save_image_atomic, to_rgb

    image = to_rgb(load_image(image_path))[0]
    mask = load_image(mask_path(mask_dir, image_path.stem)).convert("L")
    if mask.size != image.size:
        raise ValueError(
            f"mask is {mask.size[0]}x{mask.size[1]} but the image is "
            f"{image.size[0]}x{image.size[1]}; make the mask set from this image folder"
        )
    result = predict(image_path.name, image, mask).convert("RGB")
    save_image_atomic(result, out)


def predict_folder(
    method: str,
    images: str | os.PathLike,
    masks: str | os.PathLike,
    out: str | os.PathLike,
    *,
    options: DiffusionOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
    shard: Shard | None = None,
) -> dict:
    """Fill this rank's images; returns all ranks' {"done", "skipped", "failed": {name: error}}."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    shard = shard or Shard.from_env()
    paths, mask_dir, out = list_images(images), Path(masks), Path(out)
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"mask folder {str(mask_dir)!r} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    mine = shard.take(paths)
    todo = [p for p in mine if overwrite or not (out / f"{p.stem}.png").exists()]
    stats = {"done": 0, "skipped": len(mine) - len(todo), "failed": {}}
    with ProcessGroup(shard) as group:
        if todo:
            if method in DIFFUSION_METHODS:
                predict = diffusion_predictor(method, options or DiffusionOptions(), shard)
            else:
                predict = classical_predictor(method)
            from tqdm.auto import tqdm

            bar = tqdm(todo, desc=f"{method} [rank {shard.rank}]", unit="image",
                       disable=not progress or shard.rank != 0)  # fmt: skip
            for path in bar:
                try:
                    _predict_one(predict, path, mask_dir, out / f"{path.stem}.png")
                    stats["done"] += 1
                except Exception as err:  # one bad file must not stop the others
                    logger.debug("failure on %s", path, exc_info=True)
                    stats["failed"][path.name] = f"{type(err).__name__}: {err}"
                    logger.error("failed: %s: %s", path.name, stats["failed"][path.name])
        parts = group.gather(stats)
    total = {"done": sum(p["done"] for p in parts), "skipped": sum(p["skipped"] for p in parts),
             "failed": {k: v for p in parts for k, v in p["failed"].items()}}  # fmt: skip
    if shard.rank == 0:
        logger.info("%s: %d done, %d skipped (exist), %d failed", method, total["done"],
                    total["skipped"], len(total["failed"]))  # fmt: skip
    return total
