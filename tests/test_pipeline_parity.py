"""End-to-end parity with the original pipeline: ../shared/reference/pipeline_vector.

The reduced student (../parity) and the reduced VAE run one batched call of the two reference
images with the original's four random draws injected; every traced tensor and both final images
(paste, paste + compensate) must match within the acceptance tolerances.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image
from safetensors.torch import load_file

from moebius import composite, images
from moebius.models import MoebiusConfig, MoebiusUNet
from moebius.pipeline import NOISE_KEYS, InpaintPipeline, category_ids
from moebius.strategies import Window
from moebius.vae import load_vae

DRAW_NAMES = (
    "0_vae_posterior_eps_image",
    "1_vae_posterior_eps_masked_image",
    "2_noise",
    "3_noise_offset",
)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, 1): absolute for O(1) values, relative where they are large."""
    return float(((a - b).abs() / b.abs().clamp_min(1)).max())


@pytest.fixture(scope="module")
def vector():
    return shared_path("reference", "pipeline_vector")


@pytest.fixture(scope="module")
def pipe(vector, tmp_path_factory):
    parity = shared_path("reference", "parity")
    config = json.loads((parity / "config.json").read_text())["config"]
    unet = MoebiusUNet(MoebiusConfig.from_original(config, num_embeddings=20)).eval()
    unet.load_state_dict(load_file(parity / "weights.safetensors"), strict=True)
    vae_dir = tmp_path_factory.mktemp("vae")
    shutil.copy(vector / "vae_config.json", vae_dir / "config.json")
    shutil.copy(vector / "vae_weights.safetensors", vae_dir / "diffusion_pytorch_model.safetensors")
    pipe = InpaintPipeline(unet, load_vae(vae_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def run(pipe, vector):
    """One full pipeline call (paste + compensate) with spies on encode/decode and a step trace."""
    images = [Image.fromarray(np.load(vector / f"input_image_{i}.npy")) for i in range(2)]
    masks = [Image.fromarray(np.load(vector / f"input_mask_{i}.npy")) for i in range(2)]
    draws = load_file(vector / "random_draws.safetensors")
    noise = {key: draws[name] for key, name in zip(NOISE_KEYS, DRAW_NAMES, strict=True)}
    record = {"steps": [], "timesteps": []}
    encode, decode = pipe.encode, pipe.decode

    def spy_encode(*args):
        record["latents"], record["masked_latents"] = encode(*args)
        return record["latents"], record["masked_latents"]

    def spy_decode(latents):
        decoded = decode(latents)  # [-1, 1]
        record["decoded"] = (decoded + 1) / 2  # the original's [0, 1] image
        return decoded

    def on_step(i, t, x):
        record["timesteps"].append(int(t))
        record["steps"].append(x.clone())

    pipe.encode, pipe.decode = spy_encode, spy_decode
    try:
        record["outputs"] = pipe(
            images, masks, noise=noise, paste=True, compensate=True, callback=on_step
        )
    finally:
        del pipe.encode, pipe.decode  # back to the class methods
    record["images"], record["masks"] = images, masks
    return record


def test_prepare_and_ids_match_trace(pipe, run, vector):
    trace = load_file(vector / "trace.safetensors")
    inputs = [composite.window_input(im, np.asarray(m) > 127, Window(0, 0, 256, 256), 256)
              for im, m in zip(run["images"], run["masks"], strict=True)]  # fmt: skip
    image = images.to_tensor(np.stack([pixels for pixels, _ in inputs]))
    mask = torch.from_numpy(np.stack([hole for _, hole in inputs]).astype(np.uint8))[:, None]
    assert torch.equal(image, trace["pre.image"])
    assert torch.equal(mask, trace["pre.mask"])
    cond, negative = category_ids(pipe.unet.config.num_embeddings, "remove")
    assert torch.equal(torch.tensor([negative] * 2 + [cond] * 2), trace["input_ids"])
    assert run["timesteps"] == trace["timesteps"].tolist()  # [900, 850, ..., 0]


def test_latents_per_step_match_trace(run, vector):
    trace = load_file(vector / "trace.safetensors")
    assert max_rel(run["latents"], trace["latents"]) < 1e-4
    assert max_rel(run["masked_latents"], trace["masked_latents"]) < 1e-4
    steps = torch.stack(run["steps"])  # (19, 2, 4, 32, 32)
    assert steps.shape == trace["latents_per_step"][1:].shape
    assert max_rel(steps, trace["latents_per_step"][1:]) < 1e-4


def test_decoded_image_matches_trace(run, vector):
    trace = load_file(vector / "trace.safetensors")
    assert float((run["decoded"] - trace["decoded_image_float"]).abs().max()) < 1e-4


@pytest.mark.parametrize("compensate", [False, True])
def test_final_images_match(pipe, run, vector, compensate):
    if compensate:
        outputs = run["outputs"]  # the full call above
    else:  # both runs of the original share every draw and latent; only the paste differs
        outputs = []
        for result, image, mask in zip(images.tensor_to_uint8(run["decoded"]), run["images"],
                                       run["masks"], strict=True):  # fmt: skip
            out = image.copy()
            composite.merge(out, np.asarray(mask) > 127, Window(0, 0, 256, 256), result, 256)
            outputs.append(out)
    name = "output_paste_compensate" if compensate else "output_paste"
    for i, out in enumerate(outputs):
        reference = np.load(vector / f"{name}_{i}.npy")
        assert out.mode == "RGB" and out.size == (256, 256)
        diff = np.abs(np.asarray(out).astype(int) - reference)
        assert diff.max() <= 1  # truncation to uint8 can flip at an integer boundary
        assert (diff > 0).mean() <= 0.001
