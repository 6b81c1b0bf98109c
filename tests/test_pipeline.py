"""InpaintPipeline with tiny random-weight components: recipe facts, any size, modes, I/O."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path
from diffusers import AutoencoderKL
from PIL import Image

from moebius import masks, strategies
from moebius import vae as vae_lib
from moebius.images import gray_to_8bit, load_image
from moebius.masks import MaskError
from moebius.models import MoebiusConfig, MoebiusUNet
from moebius.pipeline import NOISE_KEYS, InpaintPipeline, Recipe, category_ids


def tiny_vae(levels: int = 4, scaling_factor: float = 0.13025) -> AutoencoderKL:
    """A ~67k-parameter AutoencoderKL with the released block types (8x for 4 levels)."""
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16)[:levels],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=scaling_factor,
    ).eval()


def tiny_pipeline(seed: int = 0) -> InpaintPipeline:
    """Tiny student (16x16 latent) + tiny VAE: native size 128 px, seeded, no progress bars."""
    with torch.random.fork_rng():  # diffusers initialises from the global RNG; keep it local
        torch.manual_seed(seed)
        pipe = InpaintPipeline(MoebiusUNet(MoebiusConfig.tiny()), tiny_vae())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def far_from(fill: np.ndarray, native: int, cell: int = 8) -> np.ndarray:
    """Pixels surely beyond the widest feather the strategies can use for this image size.

    Dilation on a grid of `cell` x `cell` blocks (a superset of the exact dilation by `reach`),
    so 2048-px photos with a 150-px reach stay fast.
    """
    radius = strategies.feather_radius(max(fill.shape), native)
    reach = strategies.feather_reach(max(radius, masks.PASTE_BLUR_RADIUS))
    r = reach // cell + 1  # cells between a pixel and a mask pixel at most `reach` away
    coarse = F.max_pool2d(torch.from_numpy(fill.astype(np.float32))[None, None], cell,
                          ceil_mode=True)  # fmt: skip
    near = F.max_pool2d(coarse, 2 * r + 1, stride=1, padding=r)[0, 0].numpy() > 0
    near = near.repeat(cell, axis=0).repeat(cell, axis=1)[: fill.shape[0], : fill.shape[1]]
    return ~near


def photo(name: str) -> tuple[Image.Image, Image.Image]:
    folder = shared_path("data", "photos")
    stem = name.rsplit(".", 1)[0]
    return load_image(folder / name), load_image(folder / f"{stem}_mask.png")


def native_pair(side: int = 128, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    mask = np.zeros((side, side), np.uint8)
    mask[40:90, 30:70] = 255
    return image, Image.fromarray(mask)


class RunSpy:
    """Counts the native-size batches a pipeline runs (wraps `pipe.run`)."""

    def __init__(self, pipe):
        self.pipe, self.batches, self.run = pipe, [], pipe.run

    def __enter__(self):
        def spy(images, *args, **kwargs):
            self.batches.append(len(images))
            return self.run(images, *args, **kwargs)

        self.pipe.run = spy
        return self

    def __exit__(self, *exc):
        del self.pipe.run


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


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


def test_native_size_and_latent_factor_come_from_configs(pipe):
    assert pipe.native_size == 16 * 8
    small = InpaintPipeline(MoebiusUNet(MoebiusConfig.tiny()), tiny_vae(levels=3))
    assert vae_lib.latent_factor(small.vae) == 4 and small.native_size == 64


def test_encode_and_decode_use_the_configs_scaling_factor():
    vae = tiny_vae(scaling_factor=0.5)
    x = torch.rand(1, 3, 64, 64, generator=gen()) * 2 - 1
    eps = torch.randn(1, 4, 8, 8, generator=gen(1))
    posterior = vae.encode(x).latent_dist
    with torch.no_grad():
        z = vae_lib.encode(vae, x, eps)
        torch.testing.assert_close(z, (posterior.mean + posterior.std * eps) * 0.5)
        decoded = vae_lib.decode(vae, z)
        torch.testing.assert_close(decoded, (vae.decode(z / 0.5).sample + 1) / 2)


def test_recipe_validates_with_teaching_errors():
    with pytest.raises(ValueError, match="needs paste=True"):
        Recipe(paste=False, compensate=True)
    with pytest.raises(ValueError, match="strength must lie in"):
        Recipe(strength=0.01)
    with pytest.raises(ValueError, match="positive integer"):
        Recipe(steps=0)


# ------------------------------------------------------------------------------- native size
def test_noise_injection_equals_drawing_from_the_generator(pipe):
    image, mask = native_pair()
    draws = pipe.draw_noise(1, generator=gen(3))
    assert list(draws) == list(NOISE_KEYS) and draws["latent_offset"].shape == (1, 4, 1, 1)
    injected = pipe(image, mask, steps=4, noise=draws)
    drawn = pipe(image, mask, steps=4, generator=gen(3))
    assert np.array_equal(np.asarray(injected), np.asarray(drawn))


def test_wrong_noise_shapes_are_explained(pipe):
    image, mask = native_pair()
    draws = pipe.draw_noise(2, generator=gen())
    with pytest.raises(ValueError, match=r"\[1, 4, 16, 16\]"):
        pipe(image, mask, steps=4, noise=draws)
    with pytest.raises(ValueError, match="not both"):
        pipe(image, mask, steps=4, noise=pipe.draw_noise(1), generator=gen())


def test_native_batch_is_one_run_and_pastes(pipe):
    pairs = [native_pair(seed=s) for s in (0, 1)]
    with RunSpy(pipe) as spy:
        outs = pipe([p[0] for p in pairs], [p[1] for p in pairs], steps=4, generator=gen())
    assert spy.batches == [2]
    for (image, mask), out in zip(pairs, outs, strict=True):
        fill = np.asarray(mask) > 127
        a, b = np.asarray(image), np.asarray(out)
        assert np.array_equal(a[far_from(fill, 128)], b[far_from(fill, 128)])
        assert (a[fill] != b[fill]).any()


def test_run_rejects_other_sizes(pipe):
    image, mask = native_pair(side=96)
    with pytest.raises(ValueError, match="native size 128x128"):
        pipe.run([image], [mask])


def test_task_object_swaps_the_guidance(pipe):
    image, mask = native_pair()
    remove = np.asarray(pipe(image, mask, steps=4, generator=gen()))
    obj = np.asarray(pipe(image, mask, steps=4, generator=gen(), task="object"))
    assert not np.array_equal(remove, obj)


# ------------------------------------------------------------------------------- any size
@pytest.mark.parametrize("name", ["skimage_chelsea.png", "lomiri_wine.jpg"])
def test_photo_keeps_size_and_unmasked_pixels(pipe, name):
    image, mask = photo(name)
    with RunSpy(pipe) as spy:
        out = pipe(image, mask, steps=4, generator=gen())
    assert spy.batches == [1]  # both photos have two blobs, close enough to share one window
    assert out.size == image.size and out.mode == "RGB"
    fill = np.asarray(mask) > 127
    a, b = np.asarray(image), np.asarray(out)
    assert np.array_equal(a[far_from(fill, 128)], b[far_from(fill, 128)])
    assert (a[fill] != b[fill]).mean() > 0.5


def test_same_seed_same_output_other_seed_differs(pipe):
    image, mask = photo("skimage_chelsea.png")
    first, second = (np.asarray(pipe(image, mask, steps=4, generator=gen(7))) for _ in range(2))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, np.asarray(pipe(image, mask, steps=4, generator=gen(8))))


def test_huge_photo_with_small_mask_costs_one_native_run(pipe):
    ramp = np.linspace(0, 255, 6000, dtype=np.float32).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(ramp[None, :, None], (4000, 6000, 3)).copy())
    fill = np.zeros((4000, 6000), bool)
    fill[2000:2040, 3000:3030] = True
    with RunSpy(pipe) as spy:
        out = pipe(image, fill, steps=2, generator=gen())
    assert spy.batches == [1]
    a, b = np.asarray(image), np.asarray(out)
    assert np.array_equal(a[far_from(fill, 128)], b[far_from(fill, 128)])


def test_resize_strategy(pipe):
    image, mask = photo("skimage_coffee.png")
    out = pipe(image, mask, steps=4, generator=gen(), strategy="resize")
    fill = np.asarray(mask) > 127
    assert out.size == image.size
    a, b = np.asarray(image), np.asarray(out)
    assert np.array_equal(a[far_from(fill, 128)], b[far_from(fill, 128)])


def test_empty_mask_returns_the_input_without_running(pipe):
    image = native_pair()[0].convert("RGBA")
    with RunSpy(pipe) as spy:
        out = pipe(image, Image.new("L", image.size, 0))
    assert spy.batches == [] and out.mode == "RGBA"
    assert out.tobytes() == image.tobytes() and out is not image


def test_mask_of_another_size_is_an_error_unless_resized(pipe):
    image, mask = photo("skimage_chelsea.png")
    small = mask.resize((200, 100), Image.Resampling.NEAREST)
    with pytest.raises(MaskError, match=r"200x100.*451x300"):
        pipe(image, small, steps=4)
    assert pipe(image, small, steps=4, resize_mask=True, generator=gen()).size == image.size


def test_invert_mask_and_dilation(pipe):
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
def test_modes_are_restored(pipe, mode):
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
def test_save_pretrained_round_trip(pipe, tmp_path):
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


def test_bfloat16_networks_keep_float32_sampling():
    pipe = tiny_pipeline().to("cpu", torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    image, mask = native_pair()
    steps = []
    out = pipe(image, mask, steps=3, generator=gen(), callback=lambda i, t, x: steps.append(x))
    assert out.size == image.size and all(x.dtype == torch.float32 for x in steps)
    fill = np.asarray(mask) > 127
    assert np.array_equal(np.asarray(out)[far_from(fill, 128)],
                          np.asarray(image)[far_from(fill, 128)])  # fmt: skip
