"""Benchmark: decode time of TAESDXL (the tiny preview decoder) against the full SDXL VAE decoder.

Both at their released architectures with random weights (the timing does not depend on the
values), decoding the same latents [B, 4, 64, 64] -> [B, 3, 512, 512], interleaved run by run in
one process so machine load hits both alike. Prints JSON with medians, spread, FLOPs and the
speed-up of the tiny decoder measured in this run.

    python bench/tiny_decoder.py --runs 5 --out bench/results/tiny_decoder_cpu.json
"""

import argparse
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


def count_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    full = AutoencoderKL(**SDXL_VAE).eval().to(args.device)
    tiny = AutoencoderTiny().eval().to(args.device)  # defaults = madebyollin/taesdxl
    if dtype != torch.float32:
        full, tiny = full.to(dtype=dtype), tiny.to(dtype=dtype)
    side = args.size // vae_lib.latent_factor(full)
    latents = torch.randn(args.batch, 4, side, side, generator=torch.Generator().manual_seed(0))
    latents = latents.to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    fns = {
        "full_vae": lambda: vae_lib.decode(full, latents),
        "tiny_taesdxl": lambda: tiny_decoder.decode(tiny, latents),
    }
    with torch.inference_mode():
        flops = {name: count_flops(fn) for name, fn in fns.items()}
        results = interleaved(fns, args.runs, sync)
    for name, entry in results.items():
        entry["gflop"] = flops[name] / 1e9
        entry["decoder_parameters"] = sum(
            p.numel() for p in (full if name == "full_vae" else tiny).decoder.parameters()
        )
    speedup = results["full_vae"]["median_s"] / results["tiny_taesdxl"]["median_s"]
    report = {
        "benchmark": "tiny_decoder",
        **device_info(args.device),
        "dtype": args.dtype,
        "latent_shape": list(latents.shape),
        "image_shape": [args.batch, 3, args.size, args.size],
        "runs": args.runs,
        "results": results,
        "tiny_speedup_vs_full": speedup,
        "tiny_speedup_of_min_times": results["full_vae"]["min_s"]
        / results["tiny_taesdxl"]["min_s"],
        "peak_rss_gib": peak_rss_gib(),
        **machine_state(),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
