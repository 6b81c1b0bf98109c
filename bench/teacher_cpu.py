"""Full-size PixelHacker teacher (0.862B) forward on CPU, random weights, fp32; prints JSON.

Default: 512 px image = 64 x 64 latent, batch 2 (one CFG pair), median of 3 runs after one
warm-up. Run: `python bench/teacher_cpu.py [--out FILE]` (see bench/gla_chunked.py for the
MALLOC_* variables recorded in the JSON).
"""

import argparse
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from report import emit, machine_state

from moebius.models.teacher import PixelHackerConfig, PixelHackerUNet


def rss_gb() -> float:
    """Current resident set size in GB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernel", default="auto", choices=["auto", "chunked", "recurrent"])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    start = time.perf_counter()
    model = PixelHackerUNet(PixelHackerConfig()).eval().set_gla_kernel(args.kernel)
    build_s = time.perf_counter() - start
    rss_after_build = rss_gb()

    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, 9, args.latent, args.latent, generator=gen)
    timesteps = torch.tensor([500])
    input_ids = torch.arange(10).repeat(args.batch, 1)  # background ids 0..9
    times = []
    with torch.inference_mode():
        start = time.perf_counter()
        eps = model(sample, timesteps, input_ids)
        warmup_s = time.perf_counter() - start
        for _ in range(args.repeats):
            start = time.perf_counter()
            model(sample, timesteps, input_ids)
            times.append(time.perf_counter() - start)

    result = {
        "benchmark": "pixelhacker_teacher_forward",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "gla_kernel": args.kernel,
        "sample_shape": list(sample.shape),
        "output_shape": list(eps.shape),
        "output_finite": bool(torch.isfinite(eps).all()),
        "build_s": build_s,
        "warmup_s": warmup_s,
        "median_s": statistics.median(times),
        "times_s": times,
        "rss_after_build_gb": rss_after_build,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,  # KB on Linux
        **machine_state(),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
