"""TAESDXL tiny decoder: loading the hub layout, decoding contract, exact x0 previews of DDIM."""

import numpy as np
import pytest
import torch
from conftest import noise_pair, seeded, tiny_pipeline
from diffusers import AutoencoderTiny

from moebius import tiny_decoder
from moebius.pipeline import make_scheduler


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
    tiny = tiny_decoder.load_tiny_decoder(taesdxl_dir, dtype=torch.float32)
    assert not tiny.training and tiny.config.scaling_factor == 1.0
    saved = AutoencoderTiny.from_pretrained(taesdxl_dir)
    for (k, a), (_, b) in zip(tiny.state_dict().items(), saved.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    params = sum(p.numel() for p in tiny.decoder.parameters())
    assert 1.0e6 < params < 1.5e6  # TAESDXL's decoder: ~1.2M parameters (the full one: 49.5M)


def test_decode_contract_matches_the_full_vae_decode(taesdxl_dir):
    tiny = tiny_decoder.load_tiny_decoder(taesdxl_dir, dtype=torch.float32)
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = tiny_decoder.decode(tiny, latents)
        # The tiny decoder reads the UNet-space latents as they are (no / 0.13025).
        want = tiny.decoder(latents)
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
    pipe = tiny_pipeline()
    tiny = tiny_decoder.load_tiny_decoder(taesdxl_dir, dtype=torch.float32)
    previews, latents = [], []
    preview = tiny_decoder.Previewer(tiny, pipe.scheduler, lambda i, im: previews.append((i, im)))

    def callback(i, t, x):
        latents.append(x)
        preview(i, t, x)

    image, mask = noise_pair()
    pipe(image, mask, steps=5, generator=seeded(0), callback=callback)
    assert [i for i, _ in previews] == [1, 2, 3]  # 4 steps at strength 0.99; from the second
    assert all(im.shape == (1, 3, 128, 128) for _, im in previews)
    # The last step lands on x0 (final alpha_bar = 1): its preview decodes the final latents.
    with torch.no_grad():
        final = (tiny_decoder.decode(tiny, latents[-1]) + 1) / 2  # previews are in [0, 1]
        torch.testing.assert_close(previews[-1][1], final, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="every"):
        tiny_decoder.Previewer(tiny, pipe.scheduler, print, every=0)


def test_pipeline_decodes_with_the_tiny_decoder_when_given(taesdxl_dir):
    pipe = tiny_pipeline()
    tiny = tiny_decoder.load_tiny_decoder(taesdxl_dir, dtype=torch.float32)
    image, mask = noise_pair()
    noise = pipe.draw_noise(1, generator=seeded(2))
    full = np.asarray(pipe(image, mask, steps=3, noise=noise, paste=False), dtype=np.int16)
    latents = torch.randn(1, 4, 16, 16, generator=seeded(3))
    with torch.no_grad():
        want = tiny_decoder.decode(tiny, latents)
        pipe.decoder = tiny
        torch.testing.assert_close(pipe.decode(latents), want)
    fast = np.asarray(pipe(image, mask, steps=3, noise=noise, paste=False), dtype=np.int16)
    assert fast.shape == full.shape and np.abs(fast - full).mean() > 5  # another decoder ran
    assert pipe.to("cpu", torch.float64).decoder.dtype == torch.float64  # moves with the networks


def test_default_dtype_is_bf16_only_where_native(taesdxl_dir, monkeypatch):
    assert tiny_decoder.fast_dtype("cuda") == torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert tiny_decoder.fast_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert tiny_decoder.fast_dtype("cpu") == torch.float32  # AVX2: bf16 would be emulated
    monkeypatch.undo()
    auto = tiny_decoder.load_tiny_decoder(taesdxl_dir, dtype=torch.bfloat16)
    exact = tiny_decoder.load_tiny_decoder(taesdxl_dir, dtype=torch.float32)
    latents = torch.randn(1, 4, 8, 8, generator=seeded(4))
    with torch.no_grad():
        fast, ref = tiny_decoder.decode(auto, latents), tiny_decoder.decode(exact, latents)
    assert fast.dtype == torch.float32 and auto.dtype == torch.bfloat16
    assert float((fast - ref).abs().mean()) < 0.02 * float(ref.abs().mean())  # bf16 rounding


def test_inpaint_cli_decoder_tiny(taesdxl_dir, tmp_path):
    from PIL import Image

    from moebius import cli

    weights = tiny_pipeline().save_pretrained(tmp_path / "weights")
    image, mask = noise_pair()
    image.save(tmp_path / "im.png")
    mask.save(tmp_path / "mask.png")
    common = ["inpaint", str(tmp_path / "im.png"), str(tmp_path / "mask.png"), "--weights",
              str(weights), "--steps", "3", "--no-paste", "-q"]  # fmt: skip
    assert cli.main([*common, "-o", str(tmp_path / "full.png")]) == 0
    assert cli.main([*common, "-o", str(tmp_path / "tiny.png"), "--decoder", "tiny",
                     "--tiny-decoder", str(taesdxl_dir)]) == 0  # fmt: skip
    full = np.asarray(Image.open(tmp_path / "full.png"), dtype=np.int16)
    tiny = np.asarray(Image.open(tmp_path / "tiny.png"), dtype=np.int16)
    assert full.shape == tiny.shape == (128, 128, 3)
    assert np.abs(full - tiny).mean() > 5  # the other decoder made the pixels
