"""Evaluation folders: which files are images, how masks pair with them, per-image seeds, shards.

Every per-image random choice (mask, diffusion noise) comes from a seed derived from the run's
seed and the image's file name, never from global state or the file's position in a list, so a
result does not depend on which process made it. Under `torchrun` each rank takes the slice
`names[rank::world_size]` of the sorted names: disjoint, deterministic, together all of them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"  # NAME.ext's mask is NAME_mask.png (the convention of ../shared/data)
MASKS_JSON = "masks.json"


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of `folder` sorted by name; NAME_mask.* files beside them are not images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist or is not a folder")
    images = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not p.name.startswith(".")
        and not p.stem.endswith(MASK_SUFFIX)
    ]
    stems = [p.stem for p in images]
    twins = sorted({s for s in stems if stems.count(s) > 1})
    if twins:
        raise ValueError(
            f"{folder} has several images with the same name stem ({', '.join(twins[:5])}); "
            "outputs are named NAME.png, so rename one of each pair"
        )
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return images


def mask_path(mask_dir: Path, stem: str) -> Path:
    """The mask of image NAME: MASK_DIR/NAME_mask.png, else MASK_DIR/NAME.png."""
    for name in (f"{stem}{MASK_SUFFIX}.png", f"{stem}.png"):
        if (mask_dir / name).is_file():
            return mask_dir / name
    raise FileNotFoundError(f"no mask for {stem} in {mask_dir}: expected {stem}{MASK_SUFFIX}.png")


def name_seed(seed: int, name: str) -> np.random.SeedSequence:
    """A SeedSequence from the run's seed and a file name (SHA-256, so any platform agrees)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]
    return np.random.SeedSequence([int(seed), *words])


def image_rng(seed: int, name: str) -> np.random.Generator:
    """The numpy Generator of one image (mask drawing)."""
    return np.random.default_rng(name_seed(seed, name))


def image_torch_seed(seed: int, name: str) -> int:
    """A 63-bit torch seed for one image (diffusion noise)."""
    return int(name_seed(seed, name).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Shard:
    """This process's place among the processes of a `torchrun` launch (1 process otherwise)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; defaults to one process."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                   int(env.get("LOCAL_RANK", 0)))  # fmt: skip

    def take(self, items: list) -> list:
        """This rank's disjoint, deterministic slice of the sorted `items`."""
        return items[self.rank :: self.world_size]


class ProcessGroup:
    """`with ProcessGroup(shard, backend):` joins the torchrun group (if several processes)."""

    def __init__(self, shard: Shard, backend: str = "gloo"):
        self.shard, self.backend, self.active = shard, backend, False

    def __enter__(self) -> ProcessGroup:
        if self.shard.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(self.backend)
                self.active = True
        return self

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (just [obj] with one process)."""
        if self.shard.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.shard.world_size
        dist.all_gather_object(out, obj)
        return out

    def __exit__(self, *exc) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()
