"""E-LatentLPIPS: a perceptual distance computed on SDXL latents (Kang et al. 2024), for training.

The network is a VGG16-BN whose first conv takes the 4 latent channels and whose first three
max-pools are removed, trained on latent ImageNet, plus five 1x1 "linear" heads calibrated on
human judgements. distance(a, b) = mean|a - b| (the L1 term)
                                 + sum_k mean_hw( lin_k( (phi_k(a') - phi_k(b'))^2 ) )
where phi_k are channel-normalised VGG features at 5 depths and a', b' are a and b under one shared
random geometric augmentation ("ensembling"; the "bg" pipeline: x-flip, 90-degree rotations,
integer translation, isotropic scale, rotation, anisotropic scale, fractional translation).

Weights are not downloaded: pass the released `sdxl_latest_vgg16_tuned.pth` (a state dict of the
whole metric, from the Hugging Face repo Mingguksky/elatentlpips, CC-BY-NC); its keys load into
this module as they are (`net.sliceN.*`, `linN.model.1.weight`). Without weights the perceptual
term is off, and `resolve_perceptual` says so. The `elatentlpips` package itself is not used: it
needs torchvision and pkg_resources, and does not import beside a CPU-only torch.

The augmentation here draws from an explicit generator and resamples with `grid_sample`
(reflection padding); the original ADA pipeline filters with upfirdn2d, so individual draws are
not bit-identical to the package's, only the same family of transforms with the same ranges.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# VGG16-BN feature layers in torchvision's order ("M" = max-pool); the latent variant replaces
# the first three pools with Identity so the 64x64 latent keeps its resolution longer.
VGG16_LAYERS = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)
SLICE_ENDS = (7, 14, 24, 34, 44)  # feature indices where relu1_2 .. relu5_3 slices end
CHANNELS = (64, 128, 256, 512, 512)
POOLS_REMOVED = 3
SDXL_SCALING = 0.13025  # what the metric's normalize=True multiplies by (the original's quirk)


def _vgg_features(in_channels: int) -> list[nn.Module]:
    layers, pools, c = [], 0, in_channels
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.Identity() if pools < POOLS_REMOVED else nn.MaxPool2d(2, 2))
            pools += 1
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return layers


class LatentVGG(nn.Module):
    """The 5 feature slices of the latent VGG16-BN trunk; keys `sliceN.<torchvision index>.*`."""

    def __init__(self, in_channels: int = 4):
        super().__init__()
        layers = _vgg_features(in_channels)
        start = 0
        for k, end in enumerate(SLICE_ENDS, 1):
            block = nn.Sequential()
            for i in range(start, end):
                block.add_module(str(i), layers[i])
            setattr(self, f"slice{k}", block)
            start = end

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for k in range(1, len(SLICE_ENDS) + 1):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class LinearHead(nn.Module):
    """1x1 conv to one channel, behind a dropout (inactive in eval): key `model.1.weight`."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def random_affine(batch: int, generator: torch.Generator, device=None) -> Tensor:
    """[B, 2, 3] affine matrices of the "bg" pipeline, in normalised coordinates [-1, 1]."""

    def uniform(*shape):
        return torch.rand(*shape, generator=generator)

    def normal(*shape):
        return torch.randn(*shape, generator=generator)

    flip = 1 - 2 * (uniform(batch) < 0.5).float()  # x-flip with p 1/2
    quarter = torch.floor(uniform(batch) * 4) * (math.pi / 2)  # 90-degree rotations
    shift_int = (uniform(batch, 2) * 2 - 1) * 0.125 * 2  # up to 1/8 of the size (range is 2)
    scale = torch.exp2(normal(batch) * 0.2)  # isotropic, lognormal std 0.2 octaves
    angle = (uniform(batch) * 2 - 1) * math.pi  # arbitrary rotation
    aniso = torch.exp2(normal(batch) * 0.2)  # anisotropic scale
    shift_frac = normal(batch, 2) * 0.125 * 2
    theta = quarter + angle
    cos, sin = torch.cos(theta), torch.sin(theta)
    sx, sy = flip * scale * aniso, scale / aniso
    matrix = torch.stack(
        [
            torch.stack([cos * sx, -sin * sy, shift_int[:, 0] + shift_frac[:, 0]], -1),
            torch.stack([sin * sx, cos * sy, shift_int[:, 1] + shift_frac[:, 1]], -1),
        ],
        1,
    )
    return matrix.to(device)


def augment_pair(a: Tensor, b: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The same random geometric transform on a and b ([B, C, H, W]), differentiable."""
    theta = random_affine(a.shape[0], generator, a.device).to(a.dtype)
    grid = F.affine_grid(theta, list(a.shape), align_corners=False)
    warp = lambda x: F.grid_sample(x, grid, "bilinear", "reflection", align_corners=False)  # noqa: E731
    return warp(a), warp(b)


def _channel_normalise(x: Tensor, eps: float = 1e-8) -> Tensor:
    return x / torch.sqrt(x.square().sum(dim=1, keepdim=True) + eps)


class ELatentLPIPS(nn.Module):
    """distance(a, b) -> [B] for latents [B, 4, h, w] scaled by the VAE factor (as the UNet sees).

    `original_scaling=True` multiplies both inputs by 0.13025 once more, as the original training
    did (normalize=True on already-scaled latents); the default feeds them as the metric expects.
    """

    def __init__(
        self,
        in_channels: int = 4,
        ensembling: bool = True,
        original_scaling: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.net = LatentVGG(in_channels)
        for k, c in enumerate(CHANNELS):
            setattr(self, f"lin{k}", LinearHead(c))
        self.ensembling = ensembling
        self.original_scaling = original_scaling
        self.generator = generator or torch.Generator().manual_seed(0)
        self.eval().requires_grad_(False)  # a fixed metric: gradients flow to its inputs only

    def train(self, mode: bool = True) -> ELatentLPIPS:
        """The metric always runs in eval mode (BatchNorm running stats, no dropout)."""
        return super().train(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.original_scaling:
            a, b = a * SDXL_SCALING, b * SDXL_SCALING
        l1 = (a - b).abs().mean(dim=(1, 2, 3))  # (B,)
        if self.ensembling:
            a, b = augment_pair(a, b, self.generator)
        feats_a, feats_b = self.net(a), self.net(b)
        total = l1
        for k, (fa, fb) in enumerate(zip(feats_a, feats_b, strict=True)):
            diff = (_channel_normalise(fa) - _channel_normalise(fb)).square()
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(1, 2, 3))
        return total


def load_perceptual(path: str | Path | None = None, device=None, **kwargs) -> ELatentLPIPS:
    """ELatentLPIPS with the released `sdxl_latest_vgg16_tuned.pth` loaded (strict keys).

    Raises FileNotFoundError (an OSError) when no path is given or the file is missing.
    """
    if path is None or not Path(path).is_file():
        where = "no path was given" if path is None else f"{path} does not exist"
        raise FileNotFoundError(
            f"E-LatentLPIPS weights are needed ({where}): download sdxl_latest_vgg16_tuned.pth "
            "from the Hugging Face repo Mingguksky/elatentlpips (CC-BY-NC) and set "
            "loss.perceptual_weights to its path, or switch the perceptual term off"
        )
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    # The package registers the heads twice (lin0..lin4 and lins.0..4): keep one name.
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("lins.")}
    metric = ELatentLPIPS(**kwargs)
    metric.load_state_dict(state, strict=True)
    return metric.to(device)


def resolve_perceptual(cfg, device=None):
    """(cfg, metric): the metric from `cfg.perceptual_weights`, or the term off with a warning."""
    if not cfg.perceptual:
        return cfg, None
    if cfg.perceptual_weights is None:
        logger.warning(
            "perceptual (E-LatentLPIPS) term is OFF: no weights given. Set "
            "loss.perceptual_weights to sdxl_latest_vgg16_tuned.pth to train with it."
        )
        return cfg.replace(perceptual=False), None
    metric = load_perceptual(
        cfg.perceptual_weights, device, original_scaling=cfg.perceptual_original_scaling
    )
    logger.info("perceptual (E-LatentLPIPS) term is on, weights %s", cfg.perceptual_weights)
    return cfg, metric
