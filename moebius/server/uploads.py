"""Uploaded bytes -> PIL images and back, with every refusal as an `ApiError` (status + message).

Sizes are checked from the image header before any pixel is decoded, so a small file that claims
30000 x 30000 pixels (a decompression bomb) costs nothing: `Image.open` only parses the header.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from moebius.server.middleware import ApiError

MIN_SIDE = 8  # px: one latent pixel of the VAE; smaller images hold nothing to inpaint from
JPEG_QUALITY = 95
# output_format -> (PIL format, media type)
FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}
_FORMAT_OF_PIL = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp"}


def decode_image(data: bytes, name: str, max_pixels: int) -> tuple[Image.Image, str]:
    """Decode one upload (EXIF orientation applied) -> (image, its output_format name).

    Refusals: 415 not an image, 413 more pixels than `max_pixels`, 400 truncated or too small.
    """
    if not data:
        raise ApiError(400, "empty upload", f"{name} is empty; send the image file's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check below
            image = Image.open(io.BytesIO(data))  # parses the header only
    except Image.DecompressionBombError as err:
        raise _too_many_pixels(name, str(err), max_pixels) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ApiError(
            415, "not an image", f"{name} is not an image PIL can read (send PNG, JPEG or WebP)"
        ) from err
    width, height = image.size
    if width * height > max_pixels:
        raise _too_many_pixels(name, f"its header says {width}x{height}", max_pixels)
    if min(width, height) < MIN_SIDE:
        raise ApiError(
            400,
            "image too small",
            f"{name} is {width}x{height}; both sides must be at least {MIN_SIDE} px",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()  # decode now: a truncated file fails here
            upright = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ApiError(
            400, "corrupt image", f"{name} could not be decoded ({err}); it is truncated or damaged"
        ) from err
    return upright, _FORMAT_OF_PIL.get(image.format or "", "png")


def _too_many_pixels(name: str, what: str, max_pixels: int) -> ApiError:
    return ApiError(
        413,
        "image too large",
        f"{name}: {what}, more than the server's limit of {max_pixels} pixels (--max-pixels); "
        "downscale it first",
    )


def decode_base64(text: str, name: str) -> bytes:
    """Base64 text, with or without a `data:image/...;base64,` prefix -> bytes; 400 if invalid."""
    if not isinstance(text, str) or not text:
        raise ApiError(400, "missing field", f"{name} must be a non-empty base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, "bad base64", f"{name} is not valid base64 ({err})") from err


def check_pair(image: Image.Image, mask: Image.Image) -> None:
    """The mask must have the image's size (after EXIF orientation); 400 otherwise."""
    if image.size != mask.size:
        raise ApiError(
            400,
            "mask size mismatch",
            f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x{image.size[1]} "
            "(W x H); send a mask of the image's size (white = fill)",
        )


def encode_image(image: Image.Image, output_format: str) -> tuple[bytes, str]:
    """PIL image -> (bytes, media type); JPEG cannot hold alpha, which is a 400."""
    pil_format, media_type = FORMATS[output_format]
    if pil_format == "JPEG" and image.mode in ("RGBA", "LA"):
        raise ApiError(
            400,
            "format cannot hold alpha",
            f"the result is {image.mode} but JPEG has no alpha channel; ask for png or webp",
        )
    buffer = io.BytesIO()
    kwargs = {"quality": JPEG_QUALITY} if pil_format == "JPEG" else {}
    kwargs = {"lossless": True} if pil_format == "WEBP" else kwargs
    image.save(buffer, format=pil_format, **kwargs)
    return buffer.getvalue(), media_type
