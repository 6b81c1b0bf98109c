"""The `moebius` command: `inpaint` (a file or a folder), `download` (fill the cache), `convert`.

Start-up stays light: inputs are paired and the weight files located (moebius.hub, no torch)
before torch and the pipeline are imported, so a missing file or missing weights are reported
at once. Exit status: 0 done, 1 some files failed (each reported, the rest finished), 2 the
command could not start (bad arguments, no weights).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from moebius import __version__, hub, options

logger = logging.getLogger("moebius")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"  # NAME.png's mask is MASK_DIR/NAME_mask.png or MASK_DIR/NAME.png
# CLI option -> pipeline keyword. Options left unset (None) take the pipeline's defaults, which
# are the original recipe's: the numbers live there only.
PIPELINE_OPTIONS = {
    "steps": "steps", "strength": "strength", "guidance": "guidance_scale",
    "noise_offset": "noise_offset", "strategy": "strategy", "margin": "margin",
    "dilate": "mask_dilation", "task": "task", "batch_size": "batch_size",
}  # fmt: skip


class UsageError(Exception):
    """The command cannot start as given; the message says what to change."""


@dataclass
class Job:
    """One image to inpaint: where it is, its mask, where the result goes, or why it cannot run."""

    image: Path
    mask: Path | None
    out: Path
    error: str | None = None


# --------------------------------------------------------------------------------- pairing inputs
def is_image_file(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def find_mask(mask_dir: Path, image: Path) -> Path:
    """The mask of `image` in `mask_dir` by stem: NAME_mask.<ext> or NAME.<ext>, never by order."""
    names = [f"{image.stem}{MASK_SUFFIX}", image.stem]
    found = [p for p in sorted(mask_dir.iterdir()) if p.stem in names and is_image_file(p)]
    found = [p for p in found if p.resolve() != image.resolve()]  # an image is not its own mask
    if len(found) != 1:
        wanted = f"{names[0]}.png or {names[1]}.png"
        problem = (
            "no mask" if not found else f"{len(found)} masks ({', '.join(p.name for p in found)})"
        )
        raise LookupError(
            f"{problem} for {image.name} in {mask_dir}: expected exactly one of {wanted}"
        )
    return found[0]


def plan_jobs(image_arg: Path, mask_arg: Path, out_arg: Path) -> list[Job]:
    """File mode (IMAGE MASK -o OUT) or folder mode (IMG_DIR MASK_DIR|MASK -o OUT_DIR)."""
    if not image_arg.exists():
        raise UsageError(f"{image_arg} does not exist")
    if not mask_arg.exists():
        raise UsageError(f"mask {mask_arg} does not exist")
    if image_arg.is_file():
        if mask_arg.is_dir():
            raise UsageError(f"{image_arg} is a file, so the mask must be a file, not {mask_arg}")
        if out_arg.is_dir():
            out_arg = out_arg / f"{image_arg.stem}.png"
        return [Job(image_arg, mask_arg, out_arg)]
    if out_arg.exists() and not out_arg.is_dir():
        raise UsageError(f"{image_arg} is a folder, so -o must be a folder; {out_arg} is a file")
    same_dir = mask_arg.is_dir() and mask_arg.resolve() == image_arg.resolve()
    images = [p for p in sorted(image_arg.iterdir()) if is_image_file(p)]
    if same_dir:  # masks live beside their images: NAME_mask.png is not an image to inpaint
        images = [p for p in images if not p.stem.endswith(MASK_SUFFIX)]
    if not images:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_arg}")
    jobs, outputs = [], {}
    for image in images:
        job = Job(image, mask_arg if mask_arg.is_file() else None, out_arg / f"{image.stem}.png")
        if job.mask is None:
            try:
                job.mask = find_mask(mask_arg, image)
            except LookupError as err:
                job.error = str(err)
        if job.out in outputs:
            job.error = f"{image.name} and {outputs[job.out].name} would both write {job.out.name}"
        outputs[job.out] = image
        jobs.append(job)
    return jobs


# --------------------------------------------------------------------------------- inpaint
def _pipeline(args, files: hub.WeightFiles):
    """Load the pipeline (imports torch) on the requested device and dtype."""
    import torch

    from moebius.pipeline import InpaintPipeline

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = InpaintPipeline.from_files(files, model=args.model)
    pipe.to(device, getattr(torch, args.dtype))
    logger.info("loaded %s on %s (%s); native size %d px", files.unet_weights, device,
                args.dtype, pipe.native_size)  # fmt: skip
    return pipe


def _inpaint_one(pipe, job: Job, args) -> None:
    """Load, inpaint and atomically save one image; raises on any problem with this file."""
    import torch

    from moebius.images import load_image, save_image_atomic

    image, mask = load_image(job.image), load_image(job.mask)
    options = {key: getattr(args, name) for name, key in PIPELINE_OPTIONS.items()}
    result = pipe(
        image, mask, **{key: value for key, value in options.items() if value is not None},
        invert_mask=args.invert_mask, resize_mask=args.resize_mask, paste=not args.no_paste,
        compensate=args.compensate, generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    job.out.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(result, job.out, drop_alpha=True)  # JPEG: warn, write without alpha


def cmd_inpaint(args) -> int:
    jobs = plan_jobs(Path(args.image), Path(args.mask), Path(args.output))
    todo = [j for j in jobs if j.error or args.overwrite or not j.out.exists()]
    if len(todo) < len(jobs):
        logger.info("skipping %d image(s) whose output exists (--overwrite to redo them)",
                    len(jobs) - len(todo))  # fmt: skip
    failures = [j for j in todo if j.error]
    runnable = [j for j in todo if not j.error]
    if runnable:
        files = hub.resolve(args.weights, args.variant, model=args.model or options.DEFAULT_MODEL,
                            cache_dir=args.cache_dir)  # fmt: skip
        pipe = _pipeline(args, files)
        from tqdm.auto import tqdm

        folder = len(jobs) > 1 or Path(args.image).is_dir()
        pipe.set_progress_bar_config(disable=args.quiet or folder, leave=False)
        for job in tqdm(runnable, desc="inpaint", unit="image", disable=args.quiet or not folder):
            try:
                _inpaint_one(pipe, job, args)
            except Exception as err:  # one bad file must not stop the others
                logger.debug("failure on %s", job.image, exc_info=True)
                job.error = f"{type(err).__name__}: {err}"
                failures.append(job)
    for job in failures:
        logger.error("failed: %s: %s", job.image, job.error)
    done = len(runnable) - len([j for j in failures if j in runnable])
    logger.info("%d done, %d skipped, %d failed", done, len(jobs) - len(todo), len(failures))
    return 1 if failures else 0


# ----------------------------------------------------------------------------- download, convert
def cmd_download(args) -> int:
    variants = options.VARIANTS if args.variant == "all" else (args.variant,)
    for variant in variants:
        files = hub.download(variant, model=args.model, cache_dir=args.cache_dir)
        print(f"{args.model} {variant}: {files.unet_weights}\nvae: {files.vae_dir}")
    return 0


def _original_config(path: Path | None, model: str):
    """Architecture for a released .bin: the original config JSON (optionally under "config")."""
    import json

    from moebius.models.checkpoints import released_config

    if path is None:
        return released_config(model)
    data = json.loads(path.read_text())
    num_embeddings = data.get("num_embeddings", 20)
    data = data.get("config", data)
    if model == options.DEFAULT_MODEL:
        from moebius.models import MoebiusConfig

        return MoebiusConfig.from_original(data, num_embeddings=num_embeddings)
    from moebius.models.teacher import PixelHackerConfig

    return PixelHackerConfig.from_original(data, num_embeddings=num_embeddings)


def cmd_convert(args) -> int:
    from moebius.models import checkpoints

    out = Path(args.out_dir)
    config = _original_config(Path(args.config) if args.config else None, args.model)
    checkpoints.convert_original(args.bin, config, out / hub.UNET_FOLDER)
    if args.vae:
        from moebius.vae import load_vae

        load_vae(args.vae).save_pretrained(out / hub.VAE_FOLDER, safe_serialization=True)
    else:
        logger.info("wrote %s only; add --vae DIR to make %s a complete weights folder",
                    out / hub.UNET_FOLDER, out)  # fmt: skip
    print(out)
    return 0


# --------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moebius", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inpaint", help="fill the white part of a mask (file or folder)",
                       description="Fill the white (255) part of MASK in IMAGE. Folder mode: "
                       "IMG_DIR MASK_DIR -o OUT_DIR pairs NAME.ext with MASK_DIR/NAME_mask.png "
                       "or MASK_DIR/NAME.png by name (MASK may also be one file for all images) "
                       "and writes OUT_DIR/NAME.png.")  # fmt: skip
    p.add_argument("image", help="image file or folder")
    p.add_argument("mask", help="mask file (white = fill) or folder of masks")
    p.add_argument("-o", "--output", required=True, help="output file or folder")
    p.add_argument("--weights", help="weights folder or hub repo (default: the --model repo)")
    p.add_argument("--model", choices=options.MODELS, default=None,
                   help="the student (default) or its pixelhacker teacher")  # fmt: skip
    p.add_argument("--variant", choices=options.VARIANTS, default=options.DEFAULT_VARIANT)
    p.add_argument("--cache-dir", help="Hugging Face cache folder (default: HF_HOME's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=options.DTYPES, default="float32")
    p.add_argument("--seed", type=int, default=0, help="noise seed, the same for every image")
    # Recipe options left unset take the pipeline's defaults, which are the original's.
    p.add_argument("--steps", type=int, help="DDIM steps of the schedule")
    p.add_argument("--strength", type=float, help="share of the schedule that runs")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--noise-offset", type=float, help="std of the per-channel noise offset")
    p.add_argument("--strategy", choices=options.STRATEGIES,
                   help="auto (crop unless native size), crop, resize or native")  # fmt: skip
    p.add_argument("--margin", type=int, help="context pixels around a crop region")
    p.add_argument("--dilate", type=int, help="grow the mask by this many pixels")
    p.add_argument("--invert-mask", action="store_true", help="black = fill instead of white")
    p.add_argument("--resize-mask", action="store_true", help="stretch a mask of another size")
    p.add_argument("--no-paste", action="store_true", help="keep the raw generated window")
    p.add_argument("--compensate", action="store_true", help="colour-match the fill to its ring")
    p.add_argument("--task", choices=options.TASKS,
                   help="remove (fill with background, default) or object")  # fmt: skip
    p.add_argument("--batch-size", type=int, help="native-size windows per model batch")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that exist")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("download", help="fetch released weights into the Hugging Face cache")
    p.add_argument("--model", choices=options.MODELS, default=options.DEFAULT_MODEL)
    p.add_argument("--variant", choices=(*options.VARIANTS, "all"), default=options.DEFAULT_VARIANT)
    p.add_argument("--cache-dir")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert", help="released .bin -> our folder (unet/ [+ vae/])")
    p.add_argument("bin", help="released diffusion_pytorch_model.bin")
    p.add_argument("out_dir")
    p.add_argument("--model", choices=options.MODELS, default=options.DEFAULT_MODEL)
    p.add_argument("--config", help="original config JSON (default: the released architecture)")
    p.add_argument("--vae", help="VAE folder to include, e.g. the released vae/")
    p.set_defaults(func=cmd_convert)

    # `train` and `data` parse their own arguments in moebius.train.cli, imported only when used
    for name, text in (("train", "train a student (moebius train -h)"),
                       ("data", "training data tools (moebius data -h)")):  # fmt: skip
        p = sub.add_parser(name, help=text, add_help=False, prefix_chars="\0")
        p.add_argument("argv", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args, name=name: _train_cli(name, args.argv))

    from moebius.server import cli as server_cli  # `serve`: imports nothing heavy here

    server_cli.add_parser(sub)

    from moebius.export import cli as export_cli  # torch-free until it runs

    export_cli.add_parser(sub)
    return parser


def _train_cli(command: str, argv: list[str]) -> int:
    from moebius.train.cli import main as train_main  # imports torch

    return train_main([command, *argv])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moebius` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version (0) or a bad option (2): argparse has printed
        return done.code
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="moebius: %(message)s")  # fmt: skip
    try:
        return args.func(args)
    except (UsageError, hub.WeightsNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
