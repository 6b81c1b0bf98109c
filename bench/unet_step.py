"""Benchmark: one guided UNet step at 512 px (batch 2 = one image with guidance), plain vs fast.

Variants, timed interleaved in one process (one warm-up each, then `--runs` rounds):
  plain_fp32  the eager reference modules (numerically the original),
  fast_fp32   `moebius.models.optimize(model)`,
  fast_bf16   `optimize(model, torch.bfloat16)` (skipped where bf16 is not native),
  *_compiled  with `--compile`: the fast variants through `optimize(..., compile=True)`.
Prints JSON: device and CPU flags, torch version, threads, shapes, FLOPs, median + spread per
variant, speed ratios to plain_fp32, achieved GFLOP/s as a fraction of a large matmul's rate
in the same dtype (measured in this process), the max abs / relative difference of eps to
plain_fp32, and the peak memory of one call per variant (CPU: process peak RSS, which includes
every variant's weights; GPU: max allocated).

    python bench/unet_step.py --runs 5 --out bench/results/unet_step_cpu.json
    python bench/unet_step.py --weights ../shared/reference/parity --runs 3
    python bench/unet_step.py --compile --runs 5   # + torch.compile'd fast variants
    python bench/unet_step.py --device cuda --runs 20   # adds fast_fp16 (not yet measured)
"""

import argparse
import json
import time
from pathlib import Path

import torch
from report import (
    device_info,
    emit,
    interleaved,
    machine_state,
    matmul_gflops,
    peak_memory_gib,
    peak_rss_gib,
)
from student_forward import count_flops

from moebius.models import MoebiusConfig, MoebiusUNet, optimize
from moebius.models.optimize import cpu_has_fast_bf16


def build(weights: Path | None) -> MoebiusUNet:
    """The released-size student with seeded random weights, or a reference folder's model."""
    if weights is None:
        torch.manual_seed(0)
        return MoebiusUNet(MoebiusConfig()).eval()
    from safetensors.torch import load_file

    config = json.loads((weights / "config.json").read_text())
    model = MoebiusUNet(MoebiusConfig.from_original(config.get("config", config))).eval()
    model.load_state_dict(load_file(str(weights / "weights.safetensors")), strict=True)
    return model


def guided_inputs(config: MoebiusConfig, batch: int):
    """Noisy latent | mask | masked latent, t = 900, the negative then the conditional ids."""
    s, half = config.sample_size, config.num_context_tokens
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, config.in_channels, s, s, generator=gen)
    ids = torch.tensor(
        [list(range(half, 2 * half))] * (batch // 2) + [list(range(half))] * (batch // 2)
    )
    return sample, torch.tensor([900]), ids


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max abs and relative (||a - b|| / ||b||) difference of eps to the plain fp32 eps."""
    out = out.float()
    return {
        "max_abs_diff": (out - ref).abs().max().item(),
        "rel_err": ((out - ref).norm() / ref.norm()).item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="reference folder; default random full-size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with guidance")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile'd copies of the fast variants (first_call_s "
                        "then includes compiling)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    plain = build(args.weights).to(args.device)
    config = plain.config
    sample, t, ids = (x.to(args.device) for x in guided_inputs(config, args.batch))
    models = {"plain_fp32": plain, "fast_fp32": optimize(plain)}
    if args.device != "cpu" or cpu_has_fast_bf16():
        models["fast_bf16"] = optimize(plain, torch.bfloat16)
    if args.device != "cpu":
        models["fast_fp16"] = optimize(plain, torch.float16)
    if args.compile:
        for name in [n for n in models if n.startswith("fast")]:
            dtype = next(models[name].parameters()).dtype
            models[f"{name}_compiled"] = optimize(plain, dtype, compile=True)
    dtypes = {name: next(m.parameters()).dtype for name, m in models.items()}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None

    with torch.inference_mode():
        ref = plain(sample, t, ids)
        accuracy, first_call = {}, {}
        for name, model in models.items():  # the first call of a compiled model compiles it
            start = time.perf_counter()
            accuracy[name] = compare(model(sample.to(dtypes[name]), t, ids), ref)
            first_call[name] = time.perf_counter() - start
        inputs = {n: sample.to(dtypes[n]) for n in models}
        calls = {n: (lambda m=m, x=inputs[n]: m(x, t, ids)) for n, m in models.items()}
        timing = interleaved(calls, args.runs, sync)
        peaks = {name: peak_memory_gib(call, args.device) for name, call in calls.items()}
        rates = {d: matmul_gflops(d, args.device) for d in set(dtypes.values())}

    flops = count_flops(config, args.batch)
    base = timing["plain_fp32"]["median_s"]
    results = {}
    for name, stats in timing.items():
        gflops = flops / stats["median_s"] / 1e9
        results[name] = {
            "dtype": str(dtypes[name]).removeprefix("torch."),
            **stats,
            "speedup_vs_plain_fp32": base / stats["median_s"],
            "gflop_per_s": gflops,
            "fraction_of_matmul_rate": gflops / rates[dtypes[name]],
            "first_call_s": first_call[name],
            "peak_memory_gib": peaks[name],
            **accuracy[name],
        }
    emit(
        {
            "benchmark": "unet_step",
            **device_info(args.device),
            "weights": str(args.weights or "random full-size (seed 0)"),
            "input_shape": list(sample.shape),
            "gflop_per_step": flops / 1e9,
            "matmul_gflop_per_s": {str(d).removeprefix("torch."): r for d, r in rates.items()},
            "peak_rss_gib": peak_rss_gib(),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if sync else None,
            **machine_state(),
            "results": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
