"""Benchmark: whole inpaint calls, plain vs fast UNet, with the released-size networks (random).

Scenarios: `native` = a 512x512 photo (whole-image strategy); `crop` = a 3000x2000 photo with
a small mask through the crop strategy (one 512 window, then paste-back). Variants use the same
SDXL-layout AutoencoderKL weights (float32) and differ in the UNet: plain_fp32, fast_fp32
(`pipe.optimize()`: fast UNet, channels-last VAE), fast_bf16 (`pipe.optimize(torch.bfloat16)`,
where bf16 is native; the VAE stays float32).
Calls are timed interleaved; every call records its UNet steps through the step callback, so
the JSON also gives the median step time and, with `--steps` below the default 20, the time
extrapolated to the default 19 guided steps (measured total + missing steps x median step).
Peak RSS is reset before each call (Linux /proc/self/clear_refs) and read after it.

    python bench/inpaint.py --runs 3 --out bench/results/inpaint_cpu.json
    python bench/inpaint.py --steps 3 --runs 1 --scenarios native   # a quick look
    python bench/inpaint.py --device cuda --compile --runs 10          # GPU (bench/gpu.sh)
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from report import device_info, emit, machine_state, peak_rss_gib_now, peak_rss_reset, summarize

from moebius.models import MoebiusConfig, MoebiusUNet
from moebius.models.optimize import cpu_has_fast_bf16
from moebius.pipeline import InpaintPipeline, Recipe

SCENARIOS = {"native": ((512, 512), (160, 200, 352, 328), "auto"),
             "crop": ((3000, 2000), (1400, 900, 1560, 1020), "crop")}  # fmt: skip
DEFAULT_STEPS = int(Recipe.steps * Recipe.strength)  # 19 guided UNet calls


def sdxl_vae(tiny: bool = False) -> AutoencoderKL:
    """The released VAE's architecture (SDXL AutoencoderKL), seeded random weights."""
    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16) if tiny else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1 if tiny else 2,
        norm_num_groups=8 if tiny else 32,
        latent_channels=4,
        sample_size=1024,
        scaling_factor=0.13025,
    ).eval()


def photo(size: tuple[int, int], box: tuple[int, int, int, int]) -> tuple[Image.Image, Image.Image]:
    """A smooth seeded RGB image and a mask with 255 inside `box` (x0, y0, x1, y1)."""
    w, h = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 200 + rng.normal(0, 8, (h, w, 3))
    mask = np.zeros((h, w), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = 255
    return Image.fromarray(base.clip(0, 255).astype(np.uint8)), Image.fromarray(mask)


def timed_call(pipe, image, mask, strategy: str, steps: int) -> dict:
    """One inpaint call: total seconds, per-step seconds (callback), peak RSS, output."""
    marks = []
    peak_rss_reset()
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    out = pipe(image, mask, steps=steps, strategy=strategy, generator=gen,
               callback=lambda i, t, x: marks.append(time.perf_counter()))  # fmt: skip
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    step_s = list(np.diff(marks)) if len(marks) > 1 else []
    return {"total_s": total, "step_s": step_s, "rss": peak_rss_gib_now(), "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Recipe.steps, help="DDIM schedule length")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--tiny", action="store_true", help="tiny networks: a smoke test")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true",
                        help="the fast variants with torch.compile (compiled by a warm-up call "
                        "before timing)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = MoebiusConfig.tiny() if args.tiny else MoebiusConfig()
    unet, vae = MoebiusUNet(config).eval(), sdxl_vae(args.tiny)
    pipes = {"plain_fp32": InpaintPipeline(unet, vae).to(args.device)}
    dtypes = {"fast_fp32": torch.float32}
    if args.device != "cpu" or cpu_has_fast_bf16():
        dtypes["fast_bf16"] = torch.bfloat16
    if args.device != "cpu":
        dtypes["fast_fp16"] = torch.float16
    for name, dtype in dtypes.items():  # each with its own VAE: optimize() changes its layout
        pipe = InpaintPipeline(unet, copy.deepcopy(vae)).to(args.device)
        pipes[name] = pipe.optimize(dtype, compile=args.compile)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        if args.compile and pipe is not pipes["plain_fp32"]:
            pipe.warm_up()
    unet_calls = int(args.steps * Recipe.strength)

    results = {}
    for scenario in args.scenarios:
        size, box, strategy = SCENARIOS[scenario]
        image, mask = photo(size, box)
        calls = {name: [] for name in pipes}
        for _ in range(args.runs):  # interleaved; the first round doubles as the warm-up check
            for name, pipe in pipes.items():
                calls[name].append(timed_call(pipe, image, mask, strategy, args.steps))
        ref = np.asarray(calls["plain_fp32"][0]["out"], dtype=int)
        entry = {}
        for name, runs in calls.items():
            steps = [s for run in runs for s in run["step_s"]]
            step = statistics.median(steps) if steps else float("nan")
            stats = summarize([run["total_s"] for run in runs])
            out = np.asarray(runs[0]["out"], dtype=int)
            entry[name] = {
                **stats,
                "median_step_s": step,
                "extrapolated_default_steps_s": stats["median_s"]
                + (DEFAULT_STEPS - unet_calls) * step,
                "peak_rss_gib": max(run["rss"] for run in runs),
                "max_abs_diff_uint8_vs_plain": int(np.abs(out - ref).max()),
            }
        for e in entry.values():
            e["speedup_vs_plain_fp32"] = entry["plain_fp32"]["median_s"] / e["median_s"]
            e["extrapolated_speedup_vs_plain_fp32"] = (
                entry["plain_fp32"]["extrapolated_default_steps_s"]
                / e["extrapolated_default_steps_s"]
            )
        results[scenario] = {"image_size": list(size), "mask_box": list(box),
                             "strategy": strategy, "variants": entry}  # fmt: skip
        report = {  # written after every scenario, so a long run leaves partial results
            "benchmark": "inpaint",
            **device_info(args.device),
            "steps": args.steps,
            "unet_calls_per_inpaint": unet_calls,
            "default_unet_calls": DEFAULT_STEPS,
            "networks": "tiny" if args.tiny else "released sizes, random weights",
            "vae": "SDXL AutoencoderKL layout, float32",
            "compiled": args.compile,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30
            if args.device.startswith("cuda")
            else None,
            **machine_state(),
            "results": results,
        }
        emit(report, args.out)


if __name__ == "__main__":
    main()
