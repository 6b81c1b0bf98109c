"""Benchmark: decode time of TAESDXL (the tiny preview decoder) against the full SDXL VAE decoder.

Both at their released architectures with random weights (the timing does not depend on the
values), decoding the same latents [B, 4, 64, 64] -> [B, 3, 512, 512], interleaved run by run in
one process so machine load hits all alike. The full decoder runs as the pipeline runs it
(`moebius.vae.decode`, fp32); the tiny one as `--decoder tiny` runs it (`moebius.tiny_decoder`
loaded from a TAESDXL-layout folder: channels-last, bf16 where the device computes it natively,
else fp32), plus variants: fp32 channels-last, fp32 NCHW as diffusers loads it, onnxruntime fp32.
Prints JSON with medians, spread, FLOPs and each variant's speed-up over the full decoder
measured in this run.

    python bench/tiny_decoder.py --runs 3 --out bench/results/tiny_decoder_cpu.json
"""

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from report import device_info, emit, interleaved, machine_state, peak_rss_gib
from torch.utils.flop_counter import FlopCounterMode

from moebius import tiny_decoder
from moebius import vae as vae_lib

# The released VAE (hustvl/PixelHacker vae/, SDXL's AutoencoderKL config; shared/spec/ecosystem.md).
SDXL_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
)


def decode_gflop(model, latent_shape) -> float:
    """FLOPs of one decode, counted on the meta device (no compute)."""
    with torch.device("meta"):
        meta = type(model).from_config(model.config).eval()
        z = torch.empty(latent_shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta.decode(z)
    return counter.get_total_flops() / 1e9


def onnxruntime_decoder(tiny, latents, folder: Path, threads: int):
    """The tiny decoder as an onnxruntime session (fp32), same output contract."""
    import onnxruntime as ort

    path = folder / "tiny_decoder.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny.decoder.float(), (latents,), str(path), dynamo=False,
                          opset_version=18, input_names=["z"], output_names=["image"])  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    z = latents.numpy()
    return lambda: session.run(None, {"z": z})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    full = AutoencoderKL(**SDXL_VAE).eval().to(args.device)
    side = args.size // vae_lib.latent_factor(full)
    latents = torch.randn(args.batch, 4, side, side, generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    with tempfile.TemporaryDirectory() as tmp:
        AutoencoderTiny().save_pretrained(tmp)  # defaults = madebyollin/taesdxl; random weights
        tiny = tiny_decoder.load_tiny_decoder(tmp, device=args.device)  # what --decoder tiny runs
        fp32 = tiny_decoder.load_tiny_decoder(tmp, device=args.device, dtype=torch.float32)
        plain = AutoencoderTiny.from_pretrained(tmp).eval().to(args.device)  # NCHW, as loaded
        fns = {
            "full_vae": lambda: vae_lib.decode(full, latents),
            "tiny": lambda: tiny_decoder.decode(tiny, latents),
            "tiny_fp32": lambda: tiny_decoder.decode(fp32, latents),
            "tiny_nchw_fp32": lambda: plain.decode(latents.to(args.device)).sample.float(),
        }
        if args.device == "cpu":
            fns["tiny_onnxruntime_fp32"] = onnxruntime_decoder(
                plain, latents, Path(tmp), torch.get_num_threads()
            )
        with torch.inference_mode():
            results = interleaved(fns, args.runs, sync)
    gflop = {"full_vae": decode_gflop(full, latents.shape)}
    gflop["tiny"] = decode_gflop(tiny, latents.shape)
    for name, entry in results.items():
        entry["gflop"] = gflop["full_vae" if name == "full_vae" else "tiny"]
        entry["speedup_vs_full_vae"] = results["full_vae"]["median_s"] / entry["median_s"]
        entry["speedup_of_min_times"] = results["full_vae"]["min_s"] / entry["min_s"]
    report = {
        "benchmark": "tiny_decoder",
        **device_info(args.device),
        "dtype": {"full_vae": "float32", "tiny": str(tiny.dtype).removeprefix("torch.")},
        "latent_shape": list(latents.shape),
        "image_shape": [args.batch, 3, args.size, args.size],
        "decoder_parameters": {
            "full_vae": sum(p.numel() for p in full.decoder.parameters()),
            "tiny": sum(p.numel() for p in tiny.decoder.parameters()),
        },
        "runs": args.runs,
        "results": results,
        "tiny_speedup_vs_full_vae": results["tiny"]["speedup_vs_full_vae"],
        "peak_rss_gib": peak_rss_gib(),
        **machine_state(),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
