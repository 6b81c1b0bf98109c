"""Benchmark: where the bfloat16 error of the fast UNet comes from (one guided step at 512).

For the fast fp32 UNet (random released-size weights, or `--weights`), eps is compared with
the same network after rounding (a) every weight to bf16 and back (math stays fp32), (b) the
weights of one kind of module at a time, and (c) the whole bf16 fast path (weights and
activations). Relative error = ||a - b|| / ||b||. Prints JSON.

    python bench/bf16_sensitivity.py --out bench/results/bf16_sensitivity_cpu.json
"""

import argparse
import copy
import re
from pathlib import Path

import torch
from report import device_info, emit, machine_state
from unet_step import build, guided_inputs

from moebius.models import optimize
from moebius.models.optimize import cpu_has_fast_bf16


def kind(name: str) -> str:
    """The module kind a parameter belongs to: its parent's attribute name, e.g. 'to_qkv'."""
    parts = [p for p in name.split(".")[:-1] if not re.fullmatch(r"\d+", p)]
    return parts[-1] if parts else "root"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="reference folder; default random full-size")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    plain = build(args.weights)
    sample, t, ids = guided_inputs(plain.config, 2)
    fast = optimize(plain)
    tensors = dict(fast.named_parameters()) | dict(fast.named_buffers())
    kinds: dict[str, list[str]] = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            kinds.setdefault(kind(name), []).append(name)

    def rounded(names: list[str]) -> float:
        model = copy.deepcopy(fast)
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        for name in names:
            own[name].data.copy_(own[name].data.bfloat16().float())
        return rel_err(model(sample, t, ids), ref)

    with torch.inference_mode():
        ref = fast(sample, t, ids)
        result = {"all_weights_bf16": rounded([n for ns in kinds.values() for n in ns])}
        per_kind = {k: rounded(ns) for k, ns in kinds.items()}
        if cpu_has_fast_bf16():
            bf16 = optimize(plain, torch.bfloat16)
            result["bf16_fast_path"] = rel_err(bf16(sample.bfloat16(), t, ids), ref)
    emit(
        {
            "benchmark": "bf16_sensitivity",
            **device_info(),
            "weights": str(args.weights or "random full-size (seed 0)"),
            **machine_state(),
            "rel_err": result,
            "rel_err_weights_of_one_kind_bf16": dict(
                sorted(per_kind.items(), key=lambda kv: -kv[1])
            ),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
