"""The loss side of one distillation step: the terms, adaptive weights and total (spec 3.2-3.4).

`distill_losses` takes what the forward passes produced (student and teacher eps and stage
outputs) plus the two weight tensors the weighting watches (`weighting_params`), and returns the
total loss to call `.backward()` on and a dict of detached 0-d tensors for logging. A term that is
off is None everywhere: its loss, its weight and its gradient norms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moebius.train import losses as L
from moebius.train import weighting as W

OUTPUT_TERMS = ("task", "output_kd", "perceptual")  # terms that reach the network through eps_S
LOSS_KEYS = ("loss", "loss_task", "loss_output_kd", "loss_feature_kd", "loss_perceptual")
WEIGHT_KEYS = ("weight_output_kd", "weight_perceptual", "weight_feature")
# Gradient norms: feat_* w.r.t. P_f (feature layer), out_* w.r.t. P_o (output layer).
NORM_KEYS = (
    "feat_gnorm_feature_kd",
    "feat_gnorm_task",
    "feat_gnorm_output_kd",
    "feat_gnorm_perceptual",
    "out_gnorm_task",
    "out_gnorm_output_kd",
    "out_gnorm_perceptual",
)
LOG_KEYS = LOSS_KEYS + WEIGHT_KEYS + NORM_KEYS


@dataclass(frozen=True)
class LossConfig:
    """Which terms are on, their static weights and the feature pairs; defaults = the original."""

    task: bool = True
    output_kd: bool = True
    feature_kd: bool = True
    perceptual: bool = True  # needs an E-LatentLPIPS metric (perceptual.py); off when absent
    perceptual_weights: str | None = None  # path to sdxl_latest_vgg16_tuned.pth
    perceptual_original_scaling: bool = False  # True: the original's second x0.13025 (spec 3.2)
    adaptive: bool = True  # gradient-norm weights; False = static weights only
    task_weight: float = 0.5  # lambda_task
    kd_weight: float = 0.01  # lambda_KD, applied to both feature and output KD
    perceptual_weight: float = 0.5  # lambda_lpips
    # (student stage, teacher stage): student down2 output vs teacher up0 output, same shape.
    feature_pairs: tuple[tuple[int, int], ...] = ((2, 5),)
    feature_weights: tuple[float, ...] = (1.0,)
    log_all_norms: bool = False  # also compute the norms only used for logging (one batched call)

    def __post_init__(self):
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "feature_pairs", tuple(tuple(p) for p in self.feature_pairs))
        object.__setattr__(self, "feature_weights", tuple(float(w) for w in self.feature_weights))
        if not (self.task or self.output_kd or self.feature_kd or self.perceptual):
            raise ValueError("LossConfig: every loss term is off; switch at least one on")
        if len(self.feature_pairs) != len(self.feature_weights) or not self.feature_pairs:
            raise ValueError(
                f"feature_pairs {self.feature_pairs} and feature_weights {self.feature_weights} "
                "must be non-empty and of equal length (one weight per pair)"
            )
        if any(len(p) != 2 for p in self.feature_pairs):
            raise ValueError(
                f"feature_pairs must be (student, teacher) index pairs, got {self.feature_pairs}"
            )
        for name in ("task_weight", "kd_weight", "perceptual_weight"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    @property
    def needs_teacher(self) -> bool:
        """True when a term compares against the teacher (output or feature KD)."""
        return self.output_kd or self.feature_kd

    def replace(self, **changes) -> LossConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def weighting_params(student: nn.Module, feature_stage: int = 2) -> tuple[Tensor, Tensor]:
    """(P_f, P_o): the weight of the layer producing stage `feature_stage`'s output, conv_out's pw.

    For the released student, P_f = diff_model.down_blocks.2.attentions.1.proj_out.weight (stage 2
    has no downsampler, so its last layer is the transformer's output projection).
    """
    unet = getattr(student, "module", student)  # DDP
    unet = getattr(unet, "_orig_mod", unet).diff_model  # torch.compile
    stages = list(unet.down_blocks) + list(unet.up_blocks)
    if not 0 <= feature_stage < len(stages):
        raise IndexError(f"feature stage {feature_stage} not in [0, {len(stages)})")
    stage = stages[feature_stage]
    resampler = getattr(stage, "downsamplers", None) or getattr(stage, "upsamplers", None)
    last = resampler[0].conv if resampler else stage.attentions[-1].proj_out
    return last.weight, unet.conv_out.conv_pw.weight


def distill_losses(
    cfg: LossConfig,
    *,
    eps_student: Tensor,
    noise: Tensor,
    student_features: Sequence[Tensor] = (),
    eps_teacher: Tensor | None = None,
    teacher_features: Sequence[Tensor] | None = None,
    feature_param: Tensor | None = None,
    output_param: Tensor | None = None,
    x_t: Tensor | None = None,
    alpha_bar_t: Tensor | None = None,
    perceptual: nn.Module | None = None,
) -> tuple[Tensor, dict[str, Tensor | None]]:
    """(total loss, logs) of one step; logs hold detached 0-d tensors or None for every LOG_KEYS.

    eps_student / noise / eps_teacher: [B, 4, h, w]; features: the 6 stage outputs of each model;
    feature_param / output_param: P_f / P_o from `weighting_params` (needed when adaptive);
    x_t, alpha_bar_t [B] and the `perceptual` metric: needed when the perceptual term is on.
    """
    _check_inputs(cfg, eps_teacher, teacher_features, feature_param, output_param, perceptual, x_t)
    losses = {
        "task": L.task_loss(eps_student, noise) if cfg.task else None,
        "output_kd": L.output_kd_loss(eps_student, eps_teacher) if cfg.output_kd else None,
        "feature_kd": (
            L.feature_kd_loss(
                student_features, teacher_features, cfg.feature_pairs, cfg.feature_weights
            )
            if cfg.feature_kd
            else None
        ),
        "perceptual": (
            L.perceptual_loss(perceptual, x_t, eps_student, noise, alpha_bar_t)
            if cfg.perceptual
            else None
        ),
    }
    norms = _gradient_norms(cfg, losses, eps_student, feature_param, output_param)
    weights = _adaptive_weights(cfg, losses, norms)
    total = W.combine_losses(losses, weights, cfg.task_weight, cfg.kd_weight, cfg.perceptual_weight)
    logs: dict[str, Tensor | None] = {"loss": total.detach()}
    logs.update({f"loss_{k}": None if v is None else v.detach() for k, v in losses.items()})
    for key, term in (
        ("output_kd", "output_kd"),
        ("perceptual", "perceptual"),
        ("feature", "feature_kd"),
    ):
        w = weights[key]
        logs[f"weight_{key}"] = None if losses[term] is None else torch.as_tensor(w).detach()
    logs.update(norms)
    return total, logs


def _gradient_norms(cfg, losses, eps_student, feature_param, output_param) -> dict:
    """The gradient norms the weighting needs (all of them with log_all_norms), else None."""
    norms: dict[str, Tensor | None] = dict.fromkeys(NORM_KEYS)
    on = {k: v is not None for k, v in losses.items()}
    adaptive = cfg.adaptive and on["task"]  # every ratio is relative to the task gradient
    log_all = cfg.log_all_norms
    out_terms = [k for k in OUTPUT_TERMS if on[k]]
    # Which output-side cotangents each tensor needs (see weighting.py for the reasoning).
    at_output = out_terms if log_all or (adaptive and len(out_terms) > 1) else []
    at_feature = []
    if on["feature_kd"] and (adaptive or log_all):
        at_feature = out_terms if log_all else ["task"]
    cotangents = {
        k: W.loss_cotangent(losses[k], eps_student) for k in dict.fromkeys(at_output + at_feature)
    }
    if at_output:
        values = W.vjp_norms(eps_student, output_param, [cotangents[k] for k in at_output])
        norms.update({f"out_gnorm_{k}": v for k, v in zip(at_output, values, strict=True)})
    if at_feature:
        values = W.vjp_norms(eps_student, feature_param, [cotangents[k] for k in at_feature])
        norms.update({f"feat_gnorm_{k}": v for k, v in zip(at_feature, values, strict=True)})
    if on["feature_kd"] and (adaptive or log_all):  # local: through P_f's own conv only
        norms["feat_gnorm_feature_kd"] = W.param_grad_norm(losses["feature_kd"], feature_param)
    return norms


def _adaptive_weights(cfg, losses, norms) -> dict[str, Tensor | float]:
    """w_outKD, w_lpips, w_feat from the norms; 1.0 where fixed or the reference term is off."""
    weights: dict[str, Tensor | float] = {"output_kd": 1.0, "perceptual": 1.0, "feature": 1.0}
    if not (cfg.adaptive and losses["task"] is not None):
        return weights
    for term in ("output_kd", "perceptual"):
        if losses[term] is not None:
            weights[term] = W.output_weight(norms["out_gnorm_task"], norms[f"out_gnorm_{term}"])
    if losses["feature_kd"] is not None:
        weights["feature"] = W.feature_weight(
            norms["feat_gnorm_feature_kd"], norms["feat_gnorm_task"]
        )
    return weights


def _check_inputs(cfg, eps_teacher, teacher_features, feature_param, output_param, metric, x_t):
    if cfg.output_kd and eps_teacher is None:
        raise ValueError(
            "output KD is on but no teacher eps was given; for teacher-free training use "
            "LossConfig(output_kd=False, feature_kd=False)"
        )
    if cfg.feature_kd and teacher_features is None:
        raise ValueError(
            "feature KD is on but no teacher features were given; pass the teacher's stage "
            "outputs (return_features=True) or use LossConfig(feature_kd=False)"
        )
    if cfg.perceptual and (metric is None or x_t is None):
        raise ValueError(
            "the perceptual term is on but no metric (or no x_t / alpha_bar_t) was given; "
            "build one with moebius.train.perceptual.resolve_perceptual, or set "
            "LossConfig(perceptual=False)"
        )
    if (cfg.adaptive or cfg.log_all_norms) and (feature_param is None or output_param is None):
        raise ValueError(
            "adaptive weights need the watched tensors: pass feature_param, output_param = "
            "weighting_params(student), or LossConfig(adaptive=False)"
        )


def logs_to_floats(logs: dict[str, Tensor | None]) -> dict[str, float | None]:
    """Detached tensors -> Python floats in one device transfer (None stays None)."""
    keys = [k for k, v in logs.items() if v is not None]
    values = torch.stack([logs[k].float().reshape(()) for k in keys]).tolist() if keys else []
    out: dict[str, float | None] = dict.fromkeys(logs)
    out.update(zip(keys, values, strict=True))
    return out
