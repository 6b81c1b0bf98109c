"""Training checkpoints (everything a run needs to continue exactly) and the exported weights.

Layout under the run's output folder:
  checkpoints/step-NNNNNNNN/   model.safetensors (student, plain released keys), ema.pt (if EMA),
                               state.pt (optimizer, lr scheduler, RNG states, data position, step),
                               config.json (the run's resolved TrainConfig)
  final/                       InpaintPipeline.save_pretrained layout: unet/ (config.json +
                               model.safetensors + the released-layout diffusion_pytorch_model.bin),
                               vae/, scheduler/
A checkpoint is written to a temporary folder and renamed into place, so a crash mid-save never
leaves a half checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moebius import hub
from moebius.errors import MissingFileError
from moebius.models import checkpoints as model_io

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINAL = "final"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.pt"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step (temporary folders are ignored)."""
    root = Path(output_dir) / CHECKPOINTS
    found = sorted(
        (int(m.group(1)), p)
        for p in (root.iterdir() if root.is_dir() else ())
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    )
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------------- RNG states
def rng_states(generator: torch.Generator) -> dict:
    """Every RNG a step may touch: the loop's generator, torch (CPU, CUDA), numpy, python."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy / python states as plain lists, so the file loads with weights_only=True
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    """Inverse of `rng_states`."""
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------- save, load
def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Student state dict with the released keys on CPU (a DDP wrapper is unwrapped first)."""
    model = getattr(model, "module", model)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    state: dict,
    config_json: str,
    ema=None,
    keep: int = 0,
) -> Path:
    """Write checkpoints/step-NNNNNNNN atomically; keep the newest `keep` (0 = all)."""
    final = step_dir(output_dir, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_plain_state(model), str(tmp / MODEL_FILE))
    if ema is not None:
        torch.save(ema.state_dict(), tmp / EMA_FILE)
    torch.save({**state, "step": step}, tmp / STATE_FILE)
    (tmp / "config.json").write_text(config_json)
    if final.exists():  # the same step saved again (e.g. on a signal right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    logger.info("saved checkpoint %s", final)
    if keep > 0:
        old = sorted(p for p in final.parent.iterdir() if _STEP_DIR.match(p.name))[:-keep]
        for path in old:
            shutil.rmtree(path)
    return final


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, ema=None) -> dict:
    """Load weights (and EMA) into the given objects; return the state dict of state.pt."""
    path = Path(path)
    getattr(model, "module", model).load_state_dict(load_file(str(path / MODEL_FILE)), strict=True)
    if ema is not None:
        if not (path / EMA_FILE).is_file():
            raise MissingFileError(
                f"{path} has no {EMA_FILE}: the run that wrote it trained without EMA; resume "
                "with optim.ema=false or start a new run"
            )
        ema.load_state_dict(torch.load(path / EMA_FILE, map_location="cpu", weights_only=True))
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def export_final(output_dir: str | os.PathLike, model: torch.nn.Module, vae, scheduler) -> Path:
    """Write final/ in the pipeline's save_pretrained layout plus the released .bin; atomic."""
    from moebius.pipeline import InpaintPipeline

    final = Path(output_dir) / FINAL
    tmp = final.with_name(f".tmp-{FINAL}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    student = getattr(model, "module", model)
    was_training = student.training
    InpaintPipeline(student, vae, scheduler).save_pretrained(tmp)  # puts the networks in eval()
    student.train(was_training)
    model_io.save_original(student, tmp / hub.UNET_FOLDER / hub.RELEASED_WEIGHTS_NAME)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    logger.info("exported %s (InpaintPipeline.from_pretrained / moebius inpaint --weights)", final)
    return final
