"""`moebius export onnx`: write the three ONNX graphs + manifest of a weights folder or hub repo."""

from __future__ import annotations

import argparse
import json
import logging

from moebius import hub, options
from moebius.errors import UsageError

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
    p.add_argument("--model", choices=options.MODELS, default=options.DEFAULT_MODEL)
    p.add_argument("--variant", choices=options.VARIANTS, default=options.DEFAULT_VARIANT)
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


# ---------------------------------------------------------------- `moebius inpaint` options
BACKENDS = ("torch", "onnxruntime")
DECODERS = ("full", "tiny")


def add_inpaint_options(parser: argparse.ArgumentParser) -> None:
    """--backend, --decoder and --tiny-decoder of `moebius inpaint`."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="torch, or onnxruntime on a folder written by `moebius export onnx` (as --weights)",
    )
    parser.add_argument(
        "--decoder",
        choices=DECODERS,
        default="full",
        help="full: the VAE decoder; tiny: TAESDXL, preview quality, 10-25x faster decode",
    )
    parser.add_argument(
        "--tiny-decoder",
        help="TAESDXL folder or hub repo for --decoder tiny (default: madebyollin/taesdxl)",
    )


def uses_onnxruntime(args) -> bool:
    """Whether --weights names an ONNX export folder rather than torch weights."""
    return getattr(args, "backend", "torch") == "onnxruntime"


def check_inpaint_options(args) -> None:
    """Combinations argparse cannot check; torch-free, before any weights are resolved."""
    if args.tiny_decoder and args.decoder != "tiny":
        raise UsageError("--tiny-decoder chooses the weights of --decoder tiny; add --decoder tiny")
    if uses_onnxruntime(args):
        if not args.weights:
            raise UsageError(
                "--backend onnxruntime runs an exported folder: pass --weights OUT_DIR written "
                "by `moebius export onnx --weights DIR --out OUT_DIR`"
            )
        if args.dtype != "float32":
            raise UsageError(
                "--backend onnxruntime runs the dtype chosen at export (`moebius export onnx "
                f"--dtype fp16`); drop --dtype {args.dtype}"
            )


def load_onnxruntime_pipeline(args, device: str):
    """The pipeline on the graphs of the --weights export folder (CUDA's provider on cuda)."""
    from moebius.export import runtime

    check_inpaint_options(args)
    cuda = str(device).startswith("cuda")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else None
    pipe = runtime.load_pipeline(args.weights, providers=providers)
    logger.info("loaded the ONNX graphs of %s (onnxruntime); native size %d px",
                args.weights, pipe.native_size)  # fmt: skip
    return pipe


def apply_decoder(pipe, args) -> None:
    """With --decoder tiny, decode with TAESDXL instead of the VAE's decoder."""
    if getattr(args, "decoder", "full") != "tiny":
        return
    from moebius import tiny_decoder

    source = args.tiny_decoder or tiny_decoder.TAESDXL_REPO
    pipe.decoder = tiny_decoder.load_tiny_decoder(
        source, cache_dir=args.cache_dir, device=pipe.device
    )
    logger.info("decoding with the tiny decoder %s", source)
