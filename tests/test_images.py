"""moebius.images: loading (EXIF, corrupt files), mode round trips, exact tensors, atomic saves."""

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

from moebius import images
from moebius.images import (
    ImageError,
    load_image,
    pil_to_tensor,
    restore,
    save_image_atomic,
    tensor_to_uint8,
    to_rgb,
)

VECTOR = ("reference", "pipeline_vector")


def _gradient_rgb(w=6, h=4) -> Image.Image:
    """Distinct colour per pixel, so any transposition or channel swap shows."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 40, y * 60, (x + y) * 10 + 5], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


# ---- loading ---------------------------------------------------------------------------------


def test_load_image_applies_exif_orientation(tmp_path):
    stored = _gradient_rgb(w=6, h=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "sideways.png"
    stored.save(path, exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (4, 6)
    # after a clockwise quarter turn the stored top-left pixel is the displayed top-right one
    assert loaded.getpixel((3, 0)) == stored.getpixel((0, 0))
    assert loaded.getpixel((0, 5)) == stored.getpixel((5, 3))
    assert loaded.getexif().get(0x0112, 1) == 1  # orientation consumed, not applied twice later


def test_load_image_reads_a_real_photo():
    image = load_image(shared_path("data", "photos", "skimage_chelsea.png"))
    assert image.size == (451, 300) and image.mode == "RGB"


@pytest.mark.parametrize("content", [b"not an image at all", b""])
def test_load_image_corrupt_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken_photo.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="broken_photo.png") as info:
        load_image(path)
    assert isinstance(info.value, ValueError)
    assert "PNG or JPEG" in str(info.value)


def test_load_image_truncated_jpeg(tmp_path):
    data = shared_path("data", "photos", "skimage_rocket.jpg").read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="half.jpg"):
        load_image(path)


def test_load_image_missing_file(tmp_path):
    with pytest.raises(ImageError, match="nowhere.png.*does not exist"):
        load_image(tmp_path / "nowhere.png")


# ---- modes -----------------------------------------------------------------------------------


def test_rgba_round_trip_keeps_alpha_untouched():
    rgb = _gradient_rgb()
    alpha = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(4, 6) * 10)
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    model_in, info = to_rgb(rgba)
    assert model_in.mode == "RGB" and np.array_equal(np.asarray(model_in), np.asarray(rgb))
    filled = 255 - np.asarray(model_in)  # stand-in for the model's output
    out = restore(Image.fromarray(filled), info)
    assert out.mode == "RGBA"
    assert np.array_equal(np.asarray(out)[..., 3], np.asarray(alpha))
    assert np.array_equal(np.asarray(out)[..., :3], filled)


def test_l_stays_l_and_la_keeps_alpha():
    gray = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(4, 6) * 9)
    model_in, info = to_rgb(gray)
    assert model_in.mode == "RGB"
    assert np.array_equal(np.asarray(model_in)[..., 1], np.asarray(gray))
    out = restore(model_in, info)
    assert out.mode == "L" and np.array_equal(np.asarray(out), np.asarray(gray))

    la = Image.merge("LA", (gray, gray.point(lambda v: 255 - v)))
    model_in, info = to_rgb(la)
    out = restore(model_in, info)
    assert out.mode == "LA" and np.array_equal(np.asarray(out), np.asarray(la))


def test_palette_with_and_without_transparency():
    palette_image = _gradient_rgb().quantize(colors=8)
    model_in, info = to_rgb(palette_image)
    assert info.alpha is None and restore(model_in, info).mode == "RGB"
    assert np.array_equal(np.asarray(model_in), np.asarray(palette_image.convert("RGB")))

    transparent = palette_image.copy()
    transparent.info["transparency"] = 0  # palette index 0 is see-through
    model_in, info = to_rgb(transparent)
    out = restore(model_in, info)
    assert out.mode == "RGBA"
    expected_alpha = np.where(np.asarray(transparent) == 0, 0, 255)
    assert np.array_equal(np.asarray(out)[..., 3], expected_alpha)


def test_cmyk_becomes_rgb():
    cmyk = _gradient_rgb().convert("CMYK")
    model_in, info = to_rgb(cmyk)
    assert info.mode == "CMYK" and model_in.mode == "RGB"
    assert np.array_equal(np.asarray(model_in), np.asarray(cmyk.convert("RGB")))
    assert restore(model_in, info).mode == "RGB"


def test_16_bit_gray_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    image16 = Image.fromarray(values)
    assert image16.mode == "I;16"
    model_in, info = to_rgb(image16)
    assert info.bit_depth == 16
    assert np.array_equal(np.asarray(model_in)[0, :, 0], [0, 1, 128, 255])
    out = restore(model_in, info)
    assert out.mode == "L" and np.array_equal(np.asarray(out)[0], [0, 1, 128, 255])

    as_int32 = Image.fromarray(values.astype(np.int32))  # mode I, as some 16-bit PNGs open
    assert np.array_equal(np.asarray(to_rgb(as_int32)[0])[0, :, 2], [0, 1, 128, 255])


def test_float_and_bilevel_images():
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32))
    assert np.array_equal(np.asarray(to_rgb(floats)[0])[0, :, 0], [0, 128, 255, 255])
    bilevel = Image.fromarray(np.array([[True, False]]))
    model_in, info = to_rgb(bilevel)
    assert np.array_equal(np.asarray(model_in)[0, :, 0], [255, 0])
    assert restore(model_in, info).mode == "L"


def test_restore_rejects_wrong_size():
    _, info = to_rgb(_gradient_rgb())
    with pytest.raises(ValueError, match=r"size \(6, 4\)"):
        restore(Image.new("RGB", (5, 5)), info)


# ---- tensors ---------------------------------------------------------------------------------


def test_pil_to_tensor_bit_exact_with_reference():
    from safetensors.numpy import load_file

    trace = load_file(shared_path(*VECTOR, "trace.safetensors"))
    for i in range(2):
        pixels = np.load(shared_path(*VECTOR, f"input_image_{i}.npy"))
        x = pil_to_tensor(Image.fromarray(pixels))
        assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
        assert np.array_equal(x.numpy(), trace["pre.image"][i : i + 1])
        assert x.is_contiguous()  # NCHW, as the batch the original's VAE saw


def test_tensor_to_uint8_truncates_and_matches_reference():
    x = torch.tensor([-0.5, 0.0, 0.999, 0.5, 1.0, 1.7]).reshape(1, 3, 1, 2)
    out = tensor_to_uint8(x)
    assert out.shape == (1, 1, 2, 3) and out.dtype == np.uint8
    # 0.999 * 255 = 254.745 -> 254 (truncation); 0.5 * 255 = 127.5 -> 127
    assert out[0, 0].T.tolist() == [[0, 0], [254, 127], [255, 255]]

    from safetensors.torch import load_file

    trace = load_file(shared_path(*VECTOR, "trace.safetensors"))
    assert np.array_equal(
        tensor_to_uint8(trace["decoded_image_float"]), trace["post.result_uint8"].numpy()
    )


# ---- saving ----------------------------------------------------------------------------------


def test_save_image_atomic_round_trip(tmp_path):
    image = _gradient_rgb()
    image.putalpha(128)
    path = tmp_path / "out.png"
    save_image_atomic(image, path)
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temp file left behind
    assert (path.stat().st_mode & 0o777) == 0o644


def test_save_rgba_as_jpeg_suggests_png(tmp_path):
    image = Image.new("RGBA", (4, 4))
    with pytest.raises(ImageError, match=r"\.png"):
        save_image_atomic(image, tmp_path / "out.jpg")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ImageError, match="extension"):
        save_image_atomic(image, tmp_path / "out.unknownext")


def test_failed_save_leaves_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "keep.png"
    path.write_bytes(b"previous content")

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(images.Image.Image, "save", failing_save)
    with pytest.raises(ImageError, match="disk full"):
        save_image_atomic(Image.new("RGB", (4, 4)), path)
    assert path.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]
