"""Scoring: a prediction folder against a ground-truth folder, overall and per hole-area bin.

Pairs by name: PRED/NAME.png with GT/NAME.<ext> (GT/NAME_mask.* are not images). With --masks,
each image's hole fraction (from MASK_DIR/NAME_mask.png) puts it in a 10%-wide bin. Writes
results.json `{"count": N, "overall": {...}, "bins": {"0-10": {...}, ...}}` (each bin holds its
own "count"), a per-image CSV beside it, and returns a plain-text table. LPIPS and FID need
backbone weights that are not bundled; without them those metrics are skipped with a message
naming the file to place.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moebius.eval.data import list_images, mask_path

logger = logging.getLogger(__name__)

BIN_WIDTH = 10  # percent of the image area per hole-size bin
METRIC_ORDER = ("psnr", "ssim", "lpips", "fid", "p_ids", "u_ids")
DECIMALS = {"psnr": 2, "ssim": 4, "lpips": 4, "fid": 2, "p_ids": 4, "u_ids": 4}  # tables print


def bin_name(fraction: float) -> str:
    """Hole fraction -> "0-10", "10-20", ..., "90-100" (a full hole falls in the last bin)."""
    low = min(int(fraction * 100 // BIN_WIDTH) * BIN_WIDTH, 100 - BIN_WIDTH)
    return f"{low}-{low + BIN_WIDTH}"


@dataclass
class Backbones:
    """Loaded LPIPS / Inception networks (None = metric skipped) and why any was skipped."""

    lpips: object = None
    inception: object = None
    skipped: tuple[str, ...] = ()


def load_backbones(
    lpips_weights: str | os.PathLike | None,
    fid_weights: str | os.PathLike | None,
    device: str = "cpu",
    metrics: tuple[str, ...] = ("lpips", "fid"),
) -> Backbones:
    """Find and load the backbone weights; a missing file skips its metric with a clear message."""
    import torch

    from moebius.eval import networks

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    found, skipped = {}, []
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for metric, explicit, filename, option in (
        ("lpips", lpips_weights, networks.VGG16_FILE, "--lpips-weights"),
        ("fid", fid_weights, networks.INCEPTION_FILE, "--fid-weights"),
    ):
        if metric not in metrics:
            continue
        path = networks.find_weights(explicit, filename)
        if path is None:
            skipped.append(f"{metric.upper()} skipped: no backbone weights; place {filename} in "
                           f"{cache} or pass {option} PATH")  # fmt: skip
        found[metric] = path
    backbones = Backbones(skipped=tuple(skipped))
    if found.get("lpips"):
        backbones.lpips = networks.load_lpips(found["lpips"]).to(device)
    if found.get("fid"):
        backbones.inception = networks.load_inception(found["fid"]).to(device)
    return backbones


def _load_rgb(path: Path) -> np.ndarray:
    from moebius.images import load_image, to_rgb

    return np.asarray(to_rgb(load_image(path))[0])


def _pairs(pred: Path, gt: Path) -> list[tuple[str, Path, Path]]:
    """(name, prediction, ground truth) for every ground-truth image; all predictions must exist."""
    gts = list_images(gt)
    missing = [p.stem for p in gts if not (pred / f"{p.stem}.png").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(gts)} predictions are missing in {pred} (e.g. "
            f"{', '.join(m + '.png' for m in missing[:3])}); run `moebius eval predict` first"
        )
    return [(p.stem, pred / f"{p.stem}.png", p) for p in gts]


def _summary(rows: list[dict], features: dict | None, ids: bool = False) -> dict:
    """Mean of each per-image metric over `rows`, FID of their features (>= 2 images), P/U-IDS."""
    out = {"count": len(rows)}
    for metric in ("psnr", "ssim", "lpips"):
        if rows and metric in rows[0]:
            out[metric] = float(np.mean([r[metric] for r in rows]))
    if features is not None and len(rows) >= 2:
        from moebius.eval.metrics import frechet_distance

        names = [r["name"] for r in rows]
        real = np.stack([features[n][0] for n in names])
        fake = np.stack([features[n][1] for n in names])
        out["fid"] = frechet_distance(real, fake)
        if ids:
            from moebius.eval.metrics import inception_discriminative_scores

            out |= inception_discriminative_scores(real, fake)
    return out


def score_folders(
    pred: str | os.PathLike,
    gt: str | os.PathLike,
    masks: str | os.PathLike | None = None,
    backbones: Backbones | None = None,
    progress: bool = True,
    ids: bool = False,
) -> tuple[dict, list[dict]]:
    """(results, per-image rows) for the predictions in `pred` against `gt`.

    `ids` adds P-IDS / U-IDS (overall only: an SVM per small bin means little); they need the FID
    backbone and scikit-learn.
    """
    from tqdm.auto import tqdm

    from moebius.eval import metrics

    backbones = backbones or Backbones()
    for message in backbones.skipped:
        logger.warning(message)
    rows, features = [], {} if backbones.inception is not None else None
    for name, pred_path, gt_path in tqdm(_pairs(Path(pred), Path(gt)), desc="score",
                                         unit="image", disable=not progress):  # fmt: skip
        p, g = _load_rgb(pred_path), _load_rgb(gt_path)
        if p.shape != g.shape:
            raise ValueError(
                f"{pred_path} is {p.shape[1]}x{p.shape[0]} but {gt_path} is "
                f"{g.shape[1]}x{g.shape[0]}; predictions keep the image size"
            )
        row = {"name": name}
        if masks is not None:
            from moebius.masks import MASK_THRESHOLD

            hole = _load_mask(mask_path(Path(masks), name)) >= MASK_THRESHOLD
            row["hole_fraction"] = float(hole.mean())
            row["bin"] = bin_name(row["hole_fraction"])
        row["psnr"], row["ssim"] = metrics.psnr(g, p), metrics.ssim(g, p)
        if backbones.lpips is not None:
            row["lpips"] = metrics.lpips(backbones.lpips, g, p)
        if features is not None:
            features[name] = (metrics.inception_features(backbones.inception, g),
                              metrics.inception_features(backbones.inception, p))  # fmt: skip
        rows.append(row)
    if ids and features is None:
        logger.warning("P-IDS/U-IDS skipped: they use the FID backbone's features (see above)")
    overall = _summary(rows, features, ids)
    results = {"count": overall.pop("count"), "overall": overall, "bins": {}}
    if masks is not None:
        for name in sorted({r["bin"] for r in rows}, key=lambda b: int(b.split("-")[0])):
            results["bins"][name] = _summary([r for r in rows if r["bin"] == name], features)
    return results, rows


def _load_mask(path: Path) -> np.ndarray:
    from moebius.images import load_image

    return np.asarray(load_image(path).convert("L"))


def write_results(results: dict, rows: list[dict], out: str | os.PathLike) -> tuple[Path, Path]:
    """results.json and a per-image CSV (same name, .csv) beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    csv_path = out.with_suffix(".csv")
    columns = [c for c in ("name", "hole_fraction", "bin", *METRIC_ORDER) if rows and c in rows[0]]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return out, csv_path


def format_value(metric: str, value: float | None) -> str:
    """Fixed decimals per metric (what README tables show)."""
    if value is None:
        return "-"
    return f"{value:.{DECIMALS.get(metric, 4)}f}"


def format_table(results: dict) -> str:
    """Plain-text table: overall, then one line per hole-area bin."""
    metrics = [m for m in METRIC_ORDER if m in results["overall"]]
    lines = [f"{'subset':>8} {'count':>6} " + " ".join(f"{m:>8}" for m in metrics)]
    subsets = [("overall", {"count": results["count"], **results["overall"]})]
    subsets += [(f"{name}%", values) for name, values in results["bins"].items()]
    for label, values in subsets:
        cells = " ".join(f"{format_value(m, values.get(m)):>8}" for m in metrics)
        lines.append(f"{label:>8} {values['count']:>6} {cells}")
    return "\n".join(lines)
