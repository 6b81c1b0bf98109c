"""InpaintPipeline with tiny random-weight components: recipe facts, any size, modes, I/O.

Fixtures (`pipe`, `gen`, `native_pair`, `photo`, `far_from`, `count_batches`, ...)
live in conftest.py.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from moebius import composite, masks, strategies
from moebius import images as images_lib
from moebius import vae as vae_lib
from moebius.images import gray_to_8bit
from moebius.masks import MaskError
from moebius.models import MoebiusConfig, MoebiusUNet
from moebius.pipeline import NOISE_KEYS, InpaintPipeline, Recipe, category_ids


# ------------------------------------------------------------------------------- recipe facts
def test_schedule_is_the_originals(pipe):
    timesteps = pipe.timesteps(20, 0.99)
    assert timesteps.tolist() == list(range(900, -1, -50))  # 19 model calls from t=900
    alpha_bar = pipe.scheduler.alphas_cumprod
    assert alpha_bar.dtype == torch.float32
    assert float(alpha_bar[900]) == pytest.approx(0.0141511, abs=1e-6)
    assert pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.set_alpha_to_one is True


def test_category_ids_for_both_tasks():
    assert category_ids(20, "remove") == (list(range(10)), list(range(10, 20)))
    assert category_ids(20, "object") == (list(range(10, 20)), list(range(10)))
    with pytest.raises(ValueError, match="remove, object"):
        category_ids(20, "erase")


def test_native_size_and_latent_factor_come_from_configs(pipe, tiny_vae):
    assert pipe.native_size == 16 * 8
    small = InpaintPipeline(MoebiusUNet(MoebiusConfig.tiny()), tiny_vae(levels=3))
    assert vae_lib.latent_factor(small.vae) == 4 and small.native_size == 64


def test_encode_and_decode_use_the_configs_scaling_factor(tiny_vae, gen):
    vae = tiny_vae(scaling_factor=0.5)
    x = torch.rand(1, 3, 64, 64, generator=gen()) * 2 - 1
    eps = torch.randn(1, 4, 8, 8, generator=gen(1))
    posterior = vae.encode(x).latent_dist
    with torch.no_grad():
        z = vae_lib.encode(vae, x, eps)
        torch.testing.assert_close(z, (posterior.mean + posterior.std * eps) * 0.5)
        decoded = vae_lib.decode(vae, z)
        torch.testing.assert_close(decoded, vae.decode(z / 0.5).sample)  # [-1, 1], like encode


def test_recipe_validates_with_teaching_errors():
    with pytest.raises(ValueError, match="needs paste=True"):
        Recipe(paste=False, compensate=True)
    with pytest.raises(ValueError, match=r"int\(steps \* strength\) = 0 steps"):
        Recipe(strength=0.01)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        Recipe(steps=0)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("steps", 0, "steps must be an integer >= 1"),
        ("strength", 1.5, r"strength must lie in \(0, 1\]"),
        ("guidance_scale", float("nan"), "guidance_scale must be a finite number"),
        ("noise_offset", float("inf"), "noise_offset must be a finite number"),
        ("batch_size", 0, "batch_size must be an integer >= 1"),
        ("mask_dilation", -1, "mask_dilation must be an integer >= 0"),
        ("margin", -5, "margin must be an integer >= 0"),
        ("strategy", "tile", "auto, native, crop, resize"),
        ("task", "erase", "remove, object"),
    ],
)
def test_call_rejects_bad_options_before_any_work(pipe, native_pair, count_batches, option,
                                                 value, message):  # fmt: skip
    image, mask = native_pair()
    with count_batches(pipe) as batches, pytest.raises(ValueError, match=message):
        pipe(image, mask, **{option: value})
    assert batches == []


# ------------------------------------------------------------------------------- native size
def test_noise_injection_equals_drawing_from_the_generator(pipe, native_pair, gen):
    image, mask = native_pair()
    draws = pipe.draw_noise(1, generator=gen(3))
    assert list(draws) == list(NOISE_KEYS) and draws["latent_offset"].shape == (1, 4, 1, 1)
    injected = pipe(image, mask, steps=4, noise=draws)
    drawn = pipe(image, mask, steps=4, generator=gen(3))
    assert np.array_equal(np.asarray(injected), np.asarray(drawn))


def test_wrong_noise_shapes_are_explained(pipe, native_pair, gen):
    image, mask = native_pair()
    draws = pipe.draw_noise(2, generator=gen())
    with pytest.raises(ValueError, match=r"\[1, 4, 16, 16\]"):
        pipe(image, mask, steps=4, noise=draws)
    with pytest.raises(ValueError, match="not both"):
        pipe(image, mask, steps=4, noise=pipe.draw_noise(1), generator=gen())


def test_native_batch_is_one_run_and_pastes(pipe, native_pair, gen, far_from, count_batches):
    pairs = [native_pair(seed=s) for s in (0, 1)]
    with count_batches(pipe) as batches:
        outs = pipe([p[0] for p in pairs], [p[1] for p in pairs], steps=4, generator=gen())
    assert batches == [2]
    for (image, mask), out in zip(pairs, outs, strict=True):
        fill = np.asarray(mask) > 127
        a, b = np.asarray(image), np.asarray(out)
        assert np.array_equal(a[far_from(fill, 128)], b[far_from(fill, 128)])
        assert (a[fill] != b[fill]).any()


def test_tensor_core_rejects_other_sizes(pipe):
    with pytest.raises(ValueError, match=r"image \[B, 3, 128, 128\].*\[1, 3, 96, 96\]"):
        pipe.inpaint_tensors(torch.zeros(1, 3, 96, 96), torch.zeros(1, 1, 96, 96))


def test_task_object_swaps_the_guidance(pipe, native_pair, gen):
    image, mask = native_pair()
    seen = []  # the input_ids of every unet call
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    try:
        pipe(image, mask, steps=2, generator=gen(), task="object")
        pipe(image, mask, steps=2, generator=gen(), task="remove")
    finally:
        hook.remove()
    # rows: [negative (B) ; condition (B)]; "object" conditions on the foreground ids 10..19
    assert seen[0].tolist() == [list(range(10)), list(range(10, 20))]
    assert seen[-1].tolist() == [list(range(10, 20)), list(range(10))]


# ------------------------------------------------------------------------------- any size
@pytest.mark.parametrize("name", ["skimage_chelsea.png", "lomiri_wine.jpg"])
def test_photo_keeps_size_and_unmasked_pixels(pipe, name, photo, gen, far_from, count_batches):
    image, mask = photo(name)
    with count_batches(pipe) as batches:
        out = pipe(image, mask, steps=4, generator=gen())
    assert batches == [1]  # both photos have two blobs, close enough to share one window
    assert out.size == image.size and out.mode == "RGB"
    fill = np.asarray(mask) > 127
    a, b = np.asarray(image), np.asarray(out)
    assert np.array_equal(a[far_from(fill, 128)], b[far_from(fill, 128)])
    assert (a[fill] != b[fill]).mean() > 0.5


def test_same_seed_same_output_other_seed_differs(pipe, photo, gen):
    image, mask = photo("skimage_chelsea.png")
    first, second = (np.asarray(pipe(image, mask, steps=4, generator=gen(7))) for _ in range(2))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, np.asarray(pipe(image, mask, steps=4, generator=gen(8))))


def test_huge_photo_with_small_mask_costs_one_native_run(pipe, gen, far_from, count_batches):
    ramp = np.linspace(0, 255, 6000, dtype=np.float32).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(ramp[None, :, None], (4000, 6000, 3)).copy())
    fill = np.zeros((4000, 6000), bool)
    fill[2000:2040, 3000:3030] = True
    with count_batches(pipe) as batches:
        out = pipe(image, fill, steps=2, generator=gen())
    assert batches == [1]
    a, b = np.asarray(image), np.asarray(out)
    assert np.array_equal(a[far_from(fill, 128)], b[far_from(fill, 128)])


def test_resize_strategy(pipe, photo, gen, far_from):
    image, mask = photo("skimage_coffee.png")
    out = pipe(image, mask, steps=4, generator=gen(), strategy="resize")
    fill = np.asarray(mask) > 127
    assert out.size == image.size
    a, b = np.asarray(image), np.asarray(out)
    assert np.array_equal(a[far_from(fill, 128)], b[far_from(fill, 128)])


def test_empty_mask_returns_the_input_without_running(pipe, native_pair, count_batches):
    image = native_pair()[0].convert("RGBA")
    with count_batches(pipe) as batches:
        out = pipe(image, Image.new("L", image.size, 0))
    assert batches == [] and out.mode == "RGBA"
    assert out.tobytes() == image.tobytes() and out is not image


def test_mask_of_another_size_is_an_error_unless_resized(pipe, photo, gen):
    image, mask = photo("skimage_chelsea.png")
    small = mask.resize((200, 100), Image.Resampling.NEAREST)
    with pytest.raises(MaskError, match=r"200x100.*451x300"):
        pipe(image, small, steps=4)
    assert pipe(image, small, steps=4, resize_mask=True, generator=gen()).size == image.size


def test_invert_mask_and_dilation(pipe, native_pair, gen, far_from):
    image, mask = native_pair()
    plain = pipe(image, mask, steps=4, generator=gen())
    inverted = Image.fromarray(255 - np.asarray(mask))
    assert np.array_equal(np.asarray(pipe(image, inverted, steps=4, generator=gen(),
                                          invert_mask=True)), np.asarray(plain))  # fmt: skip
    dilated = pipe(image, mask, steps=4, generator=gen(), mask_dilation=6)
    grown = masks.dilate(np.asarray(mask) > 127, 6)
    changed = (np.asarray(dilated) != np.asarray(image)).any(-1)
    assert changed[grown & ~masks.dilate(np.asarray(mask) > 127, 3)].mean() > 0.5
    assert not changed[far_from(grown, 128)].any()


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16", "CMYK", "P", "LA"])
def test_modes_are_restored(pipe, mode, photo, gen, far_from):
    rgb, mask = photo("skimage_chelsea.png")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode in ("RGBA", "LA"):
        image = rgb.convert(mode)
        ramp = np.tile(np.linspace(0, 255, rgb.size[0]).astype(np.uint8), (rgb.size[1], 1))
        image.putalpha(Image.fromarray(ramp))
    else:
        image = rgb.convert(mode)
    out = pipe(image, mask, steps=4, generator=gen())
    expected_mode = {"RGBA": "RGBA", "L": "L", "I;16": "L", "CMYK": "RGB", "P": "RGB", "LA": "LA"}
    assert out.mode == expected_mode[mode] and out.size == image.size
    reference = gray_to_8bit(image) if mode == "I;16" else image.convert(out.mode)
    keep = far_from(np.asarray(mask) > 127, 128)
    assert np.array_equal(np.asarray(out)[keep], np.asarray(reference)[keep])
    if mode in ("RGBA", "LA"):  # alpha untouched everywhere, inside the hole too
        assert out.getchannel("A").tobytes() == image.getchannel("A").tobytes()


# ------------------------------------------------------------------------------- save, load, dtype
def test_save_pretrained_round_trip(pipe, tmp_path, native_pair, gen):
    pipe.save_pretrained(tmp_path)
    for path in [
        "unet/config.json",
        "unet/model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ]:
        assert (tmp_path / path).is_file(), path
    loaded = InpaintPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert not loaded.unet.training and not loaded.vae.training
    assert loaded.unet.config == pipe.unet.config
    assert loaded.vae.config.scaling_factor == 0.13025
    image, mask = native_pair()
    a = pipe(image, mask, steps=4, generator=gen())
    b = loaded(image, mask, steps=4, generator=gen())
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_networks_keep_float32_sampling(make_pipeline, native_pair, gen, far_from):
    pipe = make_pipeline().to("cpu", torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    image, mask = native_pair()
    steps = []
    out = pipe(image, mask, steps=3, generator=gen(), callback=lambda i, t, x: steps.append(x))
    assert out.size == image.size and all(x.dtype == torch.float32 for x in steps)
    fill = np.asarray(mask) > 127
    assert np.array_equal(np.asarray(out)[far_from(fill, 128)],
                          np.asarray(image)[far_from(fill, 128)])  # fmt: skip


# ------------------------------------------------------------------------------- plan, run, merge
def _small_mask_images(count, size=(300, 200)):
    """`count` noise images of `size` (not native) with one small hole each."""
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
              for _ in range(count)]  # fmt: skip
    fill = np.zeros((size[1], size[0]), bool)
    fill[90:110, 140:170] = True
    return images, [fill.copy() for _ in range(count)]


def test_windows_of_all_images_share_batches(pipe, gen, count_batches):
    images, fills = _small_mask_images(8)
    with count_batches(pipe) as batches:
        outs = pipe(images, fills, steps=2, batch_size=4, generator=gen())
    assert batches == [4, 4]  # 8 windows of 8 images: exactly 2 calls of the tensor core
    assert len(outs) == 8 and all(out.size == (300, 200) for out in outs)
    with count_batches(pipe) as batches:
        pipe(images[:3], fills[:3], steps=2, batch_size=4, generator=gen())
    assert batches == [3]


def test_one_image_with_three_windows_in_chunks(pipe, gen, count_batches):
    image = Image.new("RGB", (1200, 900), (30, 60, 90))
    fill = np.zeros((900, 1200), bool)
    for y, x in ((50, 50), (800, 1100), (450, 600)):
        fill[y : y + 20, x : x + 20] = True
    with count_batches(pipe) as batches:
        pipe(image, fill, steps=2, batch_size=2, margin=16, generator=gen())
    assert batches == [2, 1]


def test_mask_is_normalised_once_per_image_per_call(pipe, gen, monkeypatch):
    calls = []
    prepare = masks.prepare_mask
    monkeypatch.setattr(masks, "prepare_mask", lambda *a, **k: calls.append(1) or prepare(*a, **k))
    images, fills = _small_mask_images(3)
    native = Image.fromarray(np.zeros((128, 128, 3), np.uint8))
    pipe([*images, native], [*fills, np.ones((128, 128), bool)], steps=2, generator=gen())
    assert len(calls) == 4


def test_no_paste_returns_the_raw_window_at_any_size(pipe, gen):
    for size in ((300, 200), (100, 90)):  # a 1:1 window, and a 90-px window shown at 128
        (image,), (fill,) = _small_mask_images(1, size)
        fill[:] = False
        fill[40:60, 30:50] = True
        out = np.asarray(pipe(image, fill, steps=2, paste=False, generator=gen()))
        (window,) = strategies.plan(fill, 128)
        inputs = [composite.window_input(image, fill, window, 128)]
        raw = pipe.inpaint_arrays(inputs, Recipe(steps=2, paste=False), generator=gen())[0]
        raw = np.asarray(composite.resize_image(Image.fromarray(raw), (window.side,) * 2))
        x0, y0, x1, y1 = window.box
        assert np.array_equal(out[y0:y1, x0:x1], raw)  # the generated pixels, not blended
        outside = np.ones(fill.shape, bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(out[outside], np.asarray(image)[outside])  # byte-identical


def test_crop_window_edge_shows_one_feather(pipe, monkeypatch):
    """A constant fill into a constant image: the ramp is one blur of the input's mask."""
    image = Image.new("RGB", (700, 500), (40, 40, 40))
    fill = np.zeros((500, 700), bool)
    fill[150:350, 200:450] = True  # 250 px: window 250 + 2 * 128 = 506 px shown at 128
    constant = 200 / 255 * 2 - 1  # [-1, 1]
    monkeypatch.setattr(pipe, "inpaint_tensors", lambda x, *a, **k: torch.full_like(x, constant))
    out = np.asarray(pipe(image, fill))
    (window,) = strategies.plan(fill, 128)
    soft = composite.blur_mask(fill, composite.feather_radius(window, 128))[..., None]
    fill_value = np.asarray(images_lib.tensor_to_uint8(torch.full((1, 3, 1, 1), 200 / 255)))[
        0, 0, 0, 0
    ]
    expected = np.uint8(((fill_value / 255) * soft + (1 - soft) * (40 / 255)) * 255)
    assert np.array_equal(out, np.repeat(expected, 3, axis=-1))


def test_calls_leave_the_shared_scheduler_untouched(pipe, native_pair, gen):
    before = (pipe.scheduler.num_inference_steps, pipe.scheduler.timesteps.clone())
    image, mask = native_pair()
    pipe(image, mask, steps=3, generator=gen())
    assert pipe.scheduler.num_inference_steps == before[0]
    assert torch.equal(pipe.scheduler.timesteps, before[1])
