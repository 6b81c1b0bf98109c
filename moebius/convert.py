"""`moebius convert`: a released `.bin` (+ its VAE folder) -> a weights folder in our format.

The folder is built under a temporary name beside OUT_DIR and renamed at the end, so a failure or
an interrupt leaves nothing behind and an existing OUT_DIR is never half overwritten. Checks that
need no torch (the files exist, OUT_DIR is new and writable) run first.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from moebius import hub, options
from moebius.errors import UsageError
from moebius.jobs import Job, check_writable

logger = logging.getLogger("moebius")


def add_parser(sub) -> None:
    """Register `convert` on the `moebius` subcommand parsers."""
    p = sub.add_parser("convert", help="released .bin -> our folder (unet/ [+ vae/])")
    p.add_argument("bin", help="released diffusion_pytorch_model.bin")
    p.add_argument("out_dir", help="new folder to create (written whole, or not at all)")
    p.add_argument("--model", choices=options.MODELS, default=options.DEFAULT_MODEL)
    p.add_argument("--config", help="original config JSON (default: the released architecture)")
    p.add_argument("--vae", help="VAE folder to include, e.g. the released vae/")
    p.set_defaults(func=run)


def _original_config(path: Path | None, model: str):
    """Architecture for a released .bin: the original config JSON (optionally under "config")."""
    from moebius.models.checkpoints import CheckpointError, read_json, released_config

    if path is None:
        return released_config(model)
    data = read_json(path)
    num_embeddings = data.get("num_embeddings", 20)
    data = data.get("config", data)
    if model == options.DEFAULT_MODEL:
        from moebius.models import MoebiusConfig as config_cls
    else:
        from moebius.models.teacher import PixelHackerConfig as config_cls
    try:
        return config_cls.from_original(data, num_embeddings=num_embeddings)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is not an original {model} config: {err}") from err


def run(args) -> int:
    """Convert ARGS.bin into ARGS.out_dir (see the module docstring); exit status 0."""
    source, out = Path(args.bin), Path(args.out_dir)
    if not source.is_file():
        raise UsageError(f"{source} does not exist or is not a file (a released .bin)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder; choose a new OUT_DIR")
    if args.config and not Path(args.config).is_file():
        raise UsageError(f"--config {args.config} does not exist")
    if args.vae and not (Path(args.vae) / hub.CONFIG_NAME).is_file():
        raise UsageError(f"--vae {args.vae} is not a VAE folder (it has no {hub.CONFIG_NAME})")
    check_writable([Job(source, None, out / hub.UNET_FOLDER)])
    from moebius.models import checkpoints

    config = _original_config(Path(args.config) if args.config else None, args.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    try:
        checkpoints.convert_original(source, config, work / hub.UNET_FOLDER)
        if args.vae:
            from moebius.vae import load_vae

            load_vae(args.vae).save_pretrained(work / hub.VAE_FOLDER, safe_serialization=True)
        os.replace(work, out)  # atomic; an empty `out` folder is replaced
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if not args.vae:
        logger.info("wrote %s only; add --vae DIR to make %s a complete weights folder",
                    out / hub.UNET_FOLDER, out)  # fmt: skip
    print(out)
    return 0
