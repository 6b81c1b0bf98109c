"""moebius.masks: threshold, polarity, modes, sizes, dilation shape, latent mask."""

import logging

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

from moebius.masks import (
    MASK_THRESHOLD,
    MaskError,
    dilate,
    latent_mask,
    mask_to_image,
    prepare_mask,
)

VECTOR = ("reference", "pipeline_vector")


def _vector(name):
    return np.load(shared_path(*VECTOR, name))


@pytest.fixture(scope="module")
def trace():
    from safetensors.numpy import load_file

    return load_file(shared_path(*VECTOR, "trace.safetensors"))


# ---- binarisation ----------------------------------------------------------------------------


def test_threshold_and_polarity():
    assert MASK_THRESHOLD == 127.5
    values = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    gray = Image.fromarray(values)
    assert prepare_mask(gray, (4, 1)).tolist() == [[False, False, True, True]]
    assert prepare_mask(gray, (4, 1), invert=True).tolist() == [[True, True, False, False]]
    assert prepare_mask(values, (4, 1)).tolist() == [[False, False, True, True]]
    floats = np.array([[0.0, 0.49, 0.5, 1.0]])
    assert prepare_mask(floats, (4, 1)).tolist() == [[False, False, True, True]]
    as_bool = np.array([[True, False, True, False]])
    assert prepare_mask(as_bool, (4, 1)).tolist() == as_bool.tolist()


def test_rgba_mask_uses_alpha_only_when_it_varies():
    # white strokes exported on a transparent layer: colour is white everywhere, alpha is the mask
    stroke = np.zeros((2, 3, 4), np.uint8)
    stroke[..., :3] = 255
    stroke[0, 1, 3] = 255
    assert prepare_mask(Image.fromarray(stroke), (3, 2)).tolist() == [
        [False, True, False],
        [False, False, False],
    ]
    # a palette image whose transparent index marks the background: same rule
    palette = Image.fromarray(np.array([[0, 1, 0], [0, 0, 0]], np.uint8), mode="P")
    palette.putpalette([255, 255, 255] * 2)
    palette.info["transparency"] = 0
    assert prepare_mask(palette, (3, 2)).tolist() == [[False, True, False], [False] * 3]
    # opaque everywhere: the colour decides
    opaque = np.full((2, 3, 4), 255, np.uint8)
    opaque[1, :, :3] = 0
    assert prepare_mask(Image.fromarray(opaque), (3, 2)).tolist() == [[True] * 3, [False] * 3]


def test_rgb_mask_uses_luma_and_warns_about_colour(caplog):
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 0] = (255, 255, 255)
    rgb[0, 1] = (255, 0, 0)  # pure red: luma 76 -> keep
    with caplog.at_level(logging.WARNING, logger="moebius.masks"):
        assert prepare_mask(Image.fromarray(rgb), (3, 1)).tolist() == [[True, False, False]]
    assert "coloured" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moebius.masks"):
        prepare_mask(Image.fromarray(rgb[:, :1].repeat(3, axis=1)), (3, 1))  # white/grey only
    assert caplog.text == ""


def test_16_bit_mask_full_range():
    values = np.array([[0, 30000, 40000, 65535]], dtype=np.uint16)
    assert prepare_mask(Image.fromarray(values), (4, 1)).tolist() == [[False, False, True, True]]


def test_size_mismatch_names_both_sizes_and_the_option():
    mask = Image.new("L", (40, 20), 255)
    with pytest.raises(MaskError, match=r"40x20.*30x20.*resize") as info:
        prepare_mask(mask, (30, 20))
    assert isinstance(info.value, ValueError)


def test_resize_option_is_nearest():
    mask = np.zeros((2, 4), np.uint8)
    mask[:, :2] = 255
    out = prepare_mask(mask, (8, 4), resize=True)
    assert out.shape == (4, 8)
    assert out[:, :4].all() and not out[:, 4:].any()


def test_mask_to_image():
    image = mask_to_image(np.array([[True, False]]))
    assert image.mode == "L" and np.asarray(image).tolist() == [[255, 0]]


def test_real_mask_matches_readme_convention():
    path = shared_path("data", "photos", "skimage_chelsea_mask.png")
    raw = Image.open(path)
    mask = prepare_mask(raw, raw.size)
    assert mask.shape == (300, 451)
    assert np.array_equal(mask, np.asarray(raw) == 255)
    assert 0.05 < mask.mean() < 0.07  # README: 6.0 % hole


# ---- dilation --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_dilation_grows_a_point_into_a_square(k):
    mask = np.zeros((21, 21), bool)
    mask[10, 10] = True
    grown = prepare_mask(mask, (21, 21), dilation=k)
    rows, cols = np.nonzero(grown)
    assert grown.sum() == (2 * k + 1) ** 2
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10 - k, 10 + k, 10 - k, 10 + k)


def test_dilation_equals_chebyshev_distance_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40)) < 0.02
    mask[0, 0] = mask[-1, 5] = True  # border pixels: the grown square is clipped, not wrapped
    k = 3
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[0:30, 0:40]
    dist = np.min(
        np.maximum(np.abs(yy[..., None] - ys), np.abs(xx[..., None] - xs)), axis=-1
    )  # Chebyshev distance to the nearest mask pixel
    assert np.array_equal(dilate(mask, k), dist <= k)
    assert np.array_equal(dilate(mask, 0), mask)
    with pytest.raises(MaskError):
        dilate(mask, -1)


# ---- latent mask -----------------------------------------------------------------------------


def test_latent_mask_samples_top_left_of_each_cell(trace):
    mask = torch.zeros(1, 1, 32, 32)
    mask[0, 0, 8, 16] = 1  # top-left pixel of cell (1, 2): kept
    mask[0, 0, 17:24, 1:8] = 1  # rest of cell (2, 0) without its top-left pixel: vanishes
    small = latent_mask(mask, (4, 4))
    assert small.shape == (1, 1, 4, 4)
    assert torch.nonzero(small[0, 0]).tolist() == [[1, 2]]

    got = latent_mask(torch.from_numpy(trace["pre.mask"]), (32, 32)).float()
    assert np.array_equal(got.numpy(), trace["resized_mask"])
