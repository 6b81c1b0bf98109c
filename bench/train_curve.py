"""Learning evidence: `moebius train configs/tiny-cpu.json` on the real photos; curve as JSON + PNG.

Writes a manifest of ../shared/data/photos (10 photos with their object masks), runs the tiny
preset (seeded tiny student, tiny random teacher, tiny VAE, 128 px crops; 100 steps) with the
`moebius` command, and records the per-step losses and the wall-clock time of the whole command.
Criterion (issue 10): the output-KD loss averaged over the last 10 steps is at most 30% of its
average over the first 10, within 200 steps and 5 minutes on 2 CPU cores.
Run: `python bench/train_curve.py [--steps N] [--threads 2] [--out bench/results/NAME.json]`.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import emit, machine_state

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "photos"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss_output_kd", "loss_feature_kd", "loss_task"):
        values = [r[key] for r in rows]
        if all(v is not None for v in values):
            ax.plot(steps, values, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="default: the preset's run.max_steps")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the run")
    parser.add_argument("--out", type=Path, help="JSON path (the PNG goes beside it)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        manifest, run = Path(tmp) / "photos.jsonl", Path(tmp) / "run"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        moebius = [sys.executable, "-m", "moebius"]
        subprocess.run([*moebius, "data", "manifest", str(PHOTOS), "-o", str(manifest),
                        "--masks", str(PHOTOS)], env=env, check=True)  # fmt: skip
        start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([*moebius, "train", str(ROOT / "configs" / "tiny-cpu.json"), "--output-dir",
                        str(run), *(["--max-steps", str(args.steps)] if args.steps else []),
                        "--set", f"data.manifest={manifest}", "--set", "run.progress=false"],
                       env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        wall = time.perf_counter() - start
        cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds of the run (main process + data worker): what it costs on idle cores,
        # nearly independent of how many other processes share the machine
        cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((run / "config.json").read_text())

    kd = [r["loss_output_kd"] for r in rows]
    first, last = sum(kd[:10]) / 10, sum(kd[-10:]) / 10
    result = {
        "benchmark": "train_curve (moebius train configs/tiny-cpu.json on shared/data/photos)",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": args.threads,
        "torch": torch.__version__,
        "dtype": "float32",
        "shapes": {
            "batch": config["run"]["batch_size"],
            "crop_px": config["data"]["resolution"],
            "latent": config["data"]["resolution"] // 8,
        },  # fmt: skip
        "steps": len(rows),
        "wall_s_including_startup": round(wall, 1),
        "cpu_s_main_and_worker": round(cpu, 1),
        "output_kd_first10_mean": first,
        "output_kd_last10_mean": last,
        "output_kd_ratio_last_to_first": last / first,
        "criterion": "ratio <= 0.30 within 200 steps and 300 s on 2 cores",
        "passed": last / first <= 0.30 and len(rows) <= 200 and wall <= 300,
        "machine": machine_state(),
        "curve": [
            {
                k: r[k]
                for k in (
                    "step",
                    "loss",
                    "loss_task",
                    "loss_output_kd",
                    "loss_feature_kd",
                    "grad_norm",
                )
            }
            for r in rows
        ],  # fmt: skip
    }
    emit(result, args.out)
    if args.out:
        load = result["machine"]["load_average_1min"]
        title = (f"tiny-cpu: output KD {first:.3f} -> {last:.3f} ({last / first:.0%}) in "
                 f"{len(rows)} steps, {wall:.0f} s, load {load:.1f}")  # fmt: skip
        plot(rows, args.out.with_suffix(".png"), title)


if __name__ == "__main__":
    main()
