"""`moebius eval masks` / `predict`: determinism, torchrun shards, resume, failures."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

from moebius.cli import main
from moebius.eval.data import image_rng, image_torch_seed, list_images
from moebius.eval.predict import classical_fill
from moebius.mask_generators import random_mask


def write_images(folder, sizes=((96, 64), (64, 80), (72, 72), (64, 64), (80, 96))):
    """Smooth random colour images (W, H) named a.png, bb.png, ... plus a NAME_mask.png decoy."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(
            folder / f"{'ab'[i % 2] * (i + 1)}.png"
        )
    Image.new("L", (8, 8)).save(folder / "a_mask.png")  # not an image to fill
    return folder


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def torchrun(*args):
    """`torchrun --standalone --nproc_per_node 2 -m moebius.cli ...` (gloo on CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "moebius.cli", *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# ---- masks ----------------------------------------------------------------------------------


def test_mask_set_same_seed_byte_identical(tmp_path):
    images = write_images(tmp_path / "img")
    for out in ("a", "b"):
        assert main(["eval", "masks", "--images", str(images), "--protocol", "thick_256",
                     "--out", str(tmp_path / out), "--seed", "3"]) == 0  # fmt: skip
    main(["eval", "masks", "--images", str(images), "--protocol", "thick_256", "--out",
          str(tmp_path / "c"), "--seed", "4"])  # fmt: skip
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b and a.keys() == c.keys()
    assert sorted(a) == ["a_mask.png", "aaa_mask.png", "aaaaa_mask.png", "bb_mask.png",
                         "bbbb_mask.png", "masks.json"]  # fmt: skip
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))
    # each mask is the generator's draw from the rng of (seed, file name), at the image's size
    summary = json.loads(a["masks.json"])
    for path in list_images(images):
        mask = np.asarray(Image.open(tmp_path / "a" / f"{path.stem}_mask.png"))
        w, h = Image.open(path).size
        expected = random_mask("thick_256", h, w, image_rng(3, path.name))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, expected)
        assert summary["hole_fraction"][path.stem] == pytest.approx(expected.mean())
    assert summary["count"] == 5 and summary["protocol"] == "thick_256"


def test_mask_of_an_image_does_not_depend_on_the_other_images(tmp_path):
    images = write_images(tmp_path / "img")
    main(["eval", "masks", "--images", str(images), "--protocol", "area_40_50", "--out",
          str(tmp_path / "all")])  # fmt: skip
    for path in list_images(images)[1:]:
        path.unlink()
    main(["eval", "masks", "--images", str(images), "--protocol", "area_40_50", "--out",
          str(tmp_path / "one")])  # fmt: skip
    one = files(tmp_path / "one")
    assert one["a_mask.png"] == files(tmp_path / "all")["a_mask.png"]
    fractions = json.loads(files(tmp_path / "all")["masks.json"])["hole_fraction"].values()
    assert all(0.40 <= f <= 0.50 for f in fractions)


def test_mask_set_two_processes_equal_one(tmp_path):
    images = write_images(tmp_path / "img")
    args = ["eval", "masks", "--images", str(images), "--protocol", "medium_256", "--seed", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun(*args, "--out", str(tmp_path / "two"))
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_unknown_protocol_exits_2(tmp_path, capsys):
    assert (
        main(["eval", "masks", "--images", str(tmp_path), "--protocol", "medium", "--out", "x"])
        == 2
    )
    assert "thick_512" in capsys.readouterr().err


# ---- predict --------------------------------------------------------------------------------


def test_classical_fills_keep_known_pixels_and_fill_holes():
    image = np.asarray(
        Image.open(shared_path("data", "photos", "skimage_chelsea.png")).convert("RGB")
    )
    hole = np.asarray(Image.open(shared_path("data", "photos", "skimage_chelsea_mask.png"))) == 255
    mean = classical_fill("mean", image, hole)
    assert np.array_equal(mean[~hole], image[~hole])
    assert np.array_equal(mean[hole][0], np.round(image[~hole].mean(0)).astype(np.uint8))
    assert (mean[hole] == mean[hole][0]).all()
    for method in ("telea", "navier-stokes"):
        out = classical_fill(method, image, hole)
        assert np.array_equal(out[~hole], image[~hole])
        assert len(np.unique(out[hole].reshape(-1, 3), axis=0)) > 100  # a real fill, not flat
        # propagated from the border: a smaller jump across the hole's edge than a flat colour
        assert edge_jump(out, hole) < 0.5 * edge_jump(mean, hole)
    assert np.array_equal(classical_fill("mean", image, np.ones_like(hole))[0, 0], [128] * 3)


def edge_jump(image: np.ndarray, hole: np.ndarray) -> float:
    """Mean |difference| of horizontal neighbours where one is in the hole and the other not."""
    edge = hole[:, 1:] != hole[:, :-1]
    diff = np.abs(image[:, 1:].astype(float) - image[:, :-1])
    return float(diff[edge].mean())


@pytest.fixture()
def mask_set(tmp_path):
    images = write_images(tmp_path / "img")
    main(["eval", "masks", "--images", str(images), "--protocol", "medium_256", "--out",
          str(tmp_path / "masks")])  # fmt: skip
    return images, tmp_path / "masks"


def test_predict_is_resumable_and_reports_a_bad_file(mask_set, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="moebius")
    images, masks = mask_set
    (images / "broken.png").write_bytes(b"not a png")
    Image.new("L", (8, 8)).save(masks / "broken_mask.png")
    out = tmp_path / "pred"
    args = ["eval", "predict", "--method", "telea", "--images", str(images), "--masks",
            str(masks), "--out", str(out), "-q"]  # fmt: skip
    assert main(args) == 1  # one file failed, the other five finished
    assert "failed: broken.png" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "aaa.png", "aaaaa.png", "bb.png",
                                                      "bbbb.png"]  # fmt: skip
    first = files(out)
    (images / "broken.png").unlink()
    (out / "bb.png").write_bytes(b"stale")  # done files are skipped, not redone ...
    caplog.clear()
    assert main(args) == 0
    assert "0 done, 5 skipped" in caplog.text
    assert files(out)["bb.png"] == b"stale"
    assert main([*args, "--overwrite"]) == 0  # ... unless --overwrite
    assert files(out) == first


def test_predict_rejects_a_mask_of_another_size(mask_set, tmp_path, caplog):
    images, masks = mask_set
    Image.new("L", (10, 10)).save(masks / "bb_mask.png")
    args = ["eval", "predict", "--method", "mean", "--images", str(images), "--masks",
            str(masks), "--out", str(tmp_path / "pred"), "-q"]  # fmt: skip
    assert main(args) == 1
    assert "bb.png: ValueError: mask is 10x10 but the image is 64x80" in caplog.text


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from conftest import tiny_pipeline

    return tiny_pipeline().save_pretrained(tmp_path_factory.mktemp("tiny") / "weights")


def test_predict_moebius_two_processes_equal_one(mask_set, tiny_weights, tmp_path):
    images, masks = mask_set
    args = ["eval", "predict", "--method", "moebius", "--images", str(images), "--masks",
            str(masks), "--weights", str(tiny_weights), "--steps", "2", "--seed", "5",
            "-q"]  # fmt: skip
    # Same intra-op thread count as each torchrun worker (OMP_NUM_THREADS=1): float sums with
    # another thread count may round a pixel differently; the process count must not.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun(*args, "--out", str(tmp_path / "two"))
    one = files(tmp_path / "one")
    assert len(one) == 5 and one == files(tmp_path / "two")
    # per-image noise comes from (seed, name): the images differ from the inputs in the holes only
    for path in list_images(images):
        pred = np.asarray(Image.open(tmp_path / "one" / f"{path.stem}.png"), dtype=int)
        assert pred.shape == np.asarray(Image.open(path)).shape
    assert image_torch_seed(5, "a.png") != image_torch_seed(5, "bb.png")
    assert image_torch_seed(5, "a.png") == image_torch_seed(5, "a.png") < 2**63
