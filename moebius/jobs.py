"""Which files `moebius inpaint` reads and writes: pairing images with masks, naming outputs, and
the checks that make sure an output never touches an input. Imports no torch, numpy or PIL.

File mode:   IMAGE MASK -o OUT (OUT a file, or an existing folder that gets IMAGE's name)
Folder mode: IMG_DIR MASK_DIR|MASK -o OUT_DIR; NAME.ext pairs with MASK_DIR/NAME_mask.<ext> or
             MASK_DIR/NAME.<ext>, never by order; the result is OUT_DIR/NAME<suffix>.png.
An output that is (or is a link to) an input image or mask is refused in both modes, with or
without --overwrite. OUT_DIR equal to IMG_DIR or MASK_DIR is refused unless --suffix gives the
results names of their own; files named *<suffix>.* in the input folder are then earlier results
and never read as inputs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moebius.errors import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"  # NAME.png's mask is MASK_DIR/NAME_mask.png or MASK_DIR/NAME.png
OUTPUT_EXTENSION = ".png"  # folder mode writes PNG: lossless, keeps alpha


@dataclass
class Job:
    """One image to inpaint: where it is, its mask, where the result goes, or why it cannot run."""

    image: Path
    mask: Path | None
    out: Path
    error: str | None = None


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


def same_file(a: Path, b: Path) -> bool:
    """True when `a` and `b` are one file: the same path, a symlink to it, or a hard link."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def check_suffix(suffix: str) -> None:
    if suffix and (os.sep in suffix or "/" in suffix or suffix.startswith(".")):
        raise UsageError(
            f"--suffix {suffix!r} must be a plain name ending such as _inpainted (no folders, "
            "no extension: results are always .png)"
        )


def plan_jobs(image_arg: Path, mask_arg: Path, out_arg: Path, suffix: str = "") -> list[Job]:
    """File mode (IMAGE MASK -o OUT) or folder mode (IMG_DIR MASK_DIR|MASK -o OUT_DIR)."""
    check_suffix(suffix)
    if not image_arg.exists():
        raise UsageError(f"{image_arg} does not exist")
    if not mask_arg.exists():
        raise UsageError(f"mask {mask_arg} does not exist")
    if image_arg.is_file():
        jobs = [_file_job(image_arg, mask_arg, out_arg, suffix)]
    else:
        jobs = _folder_jobs(image_arg, mask_arg, out_arg, suffix)
    refuse_outputs_over_inputs(jobs, mask_arg)
    return jobs


def _file_job(image: Path, mask: Path, out: Path, suffix: str) -> Job:
    if mask.is_dir():
        raise UsageError(f"{image} is a file, so the mask must be a file, not {mask}")
    if out.is_dir():
        return Job(image, mask, out / f"{image.stem}{suffix}{OUTPUT_EXTENSION}")
    if suffix:
        raise UsageError(f"--suffix names results in an output folder; -o {out} names the file")
    if out.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UsageError(
            f"-o {out} has no image extension ({', '.join(IMAGE_EXTENSIONS)}) and is not an "
            "existing folder; name the output file, e.g. result.png"
        )
    return Job(image, mask, out)


def _folder_jobs(image_dir: Path, mask_arg: Path, out_dir: Path, suffix: str) -> list[Job]:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{image_dir} is a folder, so -o must be a folder; {out_dir} is a file")
    input_dirs = [image_dir] + ([mask_arg] if mask_arg.is_dir() else [])
    shared = [d for d in input_dirs if same_file(d, out_dir)]
    if shared and not suffix:
        raise UsageError(
            f"-o {out_dir} is the input folder {shared[0]}: results would sit beside the inputs "
            "(and replace same-named ones) and be read as inputs by the next run. Choose another "
            f"folder, or add --suffix _inpainted to write NAME_inpainted{OUTPUT_EXTENSION} there"
        )
    images = [p for p in sorted(image_dir.iterdir()) if is_image_file(p)]
    if mask_arg.is_dir() and same_file(mask_arg, image_dir):
        images = [p for p in images if not p.stem.endswith(MASK_SUFFIX)]  # masks beside images
    if suffix and same_file(out_dir, image_dir):  # earlier results are never inputs
        images = [p for p in images if not p.stem.endswith(suffix)]
    if not images:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    jobs, outputs = [], {}
    for image in images:
        out = out_dir / f"{image.stem}{suffix}{OUTPUT_EXTENSION}"
        job = Job(image, mask_arg if mask_arg.is_file() else None, out)
        if job.mask is None:
            try:
                job.mask = find_mask(mask_arg, image)
            except LookupError as err:
                job.error = str(err)
        if out in outputs:
            job.error = f"{image.name} and {outputs[out].name} would both write {out.name}"
        outputs[out] = image
        jobs.append(job)
    return jobs


def refuse_outputs_over_inputs(jobs: list[Job], mask_arg: Path) -> None:
    """UsageError naming every output that is an input image or mask of this run."""
    inputs = {job.image: "image" for job in jobs}
    inputs.update({job.mask: "mask" for job in jobs if job.mask is not None})
    if mask_arg.is_file():
        inputs[mask_arg] = "mask"
    clashes = [
        f"{job.out} is the input {kind} {path}"
        for job in jobs
        for path, kind in inputs.items()
        if same_file(job.out, path)
    ]
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise UsageError(
            f"refusing to write over inputs: {'; '.join(clashes[:3])}{more}. Choose another -o "
            "(--overwrite never replaces an input)"
        )


def check_writable(jobs: list[Job]) -> None:
    """UsageError unless each output folder exists and takes a file, or can be created.

    Writes (and removes) a temporary file rather than trusting permission bits, which say
    nothing about read-only mounts or, for root, about anything.
    """
    for folder in sorted({job.out.parent for job in jobs}):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"cannot write into {folder}: {existing} is a file, not a folder")
        try:
            with tempfile.TemporaryFile(dir=existing, prefix=".moebius-write-test-"):
                pass
        except OSError as err:
            where = folder if existing == folder else f"{existing} (to create {folder} in it)"
            raise UsageError(
                f"cannot write results into {where}: {err.strerror or err}; choose another -o "
                "or fix its permissions"
            ) from err
