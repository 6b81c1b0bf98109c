"""Image I/O for the pipeline: load (EXIF, modes, bit depth), 8-bit RGB for the model and back,
PIL <-> tensor conversions that match the original recipe bit for bit, and atomic saving.

The model sees 8-bit RGB only. `to_rgb` converts any PIL mode and records what it dropped in an
`ImageInfo`; `restore` puts the result back into the input's mode where the output can hold it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from moebius.errors import MoebiusError
from moebius.options import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)

# Modes that carry an alpha channel we keep aside and re-attach untouched.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# High-bit-depth greyscale modes -> bits per pixel; scaled to 0..255 on input (`gray_to_8bit`).
HIGH_BIT_DEPTH = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 32, "F": 32}
# Formats that cannot store an alpha channel (PIL names, as in `Image.registered_extensions()`).
NO_ALPHA_FORMATS = ("JPEG", "JPEG2000", "MPO")


class ImageError(MoebiusError, ValueError):
    """An image file cannot be read or written; the message names the file and what to do."""


class ImageTooLargeError(ImageError):
    """A valid image file with more pixels than the limit allows (refused before decoding)."""


# PIL's own decompression-bomb check warns above 89 MP and refuses above 179 MP; `load_image`
# applies `max_pixels` instead, so it switches PIL's off while it opens and decodes a file.
_PIL_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ImageInfo:
    """What `to_rgb` changed about an input, so that `restore` can undo it."""

    mode: str  # the input's PIL mode, e.g. "RGBA", "L", "P", "I;16"
    size: tuple[int, int]  # (W, H)
    alpha: Image.Image | None = None  # the input's alpha channel ('L'), None when it had none
    bit_depth: int = 8  # bits per channel of the input: 1, 8, 16 or 32

    @property
    def grayscale(self) -> bool:
        """True for single-channel inputs (1, L, LA, I;16, I, F)."""
        return self.mode in ("1", "L", "LA", "La", *HIGH_BIT_DEPTH)


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file, upright (EXIF orientation applied); else ImageError.

    An image of more than `max_pixels` pixels (None: no limit) raises ImageTooLargeError from
    its header, before any decoding. 16-bit RGB(A) files are read as 8 bits per channel (PIL keeps
    the high byte; the model works in 8 bits), with a warning; 16-bit greyscale stays 16-bit here
    (see `gray_to_8bit`).
    """
    path = Path(path)
    try:
        # Leaving the `with Image.open` block closes the file and keeps the pixels.
        with _PIL_LIMIT_LOCK, _pil_limit(None), Image.open(path) as image:
            _check_pixels(path, image.size, max_pixels)
            if image.mode in ("RGB", "RGBA") and ";16" in _rawmode(image):  # PNG, TIFF
                logger.warning("%s: 16-bit %s is read as 8 bits per channel (the model works in "
                               "8 bits); the result is 8-bit", path.name, image.mode)  # fmt: skip
            image.load()  # decode now: truncated files fail here, not later in the pipeline
        ImageOps.exif_transpose(image, in_place=True)  # no copy of a 12000 x 12000 photo
        return image
    except BaseException as err:
        if isinstance(err, FileNotFoundError):
            raise ImageError(f"image file {str(path)!r} does not exist; check the path") from err
        if isinstance(err, IsADirectoryError):
            raise ImageError(f"{str(path)!r} is a folder, not an image file") from err
        if isinstance(err, (UnidentifiedImageError, OSError, SyntaxError)):
            raise ImageError(
                f"cannot read image file {str(path)!r} ({type(err).__name__}: {err}); it is "
                "corrupt, truncated or not an image: re-export it as PNG or JPEG"
            ) from err
        raise


@contextlib.contextmanager
def _pil_limit(limit: int | None):
    """PIL's decompression-bomb limit set to `limit` inside the block, restored after it."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _rawmode(image: Image.Image) -> str:
    """How the file stores pixels, e.g. 'RGB;16B' for a 16-bit PNG ('' when PIL does not say)."""
    tile = image.tile[0] if image.tile else None
    args = getattr(tile, "args", None) if tile is not None else None
    return args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str) else "")


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise ImageTooLargeError(
            f"{str(path)!r} is too large ({size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, "
            f"more than the limit of {max_pixels:,}); the file is not corrupt. Raise the limit "
            "(--max-pixels N, or load_image(path, max_pixels=N)) if this machine has the memory"
        )


def gray_to_8bit(image: Image.Image) -> Image.Image:
    """High-bit-depth greyscale -> 'L', scaling the type's full range onto 0..255 (rounded).

    I;16* and I are read as 16-bit data (0..65535 -> /257; PIL opens 16-bit PNG/TIFF greyscale as
    I;16 or I), F as floats in [0, 1] (x255). Values outside the range are clipped. PIL's own
    `convert("L")` would clip instead of scale, turning most 16-bit photos white.
    """
    values = np.asarray(image).astype(np.float64)
    scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8))


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The alpha channel of `image` as 'L', or None (P images with a transparent index included)."""
    if image.mode in _ALPHA_MODES:
        return image.getchannel("A") if image.mode not in ("RGBa", "La") else image.getchannel("a")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def to_rgb(image: Image.Image) -> tuple[Image.Image, ImageInfo]:
    """Any PIL image -> (8-bit RGB for the model, ImageInfo to `restore` the input's mode).

    Alpha (RGBA, LA, PA, P with transparency) is set aside, not composited: the RGB values under
    transparent pixels are used as they are. CMYK/YCbCr/LAB/HSV use PIL's conversion (no ICC
    colour management). 16-bit and 32-bit greyscale are scaled to 8 bits (see `gray_to_8bit`).
    """
    mode = image.mode
    bit_depth = {"1": 1, **HIGH_BIT_DEPTH}.get(mode, 8)
    info = ImageInfo(mode=mode, size=image.size, alpha=alpha_channel(image), bit_depth=bit_depth)
    if mode == "RGB":
        return image.copy(), info
    if mode in HIGH_BIT_DEPTH:
        return gray_to_8bit(image).convert("RGB"), info
    if mode == "P" and info.alpha is not None:
        return image.convert("RGBA").convert("RGB"), info
    if mode in ("RGBa", "La"):  # premultiplied alpha: undo it first
        image = image.convert("RGBA" if mode == "RGBa" else "LA")
    try:
        return image.convert("RGB"), info
    except ValueError as err:
        raise ImageError(
            f"cannot convert PIL mode {mode!r} to RGB ({err}); convert the image to RGB first"
        ) from err


def restore(result_rgb: Image.Image, info: ImageInfo) -> Image.Image:
    """The model's RGB result -> the input's mode where an output file can hold it.

    Takes ownership of `result_rgb`: an RGB(A) output is `result_rgb` itself (alpha attached in
    place), so a 12000 x 12000 result is not copied once more.

    Rules (input mode -> output mode):
      RGB -> RGB; RGBA / RGBa / P with transparency -> RGBA and LA / La / PA -> LA (RGBA for PA),
      each with the input's alpha channel re-attached untouched; L and 1 -> L (ITU-R 601 luma of
      the result; 1 becomes L because a 1-bit image cannot hold the fill's grey levels);
      16-bit / 32-bit greyscale (I;16*, I, F) -> L, 8-bit: the model works in 8 bits, so writing
      16 bits back would only pretend to a precision the fill does not have;
      P without transparency, CMYK, YCbCr, LAB, HSV -> RGB (the fill's colours do not fit a palette,
      and RGB is what PNG/JPEG viewers expect).
    """
    if result_rgb.mode != "RGB" or result_rgb.size != info.size:
        raise ValueError(
            f"restore expects an RGB image of size {info.size}, got mode {result_rgb.mode!r} "
            f"size {result_rgb.size}; pass the pipeline's output for this input"
        )
    if info.grayscale:
        out = result_rgb.convert("L")
        if info.alpha is not None:
            out.putalpha(info.alpha)  # L -> LA
        return out
    if info.alpha is not None:
        result_rgb.putalpha(info.alpha)  # RGB -> RGBA, in place
    return result_rgb


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> [B, 3, H, W] float32 in [-1, 1], bit-exact with the original recipe.

    `x / 255. * 2 - 1` is computed by numpy in float64 and cast to float32 last. The batch is
    contiguous NCHW, as the original's (a torch.cat of its images): the VAE's convolutions round
    differently on a channels_last input, by up to 3e-4 in the latents.
    """
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"to_tensor expects uint8 [B, H, W, 3], got {pixels.dtype} {pixels.shape}")
    values = pixels / 255.0 * 2 - 1  # (B, H, W, 3) float64
    return torch.from_numpy(values).permute(0, 3, 1, 2).to(torch.float32).contiguous()


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> [1, 3, H, W] float32 in [-1, 1] (see `to_tensor`)."""
    if img.mode != "RGB":
        raise ValueError(f"pil_to_tensor expects an RGB image, got mode {img.mode!r}; use to_rgb")
    return to_tensor(np.asarray(img)[None])


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8: clamp, x255 in the tensor's dtype, truncate."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"tensor_to_uint8 expects [B, 3, H, W], got {tuple(images.shape)}")
    scaled = images.detach().cpu().permute(0, 2, 3, 1).clamp(0, 1) * 255  # (B, H, W, 3)
    return scaled.numpy().astype(np.uint8)  # truncation, no rounding, as the original


def _format_for(path: Path, save_kwargs: dict) -> str:
    """PIL format name for `path`: the `format` keyword if given, else from the extension."""
    if save_kwargs.get("format"):
        return str(save_kwargs["format"]).upper()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageError(
            f"cannot tell the image format of {str(path)!r} from its extension "
            f"{path.suffix!r}; use .png (lossless, keeps alpha), .jpg or .webp"
        )
    return fmt


def save_image_atomic(
    image: Image.Image, path: str | os.PathLike, *, drop_alpha: bool = False, **save_kwargs
) -> None:
    """Write `image` to `path` via a temporary file in the same folder and `os.replace`.

    A crash or a failed encode never leaves a partial file at `path`. The format comes from the
    extension (or `format=`). An image with alpha (RGBA, LA, PA) to a format without alpha (JPEG)
    raises ImageError suggesting .png, rather than silently dropping the alpha; `drop_alpha=True`
    drops it with a logged warning instead (RGB or L is written). A new file gets permissions
    0o644, an existing one keeps its.
    """
    path = Path(path)
    save_kwargs = dict(save_kwargs)
    fmt = _format_for(path, save_kwargs)
    save_kwargs["format"] = fmt
    has_alpha = image.mode in _ALPHA_MODES or alpha_channel(image) is not None
    if fmt in NO_ALPHA_FORMATS and has_alpha and drop_alpha:
        logger.warning("%s: %s has no alpha channel; the alpha is dropped (write .png to keep it)",
                       path.name, fmt)  # fmt: skip
        image = image.convert("L" if image.mode in ("LA", "La") else "RGB")
    elif fmt in NO_ALPHA_FORMATS and has_alpha:
        raise ImageError(
            f"cannot save mode {image.mode!r} (with alpha) as {fmt} to {str(path)!r}: {fmt} has "
            "no alpha channel; save as .png to keep it, or convert the image to RGB first"
        )
    if not path.parent.is_dir():
        raise ImageError(f"folder {str(path.parent)!r} for {path.name!r} does not exist; create it")
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, **save_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (OSError, KeyError, ValueError)) and not isinstance(err, ImageError):
            raise ImageError(
                f"cannot save mode {image.mode!r} as {fmt} to {str(path)!r} "
                f"({type(err).__name__}: {err}); try .png, or convert the image to RGB"
            ) from err
        raise
