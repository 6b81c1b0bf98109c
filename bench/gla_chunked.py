"""Chunked GLA vs the token-by-token recurrence at the teacher's largest level; prints JSON.

Default shapes = level 0 of the released teacher at 512 px: T = 64 x 64 = 4096 tokens, C = 320,
8 heads (head_k 20, head_v 40), batch 2 (CFG). Run: `python bench/gla_chunked.py [--out FILE]`.

With glibc's default malloc settings large temporaries are mapped fresh and page-faulted on every
call (on the 2-core dev VM a full-length chunked kernel spent ~60 ms of system time per call, more
than the arithmetic); `gla_chunked` therefore works in blocks of `--block-size` tokens.
`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296` keeps large temporaries in the
heap; the JSON records the MALLOC_* variables and the system CPU time of each kernel.
"""

import argparse
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import emit, machine_state

from moebius.models.gla import gla_chunked, gla_recurrent


def timed(fn, system_times: list[float]) -> float:
    """Wall seconds of one call; appends the kernel (system) CPU seconds it used."""
    system = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    system_times.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - system)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=1024, help="tokens per gla_chunked block")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    head_k, head_v = args.channels // 2 // args.heads, args.channels // args.heads
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.length, args.heads)
    q = torch.randn(*shape, head_k, generator=gen, dtype=dtype)
    k = torch.randn(*shape, head_k, generator=gen, dtype=dtype)
    v = torch.randn(*shape, head_v, generator=gen, dtype=dtype)
    # Gates as the layer makes them: logsigmoid(N(0, 1)) / 16.
    g = F.logsigmoid(torch.randn(*shape, head_k, generator=gen, dtype=dtype)) / 16

    def chunked_fn():
        return gla_chunked(q, k, v, g, chunk_size=args.chunk_size, block_size=args.block_size)

    with torch.inference_mode():
        o_chunked, _ = chunked_fn()  # warm-up
        o_recurrent, _ = gla_recurrent(q, k, v, g)
        chunked, recurrent, chunked_sys, recurrent_sys = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so background load hits both alike
            chunked.append(timed(chunked_fn, chunked_sys))
            recurrent.append(timed(lambda: gla_recurrent(q, k, v, g), recurrent_sys))

    result = {
        "benchmark": "gla_chunked_vs_recurrent",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "chunk_size": args.chunk_size,
        "block_size": args.block_size,
        "shapes": {
            "q,k,g": [args.batch, args.length, args.heads, head_k],
            "v,o": [args.batch, args.length, args.heads, head_v],
        },
        "repeats": args.repeats,
        "chunked_median_s": statistics.median(chunked),
        "recurrent_median_s": statistics.median(recurrent),
        "speedup": statistics.median(recurrent) / statistics.median(chunked),
        "speedup_of_minima": min(recurrent) / min(chunked),  # less sensitive to background load
        "chunked_times_s": chunked,
        "recurrent_times_s": recurrent,
        # page faults of fresh large temporaries show up as system time (see malloc_env)
        "chunked_system_cpu_s_median": statistics.median(chunked_sys),
        "recurrent_system_cpu_s_median": statistics.median(recurrent_sys),
        "max_abs_diff": (o_chunked - o_recurrent).abs().max().item(),
        "max_abs_output": o_recurrent.abs().max().item(),
        **machine_state(),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
