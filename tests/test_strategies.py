"""moebius.strategies: window planning and any-size inpainting with fake native-size models."""

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from moebius.masks import MaskError, dilate, prepare_mask
from moebius.strategies import (
    Window,
    feather,
    feather_radius,
    feather_reach,
    inpaint_any_size,
    plan_crop_windows,
    region_boxes,
)

PHOTOS = [
    "lomiri_aitzgorri.jpg",
    "lomiri_fig.jpg",
    "lomiri_friends.jpg",
    "lomiri_picosdeeuropa.jpg",
    "lomiri_seeding.jpg",
    "lomiri_wine.jpg",
    "skimage_astronaut.png",
    "skimage_chelsea.png",
    "skimage_coffee.png",
    "skimage_rocket.jpg",
]


class FakeRun:
    """A native-size 'model' that inverts the masked pixels and records every call."""

    def __init__(self, native):
        self.native = native
        self.batches = []  # per call: number of images
        self.images, self.masks = [], []

    def __call__(self, images, masks):
        self.batches.append(len(images))
        self.images += images
        self.masks += masks
        out = []
        for image, mask in zip(images, masks, strict=True):
            assert image.mode == "RGB" and image.size == (self.native, self.native)
            assert mask.mode == "L" and set(np.unique(mask)) <= {0, 255}
            hole = np.asarray(mask)[..., None] == 255
            out.append(Image.fromarray(np.where(hole, 255 - np.asarray(image), np.asarray(image))))
        return out


def _noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _covers(windows, mask):
    covered = np.zeros_like(mask)
    for w in windows:
        covered[w.y0 : w.y1, w.x0 : w.x1] = True
    return not (mask & ~covered).any()


def _check_windows(windows, mask):
    height, width = mask.shape
    for w in windows:
        assert w.x1 - w.x0 == w.y1 - w.y0 == w.side
        assert 0 <= w.x0 and 0 <= w.y0 and w.x1 <= width and w.y1 <= height
    assert _covers(windows, mask)


def _assert_untouched_far_from_mask(out, image, mask, reach):
    changed = (np.asarray(out) != np.asarray(image)).any(axis=-1)
    assert not (changed & ~dilate(mask, reach)).any()


# ---- regions and windows ---------------------------------------------------------------------


def test_region_boxes_use_8_connectivity():
    mask = np.zeros((10, 10), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # diagonal chain: one region
    mask[6:8, 5] = True
    mask[6:8, 7] = True  # one empty column apart: two regions
    assert region_boxes(mask) == [(1, 1, 4, 4), (6, 5, 8, 6), (6, 7, 8, 8)]
    u_shape = np.zeros((6, 7), bool)
    u_shape[0:5, 1] = u_shape[0:5, 5] = u_shape[5, 1:6] = True  # joined only at the bottom
    assert region_boxes(u_shape) == [(0, 1, 6, 6)]
    assert region_boxes(np.zeros((3, 3), bool)) == []


def test_window_must_be_square():
    with pytest.raises(ValueError, match="square"):
        Window(0, 0, 10, 12)
    assert Window(2, 3, 12, 13).box == (2, 3, 12, 13) and Window(2, 3, 12, 13).side == 10


def test_small_mask_in_big_photo_gets_one_native_window():
    mask = np.zeros((4000, 6000), bool)
    mask[1000:1100, 2000:2050] = True
    windows = plan_crop_windows(mask, native=512)
    assert windows == [Window(1769, 794, 2281, 1306)]  # centred on the bbox, side N, 1:1 scale


def test_window_near_border_is_shifted_inside_keeping_its_size():
    mask = np.zeros((1000, 1500), bool)
    mask[0:30, 1480:1500] = True  # top-right corner
    (window,) = plan_crop_windows(mask, native=512)
    assert window == Window(988, 0, 1500, 512)


def test_large_region_gets_bbox_plus_margin():
    mask = np.zeros((2000, 3000), bool)
    mask[500:1100, 800:1000] = True  # 600 tall: side 600 + 2 * 128 = 856
    (window,) = plan_crop_windows(mask, native=512, margin=128)
    assert window.side == 856
    assert (window.y0, window.y1) == (372, 1228)
    assert plan_crop_windows(mask, native=512, margin=0)[0].side == 600


def test_image_smaller_than_native_uses_its_short_side():
    mask = np.zeros((300, 451), bool)
    mask[100:120, 10:30] = True
    (window,) = plan_crop_windows(mask, native=512)
    assert window == Window(0, 0, 300, 300)


def test_close_regions_share_a_window_far_regions_do_not():
    mask = np.zeros((3000, 4000), bool)
    mask[1000:1050, 1000:1050] = True
    mask[1000:1050, 1300:1350] = True  # 250 px apart: native windows overlap -> merged
    (window,) = plan_crop_windows(mask, native=512)
    assert window.side == 350 + 2 * 128 and _covers([window], mask)  # union bbox + margins

    mask[2500:2550, 3500:3550] = True  # far away: its own window
    windows = plan_crop_windows(mask, native=512)
    assert [w.side for w in windows] == [606, 512]
    _check_windows(windows, mask)


def test_merging_cascades_until_stable():
    mask = np.zeros((2000, 6000), bool)
    for x in range(500, 5000, 400):  # a row of dots, each window overlapping the next
        mask[1000:1010, x : x + 10] = True
    windows = plan_crop_windows(mask, native=512)
    _check_windows(windows, mask)
    for a in windows:  # no two windows that could still merge remain overlapping
        for b in windows:
            if a != b:
                union = max(a.x1, b.x1) - min(a.x0, b.x0)
                overlap = a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
                assert not overlap or union > 2000


def test_panorama_wide_stroke_is_split_along_the_long_side():
    mask = np.zeros((500, 4000), bool)
    mask[240:260, 100:3900] = True
    windows = plan_crop_windows(mask, native=512, margin=128)
    _check_windows(windows, mask)
    assert all(w.side == 500 and w.y0 == 0 for w in windows)
    # span 0..4000 (stroke +- margin), squares of 500 stepping at most 500 - 128 = 372 px
    assert len(windows) == 11 and windows[0].x0 == 0 and windows[-1].x1 == 4000
    for a, b in zip(windows, windows[1:], strict=False):
        assert b.x0 - a.x0 <= 372 and a.x1 - b.x0 >= 128  # neighbours overlap by >= margin


@pytest.mark.parametrize("name", PHOTOS)
def test_windows_on_real_photos(name):
    raw = Image.open(shared_path("data", "photos", name.rsplit(".", 1)[0] + "_mask.png"))
    mask = prepare_mask(raw, raw.size)
    windows = plan_crop_windows(mask, native=512)
    _check_windows(windows, mask)
    assert len(windows) == 1  # each photo's regions are close enough to share one window
    assert windows[0].side >= min(512, *mask.shape)


# ---- inpaint_any_size ------------------------------------------------------------------------


def test_one_small_mask_in_6000x4000_photo_runs_once_at_native_scale():
    image = Image.new("RGB", (6000, 4000), (10, 120, 200))
    mask = np.zeros((4000, 6000), bool)
    mask[1000:1100, 2000:2050] = True
    run = FakeRun(512)
    out = inpaint_any_size(image, mask, 512, run)
    assert run.batches == [1]
    assert out.size == image.size and out.mode == "RGB"
    pixels = np.asarray(out)
    assert (pixels[mask] == (245, 135, 55)).all()  # a 1:1 window: exactly the model's fill
    _assert_untouched_far_from_mask(out, image, mask, feather_reach(feather_radius(512, 512)))


def test_crop_on_real_photo_keeps_unmasked_pixels_and_fills_the_hole():
    image = Image.open(shared_path("data", "photos", "lomiri_wine.jpg")).convert("RGB")
    raw = Image.open(shared_path("data", "photos", "lomiri_wine_mask.png"))
    mask = prepare_mask(raw, image.size, dilation=4)
    run = FakeRun(256)
    out = inpaint_any_size(image, mask, 256, run, strategy="crop")
    assert out.size == image.size
    (window,) = plan_crop_windows(mask, 256)
    _assert_untouched_far_from_mask(
        out, image, mask, feather_reach(feather_radius(window.side, 256))
    )
    changed = np.abs(np.asarray(out, int) - np.asarray(image, int)).sum(axis=-1) > 60
    assert changed[mask].mean() > 0.9  # the inverted fill shows inside the hole
    # the model saw every hole pixel: the max-pooled native mask, enlarged back, covers the hole
    seen = run.masks[0].resize((window.side,) * 2, Image.Resampling.NEAREST)
    assert (np.asarray(seen) == 255)[mask[window.y0 : window.y1, window.x0 : window.x1]].all()


def test_windows_go_in_one_batch_or_in_chunks():
    image = _noise_image(3000, 2000)
    mask = np.zeros((2000, 3000), bool)
    mask[100:140, 100:140] = True
    mask[1800:1840, 2800:2840] = True
    mask[1000:1040, 1500:1540] = True
    run = FakeRun(64)
    inpaint_any_size(image, mask, 64, run, margin=16)
    assert run.batches == [3]
    run = FakeRun(64)
    inpaint_any_size(image, mask, 64, run, margin=16, batch_size=2)
    assert run.batches == [2, 1]


def test_native_strategy_returns_the_run_output_exactly():
    image = _noise_image(64, 64)
    mask = np.zeros((64, 64), bool)
    mask[20:30, 5:50] = True
    run = FakeRun(64)
    out = inpaint_any_size(image, mask, 64, run, strategy="native")
    assert np.array_equal(np.asarray(out), np.asarray(run(run.images[:1], run.masks[:1])[0]))
    assert np.array_equal(np.asarray(run.images[0]), np.asarray(image))  # no resampling
    assert np.array_equal(np.asarray(run.masks[0]) == 255, mask)
    auto = FakeRun(64)
    assert np.array_equal(np.asarray(inpaint_any_size(image, mask, 64, auto)), np.asarray(out))
    with pytest.raises(ValueError, match="'crop'.*'resize'"):
        inpaint_any_size(_noise_image(65, 64), np.ones((64, 65), bool), 64, run, "native")


def test_resize_strategy_pads_outside_the_mask():
    image = _noise_image(300, 200)
    mask = np.zeros((200, 300), bool)
    mask[80:120, 100:200] = True
    run = FakeRun(64)
    out = inpaint_any_size(image, mask, 64, run, strategy="resize")
    assert run.batches == [1] and out.size == (300, 200)
    native_mask = np.asarray(run.masks[0]) == 255
    # 300x200 -> 64x43, centred: rows 10..52 hold the image, the reflect-padded rest is no hole
    assert not native_mask[:10].any() and not native_mask[53:].any()
    assert native_mask[27:33, 25:40].all()
    padded = np.asarray(run.images[0])
    assert np.array_equal(padded[9], padded[11])  # reflect padding mirrors row 10
    _assert_untouched_far_from_mask(out, image, mask, feather_reach(feather_radius(300, 64)))
    inside = mask & ~dilate(~mask, 6)  # away from the resampled edge
    assert (np.abs(np.asarray(out, int) - np.asarray(image, int)).sum(-1)[inside] > 0).all()


def test_empty_mask_returns_a_copy_without_running():
    image = _noise_image(100, 80)
    run = FakeRun(64)
    out = inpaint_any_size(image, np.zeros((80, 100), bool), 64, run)
    assert run.batches == [] and out is not image
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_bad_arguments_are_explained():
    image, run = _noise_image(100, 80), FakeRun(64)
    with pytest.raises(MaskError, match=r"\[80, 100\]"):
        inpaint_any_size(image, np.zeros((100, 80), bool), 64, run)
    with pytest.raises(ValueError, match="strategy must be one of"):
        inpaint_any_size(image, np.ones((80, 100), bool), 64, run, strategy="tile")

    def wrong_size(images, masks):
        return [Image.new("RGB", (32, 32)) for _ in images]

    with pytest.raises(ValueError, match="RGB 64x64"):
        inpaint_any_size(image, np.ones((80, 100), bool), 64, wrong_size)


def test_feather_is_one_on_the_mask_and_bounded_outside():
    mask = np.zeros((200, 200), bool)
    mask[90:110, 60:140] = True
    for radius in (0.5, 3, 7.5, 20):
        soft = feather(mask, radius)
        assert (soft[mask] == 1).all()
        assert (soft[~dilate(mask, feather_reach(radius))] == 0).all()
        assert soft[mask.shape[0] // 2, 59] > 0  # a real blur tail next to the hole
