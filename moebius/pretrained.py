"""Whole-pipeline folders: the unet/ + vae/ + scheduler/ triple that `InpaintPipeline` reads and
writes (`from_pretrained` / `save_pretrained`), laid out like the release."""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import DDIMScheduler

from moebius import hub
from moebius import vae as vae_lib
from moebius.models import checkpoints
from moebius.options import DEFAULT_MODEL
from moebius.recipe import make_scheduler


def load_components(files: hub.WeightFiles, *, model: str | None = None, config=None):
    """(unet, vae, scheduler) from resolved weight files (see `moebius.hub.resolve`).

    The unet's architecture comes from its config.json, else `config`, else the released
    architecture of `model`; a mismatch between them is an error that says which to drop.
    """
    if files.unet_config is not None:
        saved = checkpoints.load_config(files.unet_config.parent)
        if config is not None and config != saved:
            raise ValueError(f"config= differs from {files.unet_config}; drop one of them")
        config = saved
    config = config or checkpoints.released_config(model or DEFAULT_MODEL)
    if model is not None and checkpoints.model_type_of(config) != model:
        raise ValueError(
            f"the weights are a {checkpoints.model_type_of(config)!r} model, "
            f"not {model!r}; pass the matching model= / --model"
        )
    unet = checkpoints.load_into(checkpoints.build_model(config), files.unet_weights)
    vae = vae_lib.load_vae(files.vae_dir)
    scheduler = (
        DDIMScheduler.from_pretrained(files.scheduler_dir)
        if files.scheduler_dir is not None
        else make_scheduler()
    )
    return unet, vae, scheduler


def save_components(unet, vae, scheduler, directory: str | os.PathLike) -> Path:
    """Write unet/ (config.json + model.safetensors), vae/ and scheduler/ under `directory`."""
    directory = Path(directory)
    checkpoints.save_pretrained(unet, directory / hub.UNET_FOLDER)
    vae.save_pretrained(directory / hub.VAE_FOLDER, safe_serialization=True)
    scheduler.save_pretrained(directory / hub.SCHEDULER_FOLDER)
    return directory
