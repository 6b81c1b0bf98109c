"""Training data: manifest, dataset augmentation (spec 4.2), sample order and positions."""

import json

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

from moebius.train import data
from moebius.train.data import (
    DataError,
    DataPosition,
    EpochSampler,
    InpaintDataset,
    collate,
    mask_aware_crop,
    random_dilation,
    read_manifest,
    resize_shorter,
    write_manifest,
)


def _photo(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _mask(path, w, h, box):
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    Image.fromarray(m).save(path)


@pytest.fixture()
def folder(tmp_path):
    """a.png 96x64 (mask a_mask.png), b.jpg 64x80 (no mask), c.png 64x64 (mask in masks/)."""
    images = tmp_path / "images"
    images.mkdir()
    _photo(images / "a.png", 96, 64, 1)
    _mask(images / "a_mask.png", 96, 64, (70, 10, 90, 30))
    _photo(images / "b.jpg", 64, 80, 2)
    _photo(images / "c.png", 64, 64, 3)
    (tmp_path / "masks").mkdir()
    _mask(tmp_path / "masks" / "c.png", 64, 64, (0, 0, 8, 8))
    return tmp_path


# ------------------------------------------------------------------------------------ manifest
def test_manifest_pairs_masks_by_name_and_paths_are_relative(folder):
    out = folder / "lists" / "train.jsonl"
    rows = write_manifest(folder / "images", out, masks=folder / "images")
    assert [r["image"] for r in rows] == ["../images/a.png", "../images/b.jpg", "../images/c.png"]
    assert rows[0]["mask"] == "../images/a_mask.png" and "mask" not in rows[1]
    parsed = read_manifest(out)
    assert [r.image.name for r in parsed] == ["a.png", "b.jpg", "c.png"]
    assert parsed[0].mask.resolve() == (folder / "images" / "a_mask.png").resolve()
    assert all(r.prompt == "background" and r.image.is_file() for r in parsed)
    rows = write_manifest(folder / "images", out, masks=folder / "masks")
    assert [("mask" in r) for r in rows] == [False, False, True]


def test_foreground_rows_need_masks(folder):
    with pytest.raises(DataError, match="b.jpg needs an object mask"):
        write_manifest(folder / "images", folder / "m.jsonl", folder / "images", "foreground")


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "is not a JSON object"),
        ('{"image": "a.png", "prompt": "object"}', "prompt must be one of"),
        ('{"image": "a.png", "extra": 1}', "unknown keys"),
        ('{"image": "a.png", "prompt": "foreground"}', "needs its object mask"),
        ('["a.png"]', "a row is"),
    ],
)
def test_bad_manifest_rows_are_errors_with_line_numbers(tmp_path, line, message):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "x.png"}\n' + line + "\n")
    with pytest.raises(DataError, match=message) as err:
        read_manifest(path)
    assert "m.jsonl:2" in str(err.value)


def test_manifest_cli(folder, capsys):
    from moebius.cli import main

    out = folder / "t.jsonl"
    assert main(["data", "manifest", str(folder / "images"), "-o", str(out),
                 "--masks", str(folder / "images")]) == 0  # fmt: skip
    assert "3 rows (1 with a mask)" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3


# ------------------------------------------------------------------------------ augmentation
def test_resize_shorter_side():
    assert resize_shorter(Image.new("RGB", (300, 200)), 128, Image.LANCZOS).size == (192, 128)
    assert resize_shorter(Image.new("RGB", (200, 301)), 128, Image.LANCZOS).size == (128, 192)
    assert resize_shorter(Image.new("RGB", (50, 50)), 128, Image.LANCZOS).size == (128, 128)


def test_large_jpeg_is_decoded_at_reduced_scale_but_never_below_the_crop(tmp_path):
    _photo(tmp_path / "big.jpg", 1600, 1000)
    image = data.load_rgb(tmp_path / "big.jpg", 128)
    assert image.mode == "RGB" and min(image.size) >= 128 and image.size[0] <= 400  # 1/4..1/8


def test_dilation_kernels_and_probability():
    mask = np.zeros((32, 32), np.float32)
    mask[16, 16] = 1
    sizes = set()
    for seed in range(60):
        out = random_dilation(mask, np.random.default_rng(seed), 1.0)
        side = int(out.sum() ** 0.5)
        assert out.sum() == side * side  # a square grown around the pixel
        sizes.add(side)
    # kernel 3/5/7 x 1/2 iterations -> sides 3, 5, 7, 9, 13
    assert sizes == {3, 5, 7, 9, 13}
    assert (random_dilation(mask, np.random.default_rng(0), 0.0) == mask).all()


def test_mask_aware_crop_keeps_the_mask_midpoint():
    mask = np.zeros((64, 200), np.float32)
    mask[10:20, 150:170] = 1  # bbox midpoint column 159
    starts = {mask_aware_crop(mask, 64, np.random.default_rng(s))[1] for s in range(300)}
    assert min(starts) == 159 - 63 and max(starts) == 136  # all starts with 159 in [s, s+64)
    tall = mask.T.copy()
    assert {mask_aware_crop(tall, 64, np.random.default_rng(s))[1] for s in range(20)} == {0}
    empty = np.zeros((64, 100), np.float32)
    starts = {mask_aware_crop(empty, 64, np.random.default_rng(s))[1] for s in range(400)}
    assert starts == set(range(37))  # uniform over every start


def _dataset(folder, **kwargs):
    manifest = folder / "t.jsonl"
    write_manifest(folder / "images", manifest, folder / "images")
    return InpaintDataset(read_manifest(manifest), resolution=32, mask_protocol="medium_256",
                          **kwargs)  # fmt: skip


def test_sample_shapes_ranges_and_ids(folder):
    ds = _dataset(folder)
    s = ds[(0, 0)]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert -1 <= s["image"].min() and s["image"].max() <= 1
    assert s["mask"].shape == (1, 32, 32) and s["mask"].dtype == torch.uint8
    assert set(s["mask"].unique().tolist()) <= {0, 1}
    assert torch.equal(s["masked_image"], s["image"] * (1 - s["mask"]))
    assert s["input_ids"].tolist() == list(range(10))
    fg = InpaintDataset([data.Row(ds.rows[0].image, "foreground", ds.rows[0].mask)], 32,
                        "medium_256")  # fmt: skip
    assert fg[(0, 0)]["input_ids"].tolist() == list(range(10, 20))


def test_samples_are_a_function_of_seed_epoch_index(folder):
    a, b = _dataset(folder, seed=1), _dataset(folder, seed=1)
    for key in [(0, 0), (1, 3), (2, 5)]:
        x, y = a[key], b[key]
        assert all(torch.equal(x[k], y[k]) for k in ("image", "mask"))
    epochs = [a[(1, e)]["mask"] for e in range(6)]
    assert len({m.numpy().tobytes() for m in epochs}) > 1  # fresh randomness per epoch
    state = np.random.get_state()[1].copy()
    a[(0, 0)]
    assert (np.random.get_state()[1] == state).all()  # the global numpy RNG is untouched


def test_own_mask_is_used_and_cropped_with_the_image(folder):
    ds = _dataset(folder, generated_mask_p=0.0, dilation_p=0.0, flip_p=0.0)
    s = ds[(0, 0)]  # a.png 96x64 -> 48x32, hole at x 35..45, y 5..15 of the resized image
    hole = s["mask"][0].nonzero()
    assert hole.numel() and (s["masked_image"][:, s["mask"][0].bool()] == 0).all()
    assert 4 <= int(hole[:, 0].min()) and int(hole[:, 0].max()) <= 15


def test_unreadable_image_is_an_error_naming_the_file_or_a_logged_skip(folder, caplog):
    (folder / "images" / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="b.jpg"):
        _dataset(folder)[(1, 0)]
    ds = _dataset(folder, skip_unreadable=True)
    assert ds[(1, 0)] is None and "skipping unreadable row 1" in caplog.text
    batch = collate([ds[(0, 0)], ds[(1, 0)], ds[(2, 0)]])
    assert batch["image"].shape[0] == 2 and batch["index"].tolist() == [0, 2]
    assert collate([None, None]) is None


# ------------------------------------------------------------------------------ order, position
def test_epoch_sampler_splits_ranks_and_resumes_mid_epoch():
    take = 23
    full = [k for _, k in zip(range(take), EpochSampler(10, 0, 1, seed=5), strict=False)]
    assert sorted(i for i, e in full if e == 0) == list(range(10))  # a permutation per epoch
    assert [e for _, e in full] == [0] * 10 + [1] * 10 + [2] * 3
    resumed = [k for _, k in zip(range(16), EpochSampler(10, 0, 1, 5, 0, 7), strict=False)]
    assert resumed == full[7:]
    ranks = [list(EpochSampler(10, r, 2, seed=5).epoch_indices(0)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))


def test_data_position_advances_over_epochs():
    p = DataPosition()
    for _ in range(7):
        p.advance(4, 10)
    assert (p.epoch, p.offset) == (2, 8)


def test_real_photos_manifest(tmp_path):
    photos = shared_path("data", "photos")
    rows = write_manifest(photos, tmp_path / "p.jsonl", photos)
    assert len(rows) == 10 and all("mask" in r for r in rows)
    s = InpaintDataset(read_manifest(tmp_path / "p.jsonl"), 128, "medium_256")[(3, 0)]
    assert s["image"].shape == (3, 128, 128) and 0 < s["mask"].float().mean() < 1
    assert json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])["prompt"] == "background"
