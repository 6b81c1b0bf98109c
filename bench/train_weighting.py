"""Benchmark: cost of the gradient-norm adaptive weights in one distillation training step.

Times the same step twice in one run, interleaved: with `LossConfig(adaptive=True)` (the
original recipe) and with fixed weights (`adaptive=False`). A step = frozen teacher forward
(no grad), student forward in train mode, `distill_losses`, backward, clip to 1.0, Muon + AdamW
step. Prints JSON with the median / min / max seconds per step of each (wall clock and process
CPU time) and the overhead ratio adaptive / fixed - 1.

    OMP_NUM_THREADS=1 python bench/train_weighting.py --out bench/results/train_weighting_cpu.json
    python bench/train_weighting.py --models full --device cuda --dtype bfloat16 --batch 2
"""

import argparse
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from report import emit, machine_state

from moebius.models import MoebiusConfig, MoebiusUNet, PixelHackerConfig, PixelHackerUNet
from moebius.train import LossConfig, build_optimizer, distill_losses, weighting_params

# Student config + a teacher whose stage 5 has the shape of the student's stage 2 (pair (2, 5)).
MODELS = {
    "tiny": (MoebiusConfig.tiny(), replace(PixelHackerConfig.tiny(), sample_size=16)),
    "reduced": (  # the parity-vector student (2.6M parameters, 32x32 latent)
        MoebiusConfig(
            sample_size=32,
            block_out_channels=(32, 64, 128),
            cross_attention_dim=48,
            encoder_hid_dim=96,
        ),
        replace(PixelHackerConfig.tiny(), block_out_channels=(32, 64, 128, 128)),
    ),
    "full": (MoebiusConfig(), PixelHackerConfig()),  # 0.226B student, 0.862B teacher, 512 px
}


def make_step(name: str, batch: int, device: str, dtype: torch.dtype):
    """Build the models once; return step(adaptive) that runs one full training step."""
    student_cfg, teacher_cfg = MODELS[name]
    torch.manual_seed(0)
    student = MoebiusUNet(student_cfg).to(device).train()
    teacher = PixelHackerUNet(teacher_cfg).to(device).eval().requires_grad_(False)
    optimizer = build_optimizer(student.named_parameters())
    feature_param, output_param = weighting_params(student)
    g = torch.Generator().manual_seed(1)
    s = student_cfg.sample_size
    sample = torch.randn(batch, 9, s, s, generator=g).to(device)
    noise = torch.randn(batch, 4, s, s, generator=g).to(device)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ids = torch.stack([torch.arange(10) + 10 * (i % 2) for i in range(batch)]).to(device)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def step(adaptive: bool) -> None:
        cfg = LossConfig(perceptual=False, adaptive=adaptive)
        with autocast:
            with torch.no_grad():
                eps_teacher, teacher_features = teacher(
                    sample, timesteps, ids, return_features=True
                )
            eps, features = student(sample, timesteps, ids, return_features=True)
        total, _ = distill_losses(
            cfg,
            eps_student=eps.float(),
            noise=noise,
            student_features=[f.float() for f in features],
            eps_teacher=eps_teacher.float(),
            teacher_features=[f.float() for f in teacher_features],
            feature_param=feature_param,
            output_param=output_param,
        )
        total.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    n_params = sum(p.numel() for p in student.parameters())
    return step, {"student_params": n_params, "latent": [batch, 4, s, s]}


def time_steps(step, runs: int, device: str) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per step, fixed and adaptive alternating, after a warm-up.

    On a shared CPU the wall clock includes waiting for other processes; the process CPU time
    (one thread) counts only this step's own work, so the ratio is computed from it there.
    """
    times = {label: {"wall": [], "cpu": []} for label in ("fixed", "adaptive")}
    for i in range(runs + 1):
        for label in ("fixed", "adaptive") if i % 2 == 0 else ("adaptive", "fixed"):
            if device == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            step(label == "adaptive")
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times[label]["wall"].append(time.perf_counter() - wall)
                times[label]["cpu"].append(time.process_time() - cpu)
    return times


def summary(seconds: list[float]) -> dict:
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "runs": len(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "reduced"], choices=MODELS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    result = {
        "benchmark": "train_weighting",
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
        ),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "batch": args.batch,
        **machine_state(),
        "models": {},
    }
    if args.device == "cpu":
        result["gpu"] = "none on this machine: the full-size case (0.226B, 512 px, bf16) not run"
    for name in args.models:
        step, shapes = make_step(name, args.batch, args.device, dtype)
        times = time_steps(step, args.runs, args.device)
        entry = {**shapes}
        for clock in ("wall", "cpu"):
            fixed, adaptive = (summary(times[k][clock]) for k in ("fixed", "adaptive"))
            entry[clock] = {
                "fixed": fixed,
                "adaptive": adaptive,
                "overhead_median": adaptive["median_s"] / fixed["median_s"] - 1,
                "overhead_min": adaptive["min_s"] / fixed["min_s"] - 1,
            }
        clock = "wall" if args.device == "cuda" else "cpu"
        entry["overhead"] = entry[clock]["overhead_median"]
        entry["overhead_clock"] = clock
        entry["adaptive_steps_per_s"] = 1 / entry["wall"]["adaptive"]["median_s"]
        result["models"][name] = entry
    emit(result, args.out)


if __name__ == "__main__":
    main()
