"""Latent cache: the VAE posteriors of K augmented draws of every manifest row, computed once.

`cache_latents` runs the dataset's augmentation (mask, dilation, crop, flip) K times per row and
stores, per row, `DIR/row-NNNNNN.safetensors` with [K, 4, h, w] posterior `*_mean` / `*_logvar`
of the image and of the masked image, the [K, 1, h, w] latent mask and the [K, 10] category ids;
`DIR/index.json` records the VAE's scaling factor and the settings. Training from the cache never
runs the VAE encoder, yet stays stochastic: every step samples z = mean + exp(logvar / 2) * eps
afresh (loop.posterior_latents), and each epoch picks one of the K draws per row at random.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moebius import masks
from moebius.errors import MissingFileError, UsageError
from moebius.train.data import InpaintDataset, read_manifest, sample_rng

logger = logging.getLogger(__name__)

INDEX = "index.json"


def _row_file(directory: Path, index: int) -> Path:
    return directory / f"row-{index:06d}.safetensors"


@torch.no_grad()
def cache_latents(
    manifest: str | os.PathLike,
    vae,
    out: str | os.PathLike,
    *,
    variants: int = 8,
    seed: int = 42,
    resolution: int = 512,
    mask_protocol: str = "medium_512",
    progress: bool = True,
    **dataset_options,
) -> Path:
    """Write the cache of `manifest` under `out` with `variants` augmented draws per row."""
    if variants < 1:
        raise UsageError(f"variants must be >= 1, got {variants}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = InpaintDataset(read_manifest(manifest), resolution, mask_protocol, seed=seed,
                             **dataset_options)  # fmt: skip
    device, dtype = vae.device, vae.dtype
    for index in tqdm(range(len(dataset)), desc="cache-latents", unit="row", disable=not progress):
        # draw k is the dataset's sample for "epoch" k: the stream training without a cache sees
        samples = [dataset.sample(index, sample_rng(seed, k, index)) for k in range(variants)]
        tensors = {}
        for key, name in (("image", "latent"), ("masked_image", "masked_latent")):
            pixels = torch.stack([s[key] for s in samples]).to(device, dtype)
            posterior = vae.encode(pixels).latent_dist
            tensors[f"{name}_mean"] = posterior.mean.float().cpu().contiguous()
            tensors[f"{name}_logvar"] = posterior.logvar.float().cpu().contiguous()
        pixel_mask = torch.stack([s["mask"] for s in samples]).float()
        tensors["latent_mask"] = masks.latent_mask(pixel_mask, tensors["latent_mean"].shape[-2:])
        tensors["input_ids"] = torch.stack([s["input_ids"] for s in samples])
        save_file(tensors, str(_row_file(out, index)))
    info = {
        "rows": len(dataset), "variants": variants, "seed": seed, "resolution": resolution,
        "mask_protocol": mask_protocol, "scaling_factor": float(vae.config.scaling_factor),
        "manifest": str(Path(manifest).resolve()),
    }  # fmt: skip
    (out / INDEX).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("cached %d rows x %d draws in %s", len(dataset), variants, out)
    return out


class LatentDataset(torch.utils.data.Dataset):
    """A latent cache as a dataset indexed by `(index, epoch)` like `InpaintDataset`."""

    def __init__(self, directory: str | os.PathLike, seed: int = 42):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if not index.is_file():
            raise MissingFileError(
                f"{self.directory} is not a latent cache (no {INDEX}); make one with "
                "`moebius train cache-latents MANIFEST --vae VAE --out DIR`"
            )
        self.info = json.loads(index.read_text())
        self.seed = seed

    def __len__(self) -> int:
        return self.info["rows"]

    def check_vae(self, vae) -> None:
        """The cache must come from the VAE the run decodes with (same scaling factor)."""
        if abs(self.info["scaling_factor"] - float(vae.config.scaling_factor)) > 1e-9:
            raise UsageError(
                f"latent cache {self.directory} was made with scaling factor "
                f"{self.info['scaling_factor']}, the run's VAE has {vae.config.scaling_factor}; "
                "rebuild the cache with the run's VAE"
            )

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        k = int(sample_rng(self.seed, epoch, index).integers(self.info["variants"]))
        tensors = load_file(str(_row_file(self.directory, index)))
        return {name: t[k] for name, t in tensors.items()} | {"index": index}
