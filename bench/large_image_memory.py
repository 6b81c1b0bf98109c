"""Benchmark: peak memory of `moebius inpaint` on a very large image with a small mask.

The command runs in a subprocess (exactly as a user runs it) with tiny random weights, so the
network's own memory is negligible and what is measured is the image handling: decode, mode
conversion, mask preparation, crop windows, paste-back and the save. Peak RSS is that of the
child process (`os.wait4`), compared with the same command on a small image in the same run and
with the size of the decoded input (H x W x 3 bytes).

    python bench/large_image_memory.py --side 12000 --runs 3 --out bench/results/x.json
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from report import emit, machine_state

from moebius.models import MoebiusConfig, MoebiusUNet
from moebius.pipeline import InpaintPipeline
from moebius.train.networks import tiny_vae


def tiny_weights(folder: Path) -> Path:
    """Random tiny student + tiny VAE (native 128 px), saved like a real weights folder."""
    torch.manual_seed(0)
    unet = MoebiusUNet(MoebiusConfig.tiny())
    return InpaintPipeline(unet, tiny_vae(seed=0)).save_pretrained(folder)


def write_inputs(folder: Path, side: int, hole: int) -> tuple[Path, Path]:
    """A side x side RGB PNG (smooth gradients, so it stays small on disk) and a mask with one
    hole x hole square in the middle (255 = fill)."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.empty((side, side, 3), np.uint8)
    rgb[..., 0] = ramp[None, :]
    rgb[..., 1] = ramp[:, None]
    rgb[..., 2] = 128
    image, mask = folder / f"photo_{side}.png", folder / f"photo_{side}_mask.png"
    Image.fromarray(rgb).save(image, compress_level=1)
    del rgb
    fill = np.zeros((side, side), np.uint8)
    start = (side - hole) // 2
    fill[start : start + hole, start : start + hole] = 255
    Image.fromarray(fill).save(mask)
    return image, mask


def measure(weights, image, mask, out, runs: int, extra: list[str]) -> dict:
    """Median and spread of the child's peak RSS over `runs` runs (ru_maxrss is in KiB)."""
    peaks, times, warnings, codes = [], [], [], []
    for _ in range(runs):
        result = _run_reaped(weights, image, mask, out, extra)
        peaks.append(result["maxrss_kib"] / 2**20)
        times.append(result["seconds"])
        codes.append(result["exit"])
        warnings.append([line for line in result["stderr"].splitlines() if "Warning" in line])
    return {
        "peak_rss_gib_median": statistics.median(peaks),
        "peak_rss_gib_runs": peaks,
        "seconds_runs": times,
        "exit_codes": codes,
        "warning_lines": warnings[0],
    }


def _run_reaped(weights, image, mask, out, extra) -> dict:
    """Start the child with Popen, reap it ourselves with os.wait4 to read its own ru_maxrss."""
    out.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "moebius.cli", "inpaint", str(image), str(mask), "-o", str(out),
            "--weights", str(weights), "--steps", "2", "--device", "cpu", "-q", *extra]  # fmt: skip
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    return {"exit": proc.returncode, "seconds": seconds, "stderr": stderr,
            "maxrss_kib": usage.ru_maxrss}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=12000, help="large image side in pixels")
    parser.add_argument("--small-side", type=int, default=512, help="reference image side")
    parser.add_argument("--hole", type=int, default=64, help="side of the square mask hole")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="", help="e.g. the commit measured")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("cli_args", nargs="*", help="extra `moebius inpaint` options")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tiny_weights(tmp / "weights")
        results = {}
        for side in (args.small_side, args.side):
            image, mask = write_inputs(tmp, side, args.hole)
            entry = measure(weights, image, mask, tmp / "out.png", args.runs, args.cli_args)
            entry["decoded_input_gib"] = side * side * 3 / 2**30
            results[side] = entry
            image.unlink()
    large, small = results[args.side], results[args.small_side]
    report = {
        "benchmark": "large_image_memory",
        "label": args.label,
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "weights": "tiny random student + tiny VAE (native 128 px), --steps 2",
        "mask": f"one {args.hole}x{args.hole} square in the middle",
        **machine_state(),
        "results": {f"{side}x{side}": entry for side, entry in results.items()},
        # Memory the large image costs beyond the same command on a small one, in decoded inputs.
        "extra_gib_over_small": large["peak_rss_gib_median"] - small["peak_rss_gib_median"],
        "extra_over_decoded_input": (large["peak_rss_gib_median"] - small["peak_rss_gib_median"])
        / large["decoded_input_gib"],
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
