"""Shared test fixtures: paths to ../shared, the tiny seeded pipeline, inputs and spies.

Tests take the helpers as fixtures (test files never import each other): a fixture that returns
a function is a factory, e.g. `def test_x(make_pipeline, gen): pipe = make_pipeline(seed=1)`.
The plain functions behind them are importable for module-level fixtures (`from conftest import`).
"""

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = Path(__file__).resolve().parent / "data"  # small in-repo fixtures (golden values)


def shared_path(*parts: str) -> Path:
    """Path into ../shared: skips when absent on a user's machine, fails when CI=true."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI always has ../shared, so the path is wrong")
        pytest.skip(f"{path} not found (reference material lives in ../shared beside the checkout)")
    return path


def tiny_vae_model(levels: int = 4, scaling_factor: float = 0.13025):
    """A ~67k-parameter AutoencoderKL with the released block types (8x for 4 levels)."""
    from diffusers import AutoencoderKL

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


def tiny_pipeline(seed: int = 0, levels: int = 4):
    """Tiny student (16x16 latent) + tiny VAE: native size 128 px, seeded, no progress bars."""
    from moebius.models import MoebiusConfig, MoebiusUNet
    from moebius.pipeline import InpaintPipeline

    with torch.random.fork_rng():  # diffusers initialises from the global RNG; keep it local
        torch.manual_seed(seed)
        pipe = InpaintPipeline(MoebiusUNet(MoebiusConfig.tiny()), tiny_vae_model(levels))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def far_from_mask(fill: np.ndarray, native: int, cell: int = 8) -> np.ndarray:
    """Pixels surely beyond the widest feather any window of this image can use.

    Dilation on a grid of `cell` x `cell` blocks (a superset of the exact dilation by `reach`),
    so 2048-px photos with a 150-px reach stay fast.
    """
    from moebius import composite

    scale = max(max(fill.shape), native) / native
    reach = composite.feather_reach(composite.PASTE_BLUR_RADIUS * scale)
    r = reach // cell + 1  # cells between a pixel and a mask pixel at most `reach` away
    coarse = F.max_pool2d(torch.from_numpy(fill.astype(np.float32))[None, None], cell,
                          ceil_mode=True)  # fmt: skip
    near = F.max_pool2d(coarse, 2 * r + 1, stride=1, padding=r)[0, 0].numpy() > 0
    near = near.repeat(cell, axis=0).repeat(cell, axis=1)[: fill.shape[0], : fill.shape[1]]
    return ~near


def noise_pair(side: int = 128, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """A noise RGB image and an 'L' mask with one 50 x 40 hole."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    mask = np.zeros((side, side), np.uint8)
    mask[40:90, 30:70] = 255
    return image, Image.fromarray(mask)


def load_photo(name: str) -> tuple[Image.Image, Image.Image]:
    """A real photo of ../shared/data/photos and its mask."""
    from moebius.images import load_image

    folder = shared_path("data", "photos")
    stem = name.rsplit(".", 1)[0]
    return load_image(folder / name), load_image(folder / f"{stem}_mask.png")


@contextmanager
def count_core_batches(pipe):
    """Record the batch size of every call of the tensor core `pipe.inpaint_tensors`."""
    batches, core = [], pipe.inpaint_tensors

    def spy(image, *args, **kwargs):
        batches.append(image.shape[0])
        return core(image, *args, **kwargs)

    pipe.inpaint_tensors = spy
    try:
        yield batches
    finally:
        del pipe.inpaint_tensors  # back to the class method


@pytest.fixture(scope="module")
def pipe():
    """The tiny seeded pipeline (native 128 px), shared by the tests of a module."""
    return tiny_pipeline()


@pytest.fixture
def make_pipeline():
    return tiny_pipeline


@pytest.fixture
def tiny_vae():
    return tiny_vae_model


@pytest.fixture
def gen():
    return seeded


@pytest.fixture
def far_from():
    return far_from_mask


@pytest.fixture
def native_pair():
    return noise_pair


@pytest.fixture
def photo():
    return load_photo


@pytest.fixture
def count_batches():
    return count_core_batches
