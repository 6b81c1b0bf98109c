"""TAESDXL tiny decoder: loading the hub layout, decoding contract, exact x0 previews of DDIM."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from moebius import tiny_decoder
from moebius.models import MoebiusConfig, MoebiusUNet
from moebius.pipeline import InpaintPipeline, make_scheduler


@pytest.fixture(scope="module")
def taesdxl_dir(tmp_path_factory):
    """Random-init AutoencoderTiny in the TAESDXL layout (defaults = madebyollin/taesdxl)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tiny = AutoencoderTiny()
    path = tmp_path_factory.mktemp("taesdxl")
    tiny.save_pretrained(path, safe_serialization=True)
    return path


def test_loads_the_taesdxl_folder_layout(taesdxl_dir):
    names = sorted(p.name for p in taesdxl_dir.iterdir())
    assert names == sorted(tiny_decoder.TAESDXL_FILES)
    tiny = tiny_decoder.load_tiny_decoder(taesdxl_dir)
    assert not tiny.training and tiny.config.scaling_factor == 1.0
    saved = AutoencoderTiny.from_pretrained(taesdxl_dir)
    for (k, a), (_, b) in zip(tiny.state_dict().items(), saved.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    params = sum(p.numel() for p in tiny.decoder.parameters())
    assert 1.0e6 < params < 1.5e6  # TAESDXL's decoder: ~1.2M parameters (the full one: 49.5M)


def test_decode_contract_matches_the_full_vae_decode(taesdxl_dir):
    tiny = tiny_decoder.load_tiny_decoder(taesdxl_dir)
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = tiny_decoder.decode(tiny, latents)
        # The tiny decoder reads the UNet-space latents as they are (no / 0.13025) ...
        want = (tiny.decoder(latents) + 1) / 2
    assert image.shape == (2, 3, 64, 96) and image.dtype == torch.float32
    torch.testing.assert_close(image, want)


def test_loading_errors_teach(tmp_path):
    with pytest.raises(FileNotFoundError, match="madebyollin/taesdxl"):
        tiny_decoder.load_tiny_decoder(tmp_path)
    AutoencoderTiny(latent_channels=16).save_pretrained(tmp_path / "f1")
    with pytest.raises(ValueError, match="4"):
        tiny_decoder.load_tiny_decoder(tmp_path / "f1")
    with pytest.raises(Exception, match="(?i)cache|offline|local"):
        tiny_decoder.load_tiny_decoder(
            tiny_decoder.TAESDXL_REPO, cache_dir=tmp_path / "empty", local_files_only=True
        )


def test_x0_from_consecutive_latents_is_the_schedulers_prediction():
    scheduler = make_scheduler()
    scheduler.set_timesteps(20)
    timesteps = scheduler.timesteps[1:]  # strength 0.99: from t=900
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    spacing = 1000 // 20
    for t in timesteps:
        eps = torch.randn(1, 4, 8, 8, generator=g)
        out = scheduler.step(eps, t, x)
        t_prev = int(t) - spacing
        ab_prev = scheduler.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0
        x0 = tiny_decoder.x0_from_consecutive(
            x.double(), out.prev_sample.double(), float(scheduler.alphas_cumprod[t]), float(ab_prev)
        )
        torch.testing.assert_close(x0.float(), out.pred_original_sample, atol=2e-4, rtol=1e-4)
        x = out.prev_sample


def test_previewer_decodes_the_x0_of_each_step(taesdxl_dir):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
            scaling_factor=0.13025,
        )  # fmt: skip
        pipe = InpaintPipeline(MoebiusUNet(MoebiusConfig.tiny()), vae)
    pipe.set_progress_bar_config(disable=True)
    tiny = tiny_decoder.load_tiny_decoder(taesdxl_dir)
    previews, latents = [], []
    preview = tiny_decoder.Previewer(tiny, pipe.scheduler, lambda i, im: previews.append((i, im)))

    def callback(i, t, x):
        latents.append(x)
        preview(i, t, x)

    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[30:80, 40:90] = True
    from PIL import Image

    pipe(Image.fromarray(image), mask, steps=5, generator=torch.Generator().manual_seed(0),
         callback=callback)  # fmt: skip
    assert [i for i, _ in previews] == [1, 2, 3]  # 4 steps at strength 0.99; from the second
    assert all(im.shape == (1, 3, 128, 128) for _, im in previews)
    # The last step lands on x0 (final alpha_bar = 1): its preview decodes the final latents.
    with torch.no_grad():
        torch.testing.assert_close(previews[-1][1], tiny_decoder.decode(tiny, latents[-1]),
                                   atol=1e-5, rtol=0)  # fmt: skip
    with pytest.raises(ValueError, match="every"):
        tiny_decoder.Previewer(tiny, pipe.scheduler, print, every=0)
