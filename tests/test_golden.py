"""Golden values of the tiny seeded pipeline, stored in the repository (tests/data/golden_tiny.npz).

A clone without ../shared still checks numbers: the tiny student + tiny VAE built from seed 0 run
one call with a native-size and a non-native image (crop window, paste) and the tensor core on a
fixed batch; the outputs must match the stored ones. Regenerate after an intended change of the
numbers with `python tests/test_golden.py --write` and say why in the commit message.
"""

import sys

import numpy as np
import torch
from conftest import GOLDEN, noise_pair, seeded, tiny_pipeline
from PIL import Image

from moebius.pipeline import Recipe

FILE = GOLDEN / "golden_tiny.npz"


def compute() -> dict[str, np.ndarray]:
    """The pinned values: two pipeline outputs (uint8) and a sub-sampled tensor-core output."""
    pipe = tiny_pipeline(seed=0)
    native, native_mask = noise_pair(seed=0)  # 128 x 128: the native path
    rng = np.random.default_rng(1)
    other = Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))
    other_fill = np.zeros((150, 200), bool)
    other_fill[60:90, 80:130] = True  # one 150-px crop window shown at 128
    outs = pipe([native, other], [native_mask, other_fill], steps=3, compensate=True,
                generator=seeded(0))  # fmt: skip
    image = torch.rand(2, 3, 128, 128, generator=seeded(2)) * 2 - 1
    fill = torch.zeros(2, 1, 128, 128, dtype=torch.uint8)
    fill[0, :, 20:70, 30:90] = fill[1, :, 64:, :] = 1
    decoded = pipe.inpaint_tensors(image, fill, Recipe(steps=4), generator=seeded(3))  # 3 steps
    return {
        "native": np.asarray(outs[0]),
        "crop": np.asarray(outs[1]),
        "decoded_every_4th": decoded[..., ::4, ::4].numpy(),  # (2, 3, 32, 32)
    }


def test_tiny_pipeline_matches_the_golden_values():
    golden = np.load(FILE)
    got = compute()
    assert sorted(golden.files) == sorted(got)
    diff = np.abs(got["decoded_every_4th"] - golden["decoded_every_4th"])
    assert float(diff.max()) < 1e-4  # the parity tolerance of decoded images
    for name in ("native", "crop"):
        assert got[name].shape == golden[name].shape, name
        pixel_diff = np.abs(got[name].astype(int) - golden[name])
        assert pixel_diff.max() <= 1, name  # truncation to uint8 can flip at an integer boundary
        assert (pixel_diff > 0).mean() <= 0.001, name


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(
            "usage: python tests/test_golden.py --write   (rewrites tests/data/golden_tiny.npz)"
        )
    FILE.parent.mkdir(exist_ok=True)
    np.savez_compressed(FILE, **compute())
    print(FILE, FILE.stat().st_size, "bytes")
