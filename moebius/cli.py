"""The `moebius` command: `inpaint` (a file or a folder), `download` (fill the cache), `convert`.

Start-up stays light and fails early: options are checked (moebius.options), inputs paired and
outputs checked against them (moebius.jobs) and the output folder tested for writing before
torch is imported; the device is checked before the weights are located (moebius.hub, no torch),
and the weights are located before they are loaded. Exit status: 0 done, 1 some files failed
(each reported, the rest finished), 2 the command could not start (bad option, an output over an
input, no weights, unreadable weights), 130 interrupted (Ctrl-C or SIGTERM; finished files stay,
a rerun does the rest). Errors are one line on stderr; `--debug` or MOEBIUS_DEBUG=1 adds the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from moebius import __version__, hub, options
from moebius.errors import MoebiusError, UsageError
from moebius.export import cli as export_cli  # torch-free: the export and inpaint options
from moebius.jobs import Job, check_writable, plan_jobs

logger = logging.getLogger("moebius")

# CLI option -> pipeline keyword. Options left unset (None) take the pipeline's defaults, which
# are the original recipe's: the numbers live there only.
PIPELINE_OPTIONS = {
    "steps": "steps", "strength": "strength", "guidance": "guidance_scale",
    "noise_offset": "noise_offset", "strategy": "strategy", "margin": "margin",
    "dilate": "mask_dilation", "task": "task", "batch_size": "batch_size",
}  # fmt: skip
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# ------------------------------------------------------------------------------- up-front checks
def check_options(args) -> None:
    """Every inpaint option, before any file is read (UsageError naming the flag)."""
    values = {key: getattr(args, dest) for dest, key in PIPELINE_OPTIONS.items()}
    names = {key: _flag(dest) for dest, key in PIPELINE_OPTIONS.items()}
    names.update(device="--device", max_pixels="--max-pixels")
    try:
        options.validate(names, **values, device=args.device, max_pixels=args.max_pixels)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if getattr(args, "compile", False) and not getattr(args, "fast", False):
        raise UsageError("--compile compiles the optimised UNet: add --fast")


def select_device(device: str, dtype: str) -> str:
    """The device to run on ("auto" resolved), or UsageError if it is absent or lacks `dtype`."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")  # fmt: skip
            raise UsageError(f"--device {device}: {why} (torch {torch.__version__}); use --device "
                             "cpu, or auto to take a GPU only when there is one")  # fmt: skip
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise UsageError(f"--device {device}: {count} GPU(s) here, cuda:0..cuda:{count - 1}")
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise UsageError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not "
                             "support it; use --dtype float16 or float32")  # fmt: skip
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: Apple's MPS is not available here; use --device cpu")
    return device


def check_recipe(args) -> None:
    """Combinations of recipe options (e.g. --strength so small that no step runs)."""
    from moebius.recipe import Recipe

    given = {key: getattr(args, dest) for dest, key in PIPELINE_OPTIONS.items()}
    fields = ("steps", "strength", "guidance_scale", "noise_offset", "task")
    try:
        Recipe(**{k: given[k] for k in fields if given[k] is not None})
    except ValueError as err:
        raise UsageError(str(err)) from err


# --------------------------------------------------------------------------------- inpaint
def _load_pipeline(args, files: hub.WeightFiles, device: str):
    """Load the pipeline on `device` / --dtype; any load failure becomes one line naming files."""
    import torch

    from moebius.pipeline import InpaintPipeline

    try:
        pipe = InpaintPipeline.from_files(files, model=args.model)
    except MoebiusError:
        raise
    except (ValueError, OSError, RuntimeError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MoebiusError(
            f"cannot load the weights ({files.unet_weights}, {files.vae_dir}): {first}. "
            "Rerun with --debug for details"
        ) from err
    dtype = getattr(torch, args.dtype)
    if getattr(args, "fast", False):  # fold and fuse in float32 first, then cast
        pipe.to(device).optimize(dtype, compile=getattr(args, "compile", False))
        pipe.vae.to(dtype=dtype)
    else:
        pipe.to(device, dtype)
    logger.info("loaded %s on %s (%s); native size %d px", files.unet_weights, device,
                args.dtype, pipe.native_size)  # fmt: skip
    return pipe


def _inpaint_one(pipe, job: Job, args) -> None:
    """Load, inpaint and atomically save one image; raises on any problem with this file."""
    import torch

    from moebius.images import load_image, save_image_atomic

    image = load_image(job.image, max_pixels=args.max_pixels)
    mask = load_image(job.mask, max_pixels=args.max_pixels)
    options_ = {key: getattr(args, name) for name, key in PIPELINE_OPTIONS.items()}
    result = pipe(
        image, mask, **{key: value for key, value in options_.items() if value is not None},
        invert_mask=args.invert_mask, resize_mask=args.resize_mask, paste=not args.no_paste,
        compensate=args.compensate, generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    job.out.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(result, job.out, drop_alpha=True)  # JPEG: warn, write without alpha


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends the run like Ctrl-C (KeyboardInterrupt): the current file is abandoned
    without a partial output, the summary is printed, the exit status is 130."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # main() called from a thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_inpaint(args) -> int:
    check_options(args)
    export_cli.check_inpaint_options(args)
    jobs = plan_jobs(Path(args.image), Path(args.mask), Path(args.output), args.suffix)
    todo = [j for j in jobs if j.error or args.overwrite or not j.out.exists()]
    skipped = len(jobs) - len(todo)
    if skipped:
        logger.info("skipping %d image(s) whose output exists (--overwrite to redo them)", skipped)
    failures = [j for j in todo if j.error]
    runnable = [j for j in todo if not j.error]
    done: list[Job] = []
    if runnable:
        check_writable(runnable)
        # A folder or the cache answers without torch; a download waits for the checks below.
        files = None
        if not export_cli.uses_onnxruntime(args):  # else --weights is an ONNX export folder
            files = hub.resolve_without_download(**_weights(args))
        device = select_device(args.device, args.dtype)
        check_recipe(args)
    try:
        if runnable:
            _run(args, files, runnable, device, done, failures)
    except KeyboardInterrupt:
        left = len(runnable) - len(done) - len([j for j in failures if j in runnable])
        _report(failures)
        logger.error("interrupted: %d done, %d skipped, %d failed, %d not done. Run the same "
                     "command again to do the rest: finished outputs are skipped",
                     len(done), skipped, len(failures), left)  # fmt: skip
        return EXIT_INTERRUPTED
    _report(failures)
    logger.info("%d done, %d skipped, %d failed", len(done), skipped, len(failures))
    return 1 if failures else 0


def _weights(args) -> dict:
    """Where the weights are: `hub.resolve` keywords from the options."""
    return dict(pretrained=args.weights, variant=args.variant, cache_dir=args.cache_dir,
                model=args.model or options.DEFAULT_MODEL)  # fmt: skip


def _run(args, files, runnable: list[Job], device: str, done: list[Job], failures: list[Job]):
    """Load the weights (download them if `files` is None) and inpaint each job; `done` and
    `failures` grow as files finish."""
    if export_cli.uses_onnxruntime(args):
        pipe = export_cli.load_onnxruntime_pipeline(args, device)
    else:
        files = files or hub.resolve(**_weights(args))
        pipe = _load_pipeline(args, files, device)
    export_cli.apply_decoder(pipe, args)  # --decoder tiny
    from tqdm.auto import tqdm

    folder = len(runnable) > 1 or Path(args.image).is_dir()
    pipe.set_progress_bar_config(disable=args.quiet or folder, leave=False)
    with tqdm(runnable, desc="inpaint", unit="image", disable=args.quiet or not folder) as bar:
        for job in bar:
            try:
                _inpaint_one(pipe, job, args)
            except Exception as err:  # one bad file must not stop the others
                if _debug(args):
                    logger.exception("failure on %s", job.image)
                job.error = str(err) if isinstance(err, MoebiusError) else _one_line(err)
                failures.append(job)
            else:
                done.append(job)


def _report(failures: list[Job]) -> None:
    for job in failures:
        logger.error("failed: %s: %s", job.image, job.error)


# --------------------------------------------------------------------------------- download
def cmd_download(args) -> int:
    variants = options.VARIANTS if args.variant == "all" else (args.variant,)
    for variant in variants:
        files = hub.download(variant, model=args.model, cache_dir=args.cache_dir)
        print(f"{args.model} {variant}: {files.unet_weights}\nvae: {files.vae_dir}")
    return 0


# --------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moebius", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of errors (also MOEBIUS_DEBUG=1)")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inpaint", help="fill the white part of a mask (file or folder)",
                       description="Fill the white (255) part of MASK in IMAGE. Folder mode: "
                       "IMG_DIR MASK_DIR -o OUT_DIR pairs NAME.ext with MASK_DIR/NAME_mask.png "
                       "or MASK_DIR/NAME.png by name (MASK may also be one file for all images) "
                       "and writes OUT_DIR/NAME.png. Outputs never replace inputs.")  # fmt: skip
    p.add_argument("image", help="image file or folder")
    p.add_argument("mask", help="mask file (white = fill) or folder of masks")
    p.add_argument("-o", "--output", required=True, help="output file or folder")
    p.add_argument("--suffix", default="", help="name results NAME<SUFFIX>.png, e.g. _inpainted "
                   "(needed to write into the input folder)")  # fmt: skip
    p.add_argument("--weights", help="weights folder or hub repo (default: the --model repo)")
    p.add_argument("--model", choices=options.MODELS, default=None,
                   help="the student (default) or its pixelhacker teacher")  # fmt: skip
    p.add_argument("--variant", choices=options.VARIANTS, default=options.DEFAULT_VARIANT)
    p.add_argument("--cache-dir", help="Hugging Face cache folder (default: HF_HOME's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=options.DTYPES, default="float32")
    p.add_argument("--fast", action="store_true",
                   help="optimised UNet (same outputs); bf16 with --dtype bfloat16")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="with --fast: torch.compile the UNet (GPU; minutes once, cached on "
                   "disk; on CPU the eager fast path is faster)")  # fmt: skip
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
    p.add_argument("--max-pixels", type=int, default=options.DEFAULT_MAX_PIXELS,
                   help="refuse larger images, from the header (default: %(default)s)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="redo outputs that exist")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    export_cli.add_inpaint_options(p)  # --backend, --decoder, --tiny-decoder
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("download", help="fetch released weights into the Hugging Face cache")
    p.add_argument("--model", choices=options.MODELS, default=options.DEFAULT_MODEL)
    p.add_argument("--variant", choices=(*options.VARIANTS, "all"), default=options.DEFAULT_VARIANT)
    p.add_argument("--cache-dir")
    p.set_defaults(func=cmd_download)

    from moebius import convert  # `convert`: imports nothing heavy until it runs

    convert.add_parser(sub)

    # `train` and `data` parse their own arguments in moebius.train.cli, imported only when used
    for name, text in (("train", "train a student (moebius train -h)"),
                       ("data", "training data tools (moebius data -h)")):  # fmt: skip
        p = sub.add_parser(name, help=text, add_help=False, prefix_chars="\0")
        p.add_argument("argv", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args, name=name: _train_cli(name, args.argv))

    from moebius.server import cli as server_cli  # `serve`: imports nothing heavy here

    server_cli.add_parser(sub)

    from moebius.eval import cli as eval_cli  # torch-free until they run

    eval_cli.add_parser(sub)
    export_cli.add_parser(sub)
    for p in sub.choices.values():  # --debug also after the subcommand; SUPPRESS keeps the top's
        if "-" in p.prefix_chars:  # not `train` / `data`, which pass their arguments on
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)  # fmt: skip
    return parser


def _train_cli(command: str, argv: list[str]) -> int:
    from moebius.train.cli import main as train_main  # imports torch

    return train_main([command, *argv])


_nothing = contextlib.nullcontext


def _debug(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("MOEBIUS_DEBUG", "") == "1"


def _one_line(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moebius` command; returns the exit status.

    A `MoebiusError` or `ValueError` (what the user can fix) is printed as one line, exit 2;
    Ctrl-C exits 130; anything else is a bug, printed as one line asking for --debug (which shows
    the traceback).
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version (0) or a bad option (2): argparse has printed
        return done.code
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="moebius: %(message)s")  # fmt: skip
    try:
        with _sigterm_as_interrupt() if args.command in ("inpaint", "convert") else _nothing():
            return args.func(args)
    except KeyboardInterrupt:  # inpaint reports its own once files are being written
        print("moebius: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MoebiusError, ValueError) as err:  # a ValueError from a command: a bad argument
        if _debug(args):
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except Exception as err:
        if _debug(args):
            raise
        print(f"error: {_one_line(err)}. This is unexpected: rerun with --debug (or "
              "MOEBIUS_DEBUG=1) for the traceback, and report it", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
