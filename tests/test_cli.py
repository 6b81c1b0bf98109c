"""The `moebius` command with a tiny random-weight pipeline on the real photos and odd files."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import far_from_mask as far_from
from conftest import noise_pair as native_pair
from conftest import seeded as gen
from conftest import shared_path, tiny_pipeline
from huggingface_hub import constants
from PIL import Image

from moebius.cli import main
from moebius.images import gray_to_8bit, load_image
from moebius.models import MoebiusConfig, checkpoints
from moebius.pipeline import InpaintPipeline

NATIVE = 128  # tiny_pipeline's native size


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    tiny_pipeline().save_pretrained(folder)
    return folder


def inpaint(weights, *args) -> int:
    return main(["inpaint", *map(str, args), "--weights", str(weights), "--steps", "3", "-q",
                 "--device", "cpu"])  # fmt: skip


def assert_kept(image: Image.Image, out: Image.Image, mask: Image.Image) -> None:
    """Same size; every pixel beyond the mask's feather byte-identical to `image`."""
    assert out.size == image.size
    keep = far_from(np.asarray(mask.convert("L")) > 127, NATIVE)
    assert np.array_equal(np.asarray(out)[keep], np.asarray(image)[keep])


def write_pair(folder, name: str, image: Image.Image, box, mask_name: str | None = None) -> None:
    """Save `image` as `name` and a mask (255 inside box = (x0, y0, x1, y1)) beside or elsewhere."""
    image.save(folder / name)
    mask = np.zeros((image.size[1], image.size[0]), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = 255
    stem = name.rsplit(".", 1)[0]
    Image.fromarray(mask).save(folder / (mask_name or f"{stem}_mask.png"))


def chelsea() -> Image.Image:
    return load_image(shared_path("data", "photos", "skimage_chelsea.png"))


def test_file_mode_is_reproducible_and_keeps_unmasked_pixels(weights, tmp_path):
    photos = shared_path("data", "photos")
    image, mask = photos / "skimage_rocket.jpg", photos / "skimage_rocket_mask.png"
    assert inpaint(weights, image, mask, "-o", tmp_path / "a.png", "--seed", "5") == 0
    assert inpaint(weights, image, mask, "-o", tmp_path / "b.png", "--seed", "5") == 0
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert_kept(load_image(image), a, load_image(mask))
    assert not list(tmp_path.glob(".*.part"))  # atomic writes leave no temporary files


def test_folder_mode_on_the_real_photos(weights, tmp_path):
    photos = shared_path("data", "photos")
    assert inpaint(weights, photos, photos, "-o", tmp_path) == 0
    images = sorted(p for p in photos.iterdir() if not p.stem.endswith("_mask"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{p.stem}.png" for p in images)
    for path in images:
        out = Image.open(tmp_path / f"{path.stem}.png")
        assert out.mode == "RGB"
        assert_kept(load_image(path), out, load_image(photos / f"{path.stem}_mask.png"))


def test_corrupt_file_is_reported_and_the_rest_finishes(weights, tmp_path, caplog):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    image = chelsea()
    write_pair(src, "a.png", image.crop((0, 0, 200, 150)), (50, 40, 90, 80))
    write_pair(src, "c.png", image.crop((200, 100, 420, 300)), (20, 20, 60, 70))
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # truncated garbage
    Image.new("L", (10, 10), 255).save(src / "b_mask.png")
    caplog.set_level(logging.INFO, logger="moebius")
    assert inpaint(weights, src, src, "-o", out) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert "b.png" in caplog.text and "2 done, 0 skipped, 1 failed" in caplog.text


def test_masks_pair_by_name_never_by_order(weights, tmp_path, caplog):
    imgs, msks, out = tmp_path / "img", tmp_path / "msk", tmp_path / "out"
    imgs.mkdir(), msks.mkdir()
    image = chelsea().crop((0, 0, 256, 200))
    for name in ("a.png", "b.png", "c.png"):
        image.save(imgs / name)
    write_pair(msks, "tmp.png", image, (10, 10, 50, 50), mask_name="b.png")  # b: top left
    write_pair(msks, "tmp.png", image, (200, 140, 240, 190), mask_name="c_mask.png")  # c: corner
    caplog.set_level(logging.INFO, logger="moebius")
    assert inpaint(weights, imgs, msks, "-o", out) == 1  # a has no mask: reported, not paired
    assert "no mask for a.png" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["b.png", "c.png"]
    for name, own in (("b.png", (10, 10, 50, 50)), ("c.png", (200, 140, 240, 190))):
        changed = (np.asarray(Image.open(out / name)) != np.asarray(image)).any(-1)
        assert changed[own[1] : own[3], own[0] : own[2]].mean() > 0.5
        assert changed.sum() < 0.2 * changed.size  # only around its own mask


def test_one_mask_file_for_a_whole_folder(weights, tmp_path):
    imgs, out = tmp_path / "img", tmp_path / "out"
    imgs.mkdir()
    image = chelsea().crop((0, 0, 256, 200))
    image.save(imgs / "a.png")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(imgs / "b.jpg", quality=95)
    write_pair(tmp_path, "tmp.png", image, (100, 60, 150, 120), mask_name="watermark.png")
    assert inpaint(weights, imgs, tmp_path / "watermark.png", "-o", out) == 0
    for name in ("a", "b"):
        source, result = load_image(next(imgs.glob(f"{name}.*"))), Image.open(out / f"{name}.png")
        assert_kept(source, result, load_image(tmp_path / "watermark.png"))
        assert (np.asarray(result) != np.asarray(source))[60:120, 100:150].any(-1).mean() > 0.5


def test_download_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["download", "--variant", "ft_ffhq", "--cache-dir", str(tmp_path)]) == 2
    assert "hustvl/Moebius: ft_ffhq/diffusion_pytorch_model.bin" in capsys.readouterr().err


def test_existing_outputs_are_skipped_unless_overwrite(weights, tmp_path):
    photos = shared_path("data", "photos")
    args = (photos / "skimage_chelsea.png", photos / "skimage_chelsea_mask.png", "-o")
    target = tmp_path / "out.png"
    Image.new("RGB", (4, 4)).save(target)
    assert inpaint(weights, *args, target) == 0
    assert Image.open(target).size == (4, 4)  # skipped
    assert inpaint(weights, *args, target, "--overwrite") == 0
    assert Image.open(target).size == (451, 300)


def test_unusual_files(weights, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rgb = chelsea().crop((100, 50, 340, 230))  # 240 x 180
    box = (60, 40, 130, 110)
    alpha = Image.fromarray(np.tile(np.arange(240, dtype=np.uint8), (180, 1)))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    deep = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    cases = {"gray.png": rgb.convert("L"), "rgba.png": rgba, "cmyk.jpg": rgb.convert("CMYK"),
             "deep.png": deep, "palette.png": rgb.convert("P"),
             "tiny.png": rgb.resize((14, 10))}  # fmt: skip
    for name, image in cases.items():
        write_pair(src, name, image, box if name != "tiny.png" else (4, 3, 8, 7))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers (and we) rotate it upright, to 180 x 240
    rgb.save(src / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(np.pad(np.full((40, 30), 255, np.uint8), ((100, 100), (75, 75)))).save(
        src / "rotated_mask.png"
    )
    assert inpaint(weights, src, src, "-o", out) == 0
    expected = {"gray": "L", "rgba": "RGBA", "cmyk": "RGB", "deep": "L", "palette": "RGB",
                "tiny": "RGB", "rotated": "RGB"}  # fmt: skip
    for stem, mode in expected.items():
        name = next(p.name for p in src.iterdir() if p.stem == stem)
        image, mask = load_image(src / name), load_image(src / f"{stem}_mask.png")
        result = Image.open(out / f"{stem}.png")
        assert result.mode == mode, stem
        reference = gray_to_8bit(image) if stem == "deep" else image.convert(mode)
        assert_kept(reference, result, mask)
        if stem == "rgba":
            assert result.getchannel("A").tobytes() == rgba.getchannel("A").tobytes()
    assert Image.open(out / "rotated.png").size == (180, 240)


def test_offline_without_weights_explains_before_importing_torch(tmp_path):
    photos = shared_path("data", "photos")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    argv = ["inpaint", str(photos / "skimage_coffee.png"),
            str(photos / "skimage_coffee_mask.png"), "-o", str(tmp_path / "out.png")]  # fmt: skip
    # Fast by construction: the error comes before torch is imported (a benchmark times it).
    code = ("import sys, moebius.cli; rc = moebius.cli.main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "hustvl/Moebius: ft_places2/diffusion_pytorch_model.bin" in proc.stderr
    assert "--weights DIR" in proc.stderr and not (tmp_path / "out.png").exists()


def test_convert_released_bin_into_a_weights_folder(weights, tmp_path):
    source = InpaintPipeline.from_pretrained(weights)
    checkpoints.save_original(source.unet, tmp_path / "released.bin")
    original = {"data": {"image_size": 128}, "vae": {"downsample_ratio": 8},
                "model": {"block_out_channels": [16, 32, 64], "attention_head_dim": 4,
                          "cross_attention_dim": 32, "encoder_hid_dim": 32,
                          "norm_num_groups": 8}}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps({"config": original, "num_embeddings": 20}))
    argv = ["convert", str(tmp_path / "released.bin"), str(tmp_path / "ours"), "--config",
            str(tmp_path / "cfg.json"), "--vae", str(weights / "vae")]  # fmt: skip
    assert main(argv) == 0
    converted = InpaintPipeline.from_pretrained(tmp_path / "ours")
    assert converted.unet.config == MoebiusConfig.tiny()
    for p in (source, converted):
        p.set_progress_bar_config(disable=True)
    image, mask = native_pair()
    a = source(image, mask, steps=3, generator=gen())
    b = converted(image, mask, steps=3, generator=gen())
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_option_exits_2_with_the_choices(weights, tmp_path, capsys):
    photos = shared_path("data", "photos")
    code = inpaint(weights, photos / "skimage_coffee.png", photos / "skimage_coffee_mask.png",
                   "-o", tmp_path / "x.png", "--strategy", "zoom")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and all(name in err.split("zoom")[1] for name in ("auto", "crop", "resize"))
