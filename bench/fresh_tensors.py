"""Benchmark: the cost of a fresh large tensor on this machine (why the fast path keeps its
temporaries under 32 MiB, glibc's largest mmap threshold).

SiLU of a [2, C, 64, 64] fp32 map, out of place (a fresh output each call) vs in place, for a
52 MB map (above the threshold: mapped and page-faulted anew every call) and a 26 MB map
(reused from the heap). Median of several calls after warm-up, with minor page faults and
system time per call. Prints JSON.

    python bench/fresh_tensors.py --out bench/results/fresh_tensors_cpu.json
"""

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import device_info, emit, machine_state


def timed(fn, runs: int) -> dict:
    """Median ms of `fn`, plus minor page faults and system ms per call."""
    fn(), fn()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "minor_faults_per_call": (after.ru_minflt - before.ru_minflt) / runs,
        "system_ms_per_call": (after.ru_stime - before.ru_stime) / runs * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    results = {}
    with torch.inference_mode():
        for channels in (1600, 800):
            x = torch.randn(2, channels, 64, 64)
            mb = x.numel() * 4 / 1e6
            out_of_place = timed(lambda x=x: F.silu(x), args.runs)
            in_place = timed(lambda x=x: F.silu(x, inplace=True), args.runs)
            results[f"{mb:.0f}_MB"] = {
                "shape": list(x.shape),
                "out_of_place": out_of_place,
                "in_place": in_place,
                "ratio_out_of_place_vs_in_place": out_of_place["median_ms"] / in_place["median_ms"],
            }
    emit({"benchmark": "fresh_tensors", **device_info(), **machine_state(),
          "results": results}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
