"""Weight resolution: local folders (ours, released layout), the hub cache, offline errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import far_from_mask as far_from
from conftest import noise_pair as native_pair
from conftest import seeded as gen
from conftest import tiny_pipeline
from huggingface_hub import constants

from moebius import hub
from moebius.cli import main
from moebius.models import MoebiusConfig, checkpoints
from moebius.pipeline import InpaintPipeline

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def save_released(pipe: InpaintPipeline, root, variant: str = "ft_places2") -> None:
    """The released layout: `<variant>/diffusion_pytorch_model.bin` (bf16) and `vae/` (.bin)."""
    checkpoints.save_original(pipe.unet, root / variant / hub.RELEASED_WEIGHTS_NAME, torch.bfloat16)
    pipe.vae.save_pretrained(root / "vae", safe_serialization=False)


def fill_hub_cache(pipe: InpaintPipeline, cache, variant: str = "ft_places2") -> None:
    """A Hugging Face cache holding the released files of hustvl/Moebius and hustvl/PixelHacker."""
    for repo in ("hustvl/Moebius", "hustvl/PixelHacker"):
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(COMMIT)
    snapshot = cache / "models--hustvl--Moebius" / "snapshots" / COMMIT
    checkpoints.save_original(pipe.unet, snapshot / variant / hub.RELEASED_WEIGHTS_NAME)
    pipe.vae.save_pretrained(
        cache / "models--hustvl--PixelHacker" / "snapshots" / COMMIT / "vae",
        safe_serialization=False,
    )


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def outputs_equal(a: InpaintPipeline, b: InpaintPipeline) -> bool:
    image, mask = native_pair()
    b.set_progress_bar_config(disable=True)
    first = a(image, mask, steps=3, generator=gen())
    second = b(image, mask, steps=3, generator=gen())
    return np.array_equal(np.asarray(first), np.asarray(second))


def test_hub_cache_is_used_offline(tmp_path, offline, capsys):
    pipe = tiny_pipeline()
    fill_hub_cache(pipe, tmp_path)
    loaded = InpaintPipeline.from_pretrained(
        "hustvl/Moebius", variant="ft_places2", cache_dir=tmp_path, config=MoebiusConfig.tiny()
    )
    assert outputs_equal(pipe, loaded)
    files = hub.resolve(None, "ft_places2", cache_dir=tmp_path)
    assert files.unet_weights.parts[-2:] == ("ft_places2", "diffusion_pytorch_model.bin")
    assert files.vae_dir.name == "vae" and "PixelHacker" in str(files.vae_dir)
    assert hub.download("ft_places2", cache_dir=tmp_path) == files  # cached: nothing to fetch
    assert main(["download", "--variant", "ft_places2", "--cache-dir", str(tmp_path)]) == 0
    assert str(files.unet_weights) in capsys.readouterr().out


def test_released_layout_folder_with_bf16_bin(tmp_path):
    pipe = tiny_pipeline()
    save_released(pipe, tmp_path, "ft_ffhq")
    loaded = InpaintPipeline.from_pretrained(tmp_path, variant="ft_ffhq",
                                             config=MoebiusConfig.tiny())  # fmt: skip
    assert loaded.dtype == torch.float32 and not loaded.unet.training
    # the file was stored in bfloat16, so the weights equal the source rounded to bf16
    ref = pipe.unet.state_dict()["embedding_layer.weight"].to(torch.bfloat16).float()
    assert torch.equal(loaded.unet.state_dict()["embedding_layer.weight"], ref)
    with pytest.raises(checkpoints.CheckpointError, match="does not fit"):
        InpaintPipeline.from_pretrained(tmp_path, variant="ft_ffhq")  # the released architecture


def test_missing_weights_offline_lists_files_fast(tmp_path, offline):
    with pytest.raises(hub.WeightsNotFoundError) as err:
        hub.resolve(None, "ft_celebahq", cache_dir=tmp_path)
    message = str(err.value)
    for line in [
        "hustvl/Moebius: ft_celebahq/diffusion_pytorch_model.bin",
        "hustvl/PixelHacker: vae/config.json",
        "hustvl/PixelHacker: vae/diffusion_pytorch_model.bin",
        "moebius download --model moebius --variant ft_celebahq",
        "DIR/ft_celebahq/diffusion_pytorch_model.bin",
        "--weights DIR",
        "HF_HUB_OFFLINE",
    ]:
        assert line in message


def test_unreachable_hub_fails_fast_without_retries(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    assert hub._hub_reachable(timeout=1.0) is False
    with pytest.raises(hub.WeightsNotFoundError, match="cannot be reached"):
        hub.resolve(None, "pretrained", model="pixelhacker", cache_dir=tmp_path)


def test_incomplete_released_layout_names_the_variant_file(tmp_path):
    tiny_pipeline().vae.save_pretrained(tmp_path / "vae", safe_serialization=False)
    with pytest.raises(hub.WeightsNotFoundError) as err:
        hub.resolve(tmp_path, "ft_celebahq")
    message = str(err.value)
    assert "\n" not in message and f"{tmp_path} is not a complete moebius weights folder" in message
    assert listed(message) == ["ft_celebahq/diffusion_pytorch_model.bin"]


def test_incomplete_local_folder_names_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(hub.WeightsNotFoundError) as err:
        hub.resolve(tmp_path)
    assert listed(str(err.value)) == ["unet/model.safetensors", "vae/config.json",
                                      "vae/diffusion_pytorch_model.safetensors"]  # fmt: skip


def listed(message: str) -> list[str]:
    """The files a "not a complete weights folder" message names as missing."""
    return message.split("weights folder: ")[1].split(" missing.")[0].split(", ")


def test_teacher_files_and_choices():
    files = hub.released_files("ft_places2", "pixelhacker")
    assert [(f.repo, f.filename) for f in files] == [
        ("hustvl/PixelHacker", "ft_places2/diffusion_pytorch_model.bin"),
        ("hustvl/PixelHacker", "vae/config.json"),
        ("hustvl/PixelHacker", "vae/diffusion_pytorch_model.bin"),
    ]
    with pytest.raises(ValueError, match="pretrained, ft_places2, ft_celebahq, ft_ffhq"):
        hub.released_files("places2")
    with pytest.raises(hub.WeightsNotFoundError, match="does not exist"):
        hub.resolve("./no/such/folder")


def test_teacher_through_the_same_pipeline(tmp_path):
    from moebius.models.teacher import PixelHackerConfig, PixelHackerUNet

    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = InpaintPipeline(PixelHackerUNet(PixelHackerConfig.tiny()), tiny_pipeline().vae)
    teacher.save_pretrained(tmp_path)
    loaded = InpaintPipeline.from_pretrained(tmp_path, model="pixelhacker")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.native_size == PixelHackerConfig.tiny().sample_size * 8 == 256
    image, mask = native_pair(side=300)  # not native: one 256-px crop window
    out = np.asarray(loaded(image, mask, steps=3, generator=gen()))
    fill = np.asarray(mask) > 127
    assert np.array_equal(out[far_from(fill, 256)], np.asarray(image)[far_from(fill, 256)])
    assert (out[fill] != np.asarray(image)[fill]).mean() > 0.5
    with pytest.raises(ValueError, match="'pixelhacker' model, not 'moebius'"):
        InpaintPipeline.from_pretrained(tmp_path, model="moebius")


def test_light_modules_do_not_import_torch():
    code = ("import sys, moebius, moebius.hub, moebius.cli; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules; "
            "import moebius.pipeline, moebius.images; "
            "assert moebius.InpaintPipeline is moebius.pipeline.InpaintPipeline; "
            "assert moebius.load_image is moebius.images.load_image")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
