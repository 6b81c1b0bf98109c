"""`moebius export onnx`: write the three ONNX graphs + manifest of a weights folder or hub repo."""

from __future__ import annotations

import argparse
import json
import logging

from moebius import hub

logger = logging.getLogger(__name__)

ONNX_DTYPES = ("fp32", "fp16")  # moebius.export.onnx.DTYPES, kept torch-free for argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `export` (with its `onnx` target) on the top-level subparsers."""
    parser = subparsers.add_parser("export", help="export the networks for other runtimes")
    targets = parser.add_subparsers(dest="target", required=True)
    p = targets.add_parser(
        "onnx",
        help="vae_encoder.onnx, unet.onnx, vae_decoder.onnx + moebius_onnx.json",
        description="Export the VAE encoder, UNet and VAE decoder as ONNX graphs (opset 18, "
        "dynamic batch, native size) with a JSON manifest of shapes, VAE scaling and the recipe, "
        "for onnxruntime (`moebius inpaint --backend onnxruntime --weights OUT`), the browser "
        "or phones. Needs the `export` extra (onnx, onnxruntime).",
    )
    p.add_argument("--weights", help="weights folder or hub repo (default: the --model repo)")
    p.add_argument("--model", choices=tuple(hub.MODEL_REPOS), default="moebius")
    p.add_argument("--variant", choices=hub.VARIANTS, default=hub.DEFAULT_VARIANT)
    p.add_argument("--cache-dir", help="Hugging Face cache folder (default: HF_HOME's)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--dtype",
        choices=ONNX_DTYPES,
        default="fp32",
        help="UNet weights dtype (the VAE graphs stay fp32); inputs and outputs are fp32",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="run each graph in onnxruntime against torch and print max |diff|",
    )
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Export; with --check, print the parity JSON. Returns the exit status."""
    from moebius.export import onnx as onnx_export
    from moebius.pipeline import InpaintPipeline

    files = hub.resolve(args.weights, args.variant, model=args.model, cache_dir=args.cache_dir)
    pipe = InpaintPipeline.from_files(files, model=args.model)
    manifest = onnx_export.export(
        pipe.unet, pipe.vae, args.out, dtype=args.dtype, scheduler=pipe.scheduler
    )
    logger.info("wrote %s", manifest.parent)
    if args.check:
        diffs = onnx_export.parity(args.out, pipe.unet, pipe.vae)
        print(json.dumps({"max_abs_diff": diffs, "dtype": args.dtype}))
    print(manifest.parent)
    return 0
