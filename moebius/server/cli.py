"""`moebius serve`: the HTTP API and web page on one loaded pipeline (FastAPI + uvicorn).

Options are checked before anything heavy is imported; a non-loopback --host needs --api-key.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

from moebius import options as opts
from moebius.errors import UsageError

logger = logging.getLogger("moebius")

DEFAULT_PORT = 8080  # IOPaint's, so its clients find us
SHUTDOWN_GRACE_S = 30  # in-flight requests get this long to finish on SIGINT / SIGTERM


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name that may resolve anywhere


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the `moebius` command's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="HTTP API + web page (needs the 'server' extra)",
        description="Serve the inpainting pipeline over HTTP: the web page at /, the API at "
        "/v1/* (docs at /docs) and IOPaint-compatible /api/v1/*. Binds 127.0.0.1 by default; "
        "any other address needs --api-key.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--model", choices=opts.MODELS, default=None, help="moebius or pixelhacker")
    p.add_argument("--variant", choices=opts.VARIANTS, default=opts.DEFAULT_VARIANT)
    p.add_argument("--weights", help="weights folder or hub repo (default: the --model repo)")
    p.add_argument("--cache-dir", help="Hugging Face cache folder (default: HF_HOME's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=opts.DTYPES, default="float32")
    p.add_argument("--fast", action="store_true",
                   help="optimised UNet (same outputs); bf16 with --dtype bfloat16")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="with --fast: torch.compile the UNet while loading (GPU; minutes "
                   "once, cached on disk; on CPU the eager fast path is faster)")  # fmt: skip
    p.add_argument("--queue-size", type=_positive(int), default=8, help="waiting requests (8)")
    p.add_argument("--max-pixels", type=_positive(int), default=opts.DEFAULT_MAX_PIXELS,
                   help=f"largest image in pixels, checked from its header "
                   f"({opts.DEFAULT_MAX_PIXELS})")  # fmt: skip
    p.add_argument("--max-upload-mb", type=_positive(float), default=50.0, help="MB (50)")
    p.add_argument("--timeout", type=_positive(float), default=600.0,
                   help="seconds from arrival to answer, else 504 (600)")  # fmt: skip
    p.add_argument("--api-key", default=os.environ.get("MOEBIUS_API_KEY"),
                   help="require this key (Authorization: Bearer KEY); default: $MOEBIUS_API_KEY, "
                   "which keeps it out of the process list")  # fmt: skip
    p.set_defaults(func=run)
    return p


def check_args(args) -> None:
    """Raise UsageError (exit 2) for an unsafe bind or a bad device, before loading anything."""
    try:
        opts.validate(device=args.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if not is_loopback(args.host) and not args.api_key:
        raise UsageError(
            f"--host {args.host} accepts connections from other machines, so it needs "
            "--api-key KEY (clients then send 'Authorization: Bearer KEY'); or bind 127.0.0.1"
        )
    if args.compile and not args.fast:
        raise UsageError("--compile compiles the optimised UNet: add --fast")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")


def run(args) -> int:
    check_args(args)
    try:
        import uvicorn

        from moebius.server.app import ServerConfig, create_app
    except ImportError as err:
        raise UsageError(
            f"moebius serve needs the server extra ({err.name} is missing): "
            "pip install 'moebius-inpaint[server]'"
        ) from err
    from moebius import hub

    model = args.model or opts.DEFAULT_MODEL
    files = hub.resolve(args.weights, args.variant, model=model, cache_dir=args.cache_dir)

    def load():
        import torch

        from moebius.pipeline import InpaintPipeline

        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, args.dtype)
        pipe = InpaintPipeline.from_files(files, model=args.model)
        if not args.fast:
            return pipe.to(device, dtype)
        pipe.to(device).optimize(dtype, compile=args.compile)  # fold in float32, then cast
        pipe.vae.to(dtype=dtype)
        return pipe.warm_up() if args.compile else pipe

    config = ServerConfig(
        queue_size=args.queue_size, max_pixels=args.max_pixels,
        max_upload_mb=args.max_upload_mb, timeout=args.timeout, api_key=args.api_key,
        model=model, variant=args.variant, weights=args.weights,
    )  # fmt: skip
    app = create_app(load, config)
    logger.info("serving on http://%s:%d (docs at /docs)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                log_level="info")  # fmt: skip
    return 0
