"""moebius.strategies: window planning (pure geometry) for every strategy."""

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from moebius.masks import prepare_mask
from moebius.strategies import Window, plan, plan_crop_windows, region_boxes

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


def test_window_must_be_square_unless_placed():
    with pytest.raises(ValueError, match="square"):
        Window(0, 0, 10, 12)
    assert Window(2, 3, 12, 13).box == (2, 3, 12, 13) and Window(2, 3, 12, 13).side == 10
    assert Window(2, 3, 12, 13).inner(64) == (0, 0, 64, 64)
    assert Window(0, 0, 10, 12, placed=(5, 0, 58, 64)).inner(64) == (5, 0, 58, 64)


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


# ---- plan: every strategy --------------------------------------------------------------------


def test_plan_picks_the_strategy_and_checks_its_arguments():
    fill = np.zeros((64, 64), bool)
    assert plan(fill, 64) == []  # nothing to fill: no window, no model run
    fill[20:30, 5:50] = True
    assert plan(fill, 64) == plan(fill, 64, "native") == [Window(0, 0, 64, 64)]
    big = np.zeros((200, 300), bool)
    big[80:120, 100:200] = True
    assert plan(big, 64) == plan(big, 64, "crop") == plan_crop_windows(big, 64)
    with pytest.raises(ValueError, match="'crop'.*'resize'"):
        plan(big, 64, "native")
    with pytest.raises(ValueError, match="auto, native, crop, resize"):
        plan(big, 64, "tile")
    with pytest.raises(ValueError, match="bool"):
        plan(big.astype(np.uint8), 64)


def test_resize_window_keeps_the_aspect_centred():
    fill = np.zeros((200, 300), bool)
    fill[80:120, 100:200] = True
    (window,) = plan(fill, 64, "resize")
    # 300x200 -> 64x43 (round(200 * 64 / 300) = 43), centred: rows 10..52 show the image
    assert window == Window(0, 0, 300, 200, placed=(0, 10, 64, 53))
