"""Benchmark: one forward of the released-size Moebius student (random weights), per dtype.

Prints JSON: device, torch version, threads, shapes, FLOPs, median seconds per forward and the
achieved GFLOP/s for each dtype, and the speed ratio of each dtype to float32 measured in this run.
One forward = one denoising step with classifier-free guidance (batch 2 per image).

    python bench/student_forward.py --device cpu --runs 3
    python bench/student_forward.py --device cuda --dtypes float32 bfloat16 float16 --runs 20
"""

import argparse
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from report import emit, machine_state
from torch.utils.flop_counter import FlopCounterMode

from moebius.models import MoebiusConfig, MoebiusUNet


def count_flops(config: MoebiusConfig, batch: int) -> int:
    """FLOPs of one forward, counted on the meta device (no compute)."""
    with torch.device("meta"):
        model = MoebiusUNet(config).eval()
        inputs = _inputs(config, batch, "meta", torch.float32)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


def _inputs(config: MoebiusConfig, batch: int, device, dtype):
    s = config.sample_size
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, config.in_channels, s, s, generator=gen).to(device, dtype)
    half = config.num_context_tokens
    ids = torch.tensor([list(range(half, 2 * half)), list(range(half))] * (batch // 2))
    return sample, torch.tensor([900], device=device), ids.to(device)


def time_forward(model, inputs, runs: int, device: str) -> list[float]:
    """Seconds per forward, after one warm-up."""
    times = []
    with torch.inference_mode():
        for i in range(runs + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(*inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call is the warm-up
                times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with guidance")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    config = MoebiusConfig()
    flops = count_flops(config, args.batch)
    model = MoebiusUNet(config).eval()
    results = {}
    for name in args.dtypes:
        dtype = getattr(torch, name)
        model.to(args.device, dtype)
        times = time_forward(
            model, _inputs(config, args.batch, args.device, dtype), args.runs, args.device
        )
        median = statistics.median(times)
        results[name] = {"median_s": median, "runs_s": times, "gflop_per_s": flops / median / 1e9}
    if "float32" in results:
        for entry in results.values():
            entry["speedup_vs_float32"] = results["float32"]["median_s"] / entry["median_s"]
    report = {
        "benchmark": "student_forward",
        "device": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "device_type": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_shape": [args.batch, config.in_channels, config.sample_size, config.sample_size],
        "gflop_per_forward": flops / 1e9,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        **machine_state(),
        "results": results,
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
