"""Distillation loss terms as pure functions of tensors (spec 3.2); all are plain means.

* task loss        L_task  = MSE(eps_S, noise)        noise incl. the offset term: the true target
* output KD        L_outKD = MSE(eps_S, eps_T)        "fine granularity" at the latent resolution
* feature KD       L_featKD = sum_i w_i MSE(S[s_i], T[t_i])   "coarse granularity"; the default
                   pair (2, 5) compares the student bottleneck (down2 output) with the teacher's
                   up0 output: same shape [B, 1280, 16, 16], so no adapter layer exists
* perceptual       E-LatentLPIPS(x0_S, x0_target) on x0 predictions (see perceptual.py)

x0 from eps (DDPM, `pred_original_sample`):  x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def offset_noise(
    shape: Sequence[int],
    offset: float = 0.0357,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """SDXL-style offset noise: randn(shape) + offset * randn(B, C, 1, 1); also the task target."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    per_channel = torch.randn(
        (shape[0], shape[1], 1, 1), generator=generator, device=device, dtype=dtype
    )
    return noise + offset * per_channel


def task_loss(eps_student: Tensor, noise: Tensor) -> Tensor:
    """MSE between the student's eps and the noise that was added (offset included)."""
    _check_same_shape("eps_student", eps_student, "noise", noise)
    return F.mse_loss(upcast(eps_student), upcast(noise))


def output_kd_loss(eps_student: Tensor, eps_teacher: Tensor) -> Tensor:
    """MSE between student and teacher eps (teacher detached: it is frozen)."""
    _check_same_shape("eps_student", eps_student, "eps_teacher", eps_teacher)
    return F.mse_loss(upcast(eps_student), upcast(eps_teacher.detach()))


def feature_kd_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    pairs: Sequence[tuple[int, int]],
    weights: Sequence[float],
) -> Tensor:
    """sum_i weights[i] * MSE(student_features[s_i], teacher_features[t_i]), pairs (s_i, t_i)."""
    if len(pairs) != len(weights) or not pairs:
        raise ValueError(
            f"feature KD needs one weight per (student, teacher) index pair and at least one pair; "
            f"got {len(pairs)} pairs and {len(weights)} weights"
        )
    total = None
    for (s, t), weight in zip(pairs, weights, strict=True):
        if not (0 <= s < len(student_features) and 0 <= t < len(teacher_features)):
            raise IndexError(
                f"feature pair ({s}, {t}) is out of range: the student returned "
                f"{len(student_features)} stage outputs and the teacher {len(teacher_features)}"
            )
        fs, ft = student_features[s], teacher_features[t]
        _check_same_shape(
            f"student feature {s}", fs, f"teacher feature {t}", ft, "(there is no adapter layer)"
        )
        term = weight * F.mse_loss(upcast(fs), upcast(ft.detach()))
        total = term if total is None else total + term
    return total


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), abar_t per sample [B] (DDPM)."""
    if alpha_bar_t.shape != (x_t.shape[0],):
        raise ValueError(
            f"alpha_bar_t must hold one value per sample, shape [{x_t.shape[0]}], "
            f"got {list(alpha_bar_t.shape)}"
        )
    abar = upcast(alpha_bar_t).view(-1, 1, 1, 1)
    return (upcast(x_t) - (1 - abar).sqrt() * upcast(eps)) / abar.sqrt()


def perceptual_loss(
    metric: torch.nn.Module,
    x_t: Tensor,
    eps_student: Tensor,
    noise: Tensor,
    alpha_bar_t: Tensor,
) -> Tensor:
    """metric(x0 from the student eps, x0 from the true noise).mean(); target ~ clean latents."""
    x0_student = x0_from_eps(x_t, eps_student, alpha_bar_t)
    x0_target = x0_from_eps(x_t, noise, alpha_bar_t)
    return metric(x0_student, x0_target).mean()


def upcast(t: Tensor) -> Tensor:
    """bf16 / fp16 -> fp32 (losses are computed at least in fp32); fp32 / fp64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor, note: str = "") -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} {list(a.shape)} and {name_b} {list(b.shape)} must have the same shape {note}"
        )
