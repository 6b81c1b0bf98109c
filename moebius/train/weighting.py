"""Gradient-norm adaptive loss weights (spec 3.3 / 3.4), recomputed every step, detached.

P_o = the output layer weight (`diff_model.conv_out.conv_pw.weight`), P_f = the weight of the
layer that produces the distilled student feature (`diff_model.down_blocks.2.attentions.1.
proj_out.weight` for stage 2). |dL/dP| is the Frobenius norm of one loss's gradient w.r.t. one
tensor.

    w_outKD  = clamp(|dL_task/dP_o|   / (|dL_outKD/dP_o| + 1e-6), 0, 1e6)
    w_lpips  = clamp(|dL_task/dP_o|   / (|dL_lpips/dP_o| + 1e-6), 0, 1e6)
    w_feat   = clamp(|dL_featKD/dP_f| / (|dL_task/dP_f|  + 1e-4), 0, 1e4)
    L = l_KD L_featKD + w_feat (l_task L_task + l_KD w_outKD L_outKD + l_lpips w_lpips L_lpips)

A ratio whose reference loss is off (no task term, or no feature term) is 1: the static weights
alone apply. A term that is off drops out of L and its weight is None.

How the norms are computed with little extra work (the original calls autograd.grad 7 times per
step, three of them through the whole up path, two only for logging):

* The task, output-KD and perceptual losses reach the network only through eps_S, so
  dL_k/dP = J_P^T g_k with g_k = dL_k/d eps_S. The g_k come from the loss heads alone.
* P_o sits at the end of the network (conv_pw -> BatchNorm -> eps), so every J_{P_o}^T g_k is a
  backward through those two layers only; the autograd engine runs no node that does not lead
  to the requested input. All k cotangents go in ONE batched call (`is_grads_batched=True`).
* dL_featKD/dP_f goes from the feature through P_f's own 1x1 conv only: also local.
* dL_task/dP_f is the one backward through the up path, and it computes activation gradients
  only (no up-path weight gradients are requested). With `log_all_norms` the output-KD and
  perceptual cotangents ride in the same batched call, for logging.

So a step with adaptive weights costs one activation-only backward through the up path plus a
few layer-local products more than a step with fixed weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

OUTPUT_EPS, OUTPUT_MAX = 1e-6, 1e6  # output-layer ratios (w_outKD, w_lpips)
FEATURE_EPS, FEATURE_MAX = 1e-4, 1e4  # feature-layer ratio (w_feat)


def output_weight(norm_task: Tensor, norm_term: Tensor) -> Tensor:
    """clamp(|dL_task/dP_o| / (|dL_term/dP_o| + 1e-6), 0, 1e6), detached."""
    return (norm_task / (norm_term + OUTPUT_EPS)).clamp(0.0, OUTPUT_MAX).detach()


def feature_weight(norm_feature_kd: Tensor, norm_task: Tensor) -> Tensor:
    """clamp(|dL_featKD/dP_f| / (|dL_task/dP_f| + 1e-4), 0, 1e4), detached."""
    return (norm_feature_kd / (norm_task + FEATURE_EPS)).clamp(0.0, FEATURE_MAX).detach()


def loss_cotangent(loss: Tensor, output: Tensor) -> Tensor:
    """dL/d output through the loss head only (the graph between `output` and `loss`)."""
    (grad,) = torch.autograd.grad(loss, output, retain_graph=True)
    return grad


def vjp_norms(output: Tensor, param: Tensor, cotangents: Sequence[Tensor]) -> Tensor:
    """|J^T v_k|_F for each cotangent v_k of `output` w.r.t. `param`, in one backward: [k].

    One cotangent is a plain vector-Jacobian product; several are stacked and run batched
    (`is_grads_batched`, vmap over the backward), which shares the graph walk.
    """
    if not cotangents:
        raise ValueError("vjp_norms needs at least one cotangent")
    if len(cotangents) == 1:
        (grad,) = torch.autograd.grad(output, param, cotangents[0], retain_graph=True)
        return grad.detach().norm().reshape(1)
    (grads,) = torch.autograd.grad(
        output, param, torch.stack(cotangents), retain_graph=True, is_grads_batched=True
    )  # (k, *param.shape)
    return grads.detach().flatten(1).norm(dim=1)


def param_grad_norm(loss: Tensor, param: Tensor) -> Tensor:
    """|dL/dP|_F of one loss w.r.t. one tensor (keeps the graph)."""
    (grad,) = torch.autograd.grad(loss, param, retain_graph=True)
    return grad.detach().norm()


def combine_losses(
    losses: dict[str, Tensor | None],
    weights: dict[str, Tensor | float],
    task_weight: float,
    kd_weight: float,
    perceptual_weight: float,
) -> Tensor:
    """L = l_KD L_feat + w_feat (l_task L_task + l_KD w_out L_outKD + l_lpips w_lp L_lpips).

    `losses` maps task / output_kd / feature_kd / perceptual to a scalar or None (term off);
    `weights` maps output_kd / perceptual / feature to the adaptive weight (1.0 when fixed).
    """
    bundle = []  # the output-side terms, rescaled together by w_feat
    if losses["task"] is not None:
        bundle.append(task_weight * losses["task"])
    if losses["output_kd"] is not None:
        bundle.append(kd_weight * weights["output_kd"] * losses["output_kd"])
    if losses["perceptual"] is not None:
        bundle.append(perceptual_weight * weights["perceptual"] * losses["perceptual"])
    total = None
    if losses["feature_kd"] is not None:
        total = kd_weight * losses["feature_kd"]
    if bundle:
        out = weights["feature"] * sum(bundle[1:], bundle[0])
        total = out if total is None else total + out
    if total is None:
        raise ValueError("every loss term is off: nothing to train")
    return total
