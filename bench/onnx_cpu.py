"""Benchmark: onnxruntime against torch (eager, fp32) on CPU for the three exported graphs.

Released-size student and SDXL VAE with random weights, exported with `moebius.export.onnx`
(fp32), then each graph timed in both runtimes with the same thread count, interleaved run by
run in one process: the UNet at batch 2 (one guided step at 512 px), the VAE encoder and decoder
at batch 1 (512 px). Also records each graph's max |onnxruntime - torch| on those inputs.

    python bench/onnx_cpu.py --runs 3 --out bench/results/onnx_cpu.json
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from report import device_info, emit, interleaved, machine_state, peak_rss_gib
from tiny_decoder import SDXL_VAE

from moebius.export import onnx as onnx_export
from moebius.export import runtime
from moebius.models import MoebiusConfig, MoebiusUNet

GRAPH_BATCH = {"vae_encoder": 1, "unet": 2, "vae_decoder": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--graphs", nargs="+", default=list(GRAPH_BATCH))
    parser.add_argument("--workdir", type=Path, help="export folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = MoebiusUNet(MoebiusConfig()).eval()
    vae = AutoencoderKL(**SDXL_VAE).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        start = time.perf_counter()
        if not (folder / onnx_export.MANIFEST_NAME).is_file():
            onnx_export.export(unet, vae, folder)
        export_s = time.perf_counter() - start
        sizes = {k: (folder / f).stat().st_size / 2**20 for k, f in onnx_export.GRAPH_FILES.items()}
        ort_unet, ort_vae = runtime.load_networks(folder, threads=args.threads)
        modules = onnx_export.graph_modules(unet, vae)
        ort = {
            "vae_encoder": lambda image: ort_vae.encode(image).latent_dist.parameters,
            "unet": lambda sample, timestep, input_ids: ort_unet(sample, timestep, input_ids),
            "vae_decoder": lambda z: ort_vae.decode(z).sample,
        }
        results = {}
        for name in args.graphs:
            inputs = onnx_export.example_inputs(
                unet, vae, GRAPH_BATCH[name], generator=torch.Generator().manual_seed(1)
            )[name]
            with torch.inference_mode():
                got, want = ort[name](*inputs.values()), modules[name](*inputs.values())
                diff = float((got - want).abs().max())
                times = interleaved(
                    {
                        "torch": lambda m=modules[name], x=inputs: m(*x.values()),
                        "onnxruntime": lambda f=ort[name], x=inputs: f(*x.values()),
                    },
                    args.runs,
                )
            results[name] = {
                "batch": GRAPH_BATCH[name],
                "input_shapes": {k: list(v.shape) for k, v in inputs.items()},
                "file_mib": sizes[name],
                "max_abs_diff": diff,
                **times,
                "onnxruntime_speedup_vs_torch": times["torch"]["median_s"]
                / times["onnxruntime"]["median_s"],
            }
    import onnxruntime

    report = {
        "benchmark": "onnx_cpu",
        **device_info("cpu"),
        "threads": args.threads,
        "onnxruntime": onnxruntime.__version__,
        "dtype": "float32",
        "opset": onnx_export.OPSET,
        "export_s": export_s,
        "runs": args.runs,
        "results": results,
        "peak_rss_gib": peak_rss_gib(),
        **machine_state(),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
