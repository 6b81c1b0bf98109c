"""The networks of a training run: seeded student, frozen teacher, VAE, perceptual metric.

`build_networks(config)` turns the `model` section of a `TrainConfig` into modules (CPU, fp32,
seeded random init or loaded weights); gradient checkpointing of the student is switched on
here so that a checkpointed block's BatchNorms update their running statistics only once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from moebius import vae as vae_lib
from moebius.errors import MissingFileError, UsageError
from moebius.models import checkpoints as model_io
from moebius.train.config import TrainConfig

logger = logging.getLogger(__name__)


def tiny_vae(seed: int = 0):
    """A ~67k-parameter AutoencoderKL with the released block types (8x), seeded, for tests."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global RNG
        torch.manual_seed(seed)
        return AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=128,
            scaling_factor=0.13025,
        )


def load_vae(name: str, init_seed: int = 0):
    """The VAE folder `name`, or "tiny": `tiny_vae(init_seed + 2)`; frozen, eval mode."""
    vae = tiny_vae(init_seed + 2) if name == "tiny" else vae_lib.load_vae(name)
    return vae.requires_grad_(False).eval()


def _seeded_model(config, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # random init from the seed, global RNG untouched
        torch.manual_seed(seed)
        return model_io.build_model(config)


def _architecture(kind: str, model_type: str):
    """The config of `model_type` ("moebius", "pixelhacker") for `kind` "released" or "tiny"."""
    config = model_io.released_config(model_type)
    if kind == "tiny":
        return type(config).tiny()
    if kind != "released":
        raise UsageError(f'a network architecture is "released" or "tiny", got {kind!r}')
    return config


def _load_weights(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """A weights file (.bin / .safetensors) or a model folder (save_pretrained / unet/)."""
    p = Path(path)
    if p.is_dir():
        folder = p / "unet" if (p / "unet").is_dir() else p
        name = next((n for n in model_io.UNET_WEIGHTS_NAMES if (folder / n).is_file()), None)
        if name is None:
            raise MissingFileError(f"no weights ({model_io.UNET_WEIGHTS_NAMES}) in {folder}")
        p = folder / name
    return model_io.load_into(model, p)


@dataclass
class Networks:
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    vae: torch.nn.Module  # encodes the batches (unless a latent cache is used); saved in final/
    perceptual: torch.nn.Module | None = None  # the E-LatentLPIPS metric when the term is on


def resolve_perceptual(config: TrainConfig, device) -> tuple[TrainConfig, torch.nn.Module | None]:
    """The E-LatentLPIPS metric when loss.perceptual is on and it can be built, else the term off.

    The metric needs the user's E-LatentLPIPS weights file, `loss.perceptual_weights` (spec 3.2;
    nothing is downloaded here). When it is absent, the run trains without the term and says so
    at start.
    """
    if not config.loss.perceptual:
        return config, None
    try:
        from moebius.train.perceptual import load_perceptual

        loss = config.loss
        metric = load_perceptual(
            loss.perceptual_weights, device, original_scaling=loss.perceptual_original_scaling
        )
        return config, metric
    except (ImportError, OSError, RuntimeError) as err:
        logger.warning(
            "perceptual loss OFF: the E-LatentLPIPS metric is unavailable (%s: %s); "
            "set loss.perceptual=false to silence this",
            type(err).__name__,
            err,
        )
        loss = config.loss.replace(perceptual=False)
        return dataclasses.replace(config, loss=loss), None


def build_networks(config: TrainConfig) -> Networks:
    """Student (train mode), frozen eval-mode teacher and VAE; CPU, fp32, seeded init."""
    m = config.model
    student = _seeded_model(_architecture(m.student, "moebius"), m.init_seed)
    if m.student_weights:
        _load_weights(student, m.student_weights)
    teacher = None
    if m.teacher is not None:
        teacher = _seeded_model(_architecture(m.teacher, "pixelhacker"), m.init_seed + 1)
        if m.teacher_weights:
            _load_weights(teacher, m.teacher_weights)
        elif m.teacher != "tiny":
            raise UsageError(
                "model.teacher_weights is required for a released teacher (a random 0.86B "
                'teacher teaches nothing); model.teacher="tiny" builds a seeded random one'
            )
        teacher.requires_grad_(False).eval()
    if m.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    return Networks(student.train(), teacher, load_vae(m.vae, m.init_seed))


class _FrozenBatchNormStats:
    """BatchNorm momentum 0 while a checkpointed block recomputes: running stats update once.

    Reusable: with the gradient-norm weights a block may recompute once per autograd.grad call.
    """

    def __init__(self, module: torch.nn.Module):
        self.bns = [
            m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        self.saved = []

    def __enter__(self):
        self.saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in self.bns]
        for bn in self.bns:
            bn.momentum = 0.0  # running = (1 - 0) * running + 0 * batch statistics

    def __exit__(self, *exc):
        for bn, (momentum, tracked) in zip(self.bns, self.saved, strict=True):
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)


def _checkpoint_contexts(frozen: _FrozenBatchNormStats):
    return contextlib.nullcontext(), frozen  # (forward, recompute)


def enable_gradient_checkpointing(student: torch.nn.Module) -> None:
    """Recompute every resnet and transformer of the student in backward (keys unchanged)."""
    unet = student.diff_model
    for stage in (*unet.down_blocks, *unet.up_blocks):
        for block in (*stage.resnets, *stage.attentions):
            contexts = functools.partial(_checkpoint_contexts, _FrozenBatchNormStats(block))
            block.forward = functools.partial(
                checkpoint, block.forward, use_reentrant=False, context_fn=contexts
            )
