"""Training: distillation losses, gradient-norm weighting, Muon + AdamW, EMA (pure pieces).

Importing this package pulls in torch only; the loop, data and CLI live in their own modules.
"""

from moebius.train.ema import EMA
from moebius.train.optim import build_optimizer
from moebius.train.step import LossConfig, distill_losses, logs_to_floats, weighting_params

__all__ = [
    "EMA",
    "LossConfig",
    "build_optimizer",
    "distill_losses",
    "logs_to_floats",
    "weighting_params",
]
