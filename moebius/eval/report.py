"""Report: several results.json files side by side as one markdown table (a row per method)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from moebius.eval.score import METRIC_ORDER, format_value

ARROWS = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "fid": "FID ↓",
          "p_ids": "P-IDS ↑", "u_ids": "U-IDS ↑"}  # fmt: skip


def labels_for(paths: list[Path]) -> list[str]:
    """File stems, or parent/stem where stems repeat (e.g. medium_512/telea, thick_512/telea)."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def markdown_table(paths: list[str | os.PathLike], bins: bool = False) -> str:
    """A markdown table of the overall metrics of each results file (+ per-bin rows if `bins`)."""
    paths = [Path(p) for p in paths]
    results = [json.loads(p.read_text()) for p in paths]
    metrics = [m for m in METRIC_ORDER if any(m in r["overall"] for r in results)]
    header = ["method", "images", *(ARROWS[m] for m in metrics)]
    if bins:
        header.insert(1, "hole area")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, result in zip(labels_for(paths), results, strict=True):
        subsets = [("all", {"count": result["count"], **result["overall"]})]
        if bins:
            subsets += [(f"{k}%", v) for k, v in result["bins"].items()]
        for subset, values in subsets:
            cells = [label, str(values["count"])]
            if bins:
                cells.insert(1, subset)
            cells += [format_value(m, values.get(m)) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
