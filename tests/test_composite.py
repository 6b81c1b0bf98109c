"""moebius.composite: the one paste-back, bit-exact with the original at the native size."""

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from moebius import composite
from moebius.composite import blur_mask, compensate_ring, feather_reach, merge, window_input
from moebius.masks import dilate
from moebius.strategies import Window

VECTOR = ("reference", "pipeline_vector")


def _vector(name):
    return np.load(shared_path(*VECTOR, name))


@pytest.fixture(scope="module")
def trace():
    from safetensors.numpy import load_file

    return load_file(shared_path(*VECTOR, "trace.safetensors"))


def _merged(image, fill, result, window=None, native=None, **options):
    """`merge` into a copy of uint8 `image`; returns the uint8 array."""
    out = Image.fromarray(image)
    native = native or image.shape[0]
    merge(out, fill, window or Window(0, 0, native, native), result, native, **options)
    return np.asarray(out)


# ---- native size: the original's post-processing, bit for bit --------------------------------


@pytest.mark.parametrize("i", [0, 1])
def test_blurred_mask_matches_reference(trace, i):
    soft = blur_mask(_vector(f"input_mask_{i}.npy") > 127, composite.PASTE_BLUR_RADIUS)
    assert soft.dtype == np.float64 and soft.shape == (256, 256)
    reference = trace["post.paste_soft_mask_uint8"][i] / 255  # (256, 256, 3), grey
    assert np.array_equal(np.repeat(soft[..., None], 3, axis=-1), reference)


@pytest.mark.parametrize("i", [0, 1])
def test_paste_bit_exact(trace, i):
    fill = _vector(f"input_mask_{i}.npy") > 127
    out = _merged(_vector(f"input_image_{i}.npy"), fill, trace["post.result_uint8"][i])
    assert np.array_equal(out, _vector(f"output_paste_{i}.npy"))


@pytest.mark.parametrize("i", [0, 1])
def test_paste_compensate_bit_exact(trace, i):
    fill = _vector(f"input_mask_{i}.npy") > 127
    result, image = trace["post.result_uint8"][i], _vector(f"input_image_{i}.npy")
    ring = compensate_ring(fill)
    assert np.array_equal(ring, trace["post.compensate_ring"][i])
    delta = image[ring].mean(axis=0) - result[ring].mean(axis=0)
    assert np.array_equal(delta, trace["post.compensate_delta_mean"][i])
    out = _merged(image, fill, result, compensate=True)
    assert np.array_equal(out, _vector(f"output_paste_compensate_{i}.npy"))


def test_compensate_ring_geometry_and_colour_shift():
    hole = np.zeros((60, 60), bool)
    hole[10:30, 12:34] = True  # rows 10..29 (h 20), cols 12..33 (w 22)
    ring = compensate_ring(hole)
    rows, cols = np.nonzero(ring)
    # centre row 19, height 30 -> rows 4..34; centre col 22, width 32 -> cols 6..38
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 34, 6, 38)
    assert not (ring & hole).any()

    image = np.full((60, 60, 3), 100, np.uint8)
    result = np.full((60, 60, 3), 90, np.uint8)  # generated 10 levels too dark everywhere
    out = _merged(image, hole, result, compensate=True)
    # deep inside the hole soft = 1: 90 + 1.1 * (100 - 90) = 101
    assert out[20, 22].tolist() == [101, 101, 101]
    assert _merged(image, hole, result)[20, 22].tolist() == [90, 90, 90]
    assert np.array_equal(out[:, 45:], image[:, 45:])  # far from the hole: the input


def test_no_paste_is_the_raw_result_and_no_hole_is_no_change():
    rng = np.random.default_rng(0)
    image, result = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    fill = np.zeros((64, 64), bool)
    assert np.array_equal(_merged(image, fill, result), image)  # paste with no hole
    fill[10:20, 10:20] = True
    assert np.array_equal(_merged(image, fill, result, paste=False), result)


# ---- windows at other scales ------------------------------------------------------------------


def test_single_feather_profile_at_a_scaled_window():
    """A constant result merged into a constant image: exactly one blur of the input's mask."""
    image = np.full((300, 400, 3), 40, np.uint8)
    fill = np.zeros((300, 400), bool)
    fill[120:170, 150:260] = True
    window, native = Window(50, 20, 330, 300), 64  # 280 px shown at 64: radius 3 * 280 / 64
    out = _merged(image, fill, np.full((64, 64, 3), 200, np.uint8), window, native)
    soft = blur_mask(fill, 3 * 280 / 64)[..., None]  # the whole image's mask, blurred once
    expected = np.uint8(((200 / 255) * soft + (1 - soft) * (40 / 255)) * 255)  # (H, W, 1)
    assert np.array_equal(out, np.repeat(expected, 3, axis=-1))
    assert len(np.unique(out[145, :, 0])) > 10  # a real ramp, not a step


def test_pixels_beyond_the_feather_reach_are_untouched():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    result = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    fill = np.zeros((300, 400), bool)
    fill[120:170, 150:260] = True
    window = Window(50, 20, 330, 300)
    out = _merged(image, fill, result, window, 64, compensate=True)
    far = ~dilate(fill, feather_reach(3 * 280 / 64))
    assert np.array_equal(out[far], image[far])
    assert (out[fill] != image[fill]).any(axis=-1).mean() > 0.9


def test_window_input_crops_resizes_and_pads():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    fill = np.zeros((200, 300), bool)
    fill[80:120, 100:200] = True
    fill[0, 0] = True  # a one-pixel stroke survives shrinking (max-pooling, not nearest)
    pixels, hole = window_input(image, fill, Window(0, 0, 300, 200, placed=(0, 10, 64, 53)), 64)
    assert pixels.shape == (64, 64, 3) and hole.shape == (64, 64) and hole.dtype == bool
    assert not hole[:10].any() and not hole[53:].any()  # the padding is never a hole
    assert hole[10, 0] and hole[27:33, 25:40].all()
    assert np.array_equal(pixels[9], pixels[11])  # reflect padding mirrors row 10
    pixels, hole = window_input(image, fill, Window(100, 50, 228, 178), 128)  # 1:1 crop
    assert np.array_equal(pixels, np.asarray(image)[50:178, 100:228])
    assert np.array_equal(hole, fill[50:178, 100:228])
