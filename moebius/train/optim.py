"""Muon for matrix-shaped weights + an AdamW backup for the rest, in one optimizer (spec 3.5).

The split is by name over `named_parameters()`: Muon takes every tensor with ndim >= 2 whose name
contains none of `MUON_EXCLUDED` ("embedding_layer", "conv_in", "conv_out"); the AdamW backup
takes the rest (1-D norms and biases, the category embedding, conv_in / conv_out). On the
released student that is 288 Muon tensors (225,511,736 elements) and 543 AdamW tensors (529,795).

Muon update of a parameter p with gradient g (momentum mu = 0.95, Nesterov):
    buf = mu * buf + g;   u = g + mu * buf
    U = NewtonSchulz5(u viewed as [out, in*kh*kw])        # quintic iteration in bf16
    p *= 1 - lr * wd;     p -= lr * 0.2 * sqrt(max(A, B)) * U
where (A, B) are the first two dims of p's own shape (a [C, 1, k, k] depthwise conv gets
sqrt(C), the [dk, 1, 1, 15, 15] position conv sqrt(dk), not the sizes of the 2-D view).

`torch.optim.Muon` refuses parameters that are not 2-D and takes its lr rule from the shape it
is given, so conv kernels and the cross-lambda tables cannot go through it; this class runs
Newton-Schulz on the 2-D view and applies the lr rule above. (Torch's Muon keeps
buf' = (1 - mu) * buf, whose Nesterov direction is (1 - mu) * u: the same update once
Newton-Schulz has normalised the scale away.)

AdamW backup (the Moonlight variant, which differs from torch.optim.AdamW in where eps goes):
    m = lerp(m, g, 1 - b1);  v = lerp(v, g^2, 1 - b2)
    p *= 1 - lr * wd;        p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (eps + sqrt(v))
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

# Substrings that send a >= 2-D tensor to the AdamW backup (the input/output layers and the
# category embedding). "time_embedding.*" and "encoder_hid_proj" stay in Muon on purpose:
# the original rule matches "embedding_layer" only.
MUON_EXCLUDED = ("embedding_layer", "conv_in", "conv_out")

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz (Keller Jordan's Muon)
NS_EPS = 1e-7


def is_muon_param(name: str, param: Tensor) -> bool:
    """True when the spec's name rule sends this tensor to Muon."""
    return param.ndim >= 2 and not any(key in name for key in MUON_EXCLUDED)


def split_parameters(
    named_parameters: Iterable[tuple[str, Tensor]],
) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """(muon, adamw) lists of (name, param), trainable parameters only, in input order."""
    muon, adamw = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (muon if is_muon_param(name, param) else adamw).append((name, param))
    return muon, adamw


def muon_lr(lr: float, shape: torch.Size | tuple[int, ...]) -> float:
    """lr * 0.2 * sqrt(max(A, B)) with (A, B) the first two dims of the parameter's shape."""
    return lr * 0.2 * math.sqrt(max(shape[0], shape[1]))


def newton_schulz(
    update: Tensor, steps: int = 5, eps: float = NS_EPS, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Approximate U V^T of a 2-D matrix G = U S V^T by the quintic iteration (in bf16).

    X = G / (|G|_F + eps), transposed when rows > cols; then `steps` times:
        A = X X^T;  X = a X + (b A + c A A) X
    Written out op by op in the original's order: torch's routine fuses b A + c A A into one
    addmm, which rounds differently in bf16 (a valid orthogonalisation, but its updates differ
    from the original's by up to ~15% of their largest entry, where this order matches them).
    """
    if update.ndim != 2:
        raise ValueError(f"Newton-Schulz needs a 2-D matrix, got shape {list(update.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    x = x / (x.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two kinds of param groups: `use_muon=True` (Muon) and False (AdamW backup)."""

    def __init__(
        self,
        param_groups: list[dict],
        lr: float = 1e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(
                f"need lr >= 0, weight_decay >= 0, 0 <= momentum < 1; got lr={lr}, "
                f"weight_decay={weight_decay}, momentum={momentum}"
            )
        for group in param_groups:
            if "use_muon" not in group:
                raise ValueError("every param group needs a `use_muon` flag (see build_optimizer)")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
        )
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(g)  # buf = mu * buf + g
            u = g.add(buf, alpha=mu) if group["nesterov"] else buf
            ortho = newton_schulz(u.reshape(u.shape[0], -1), group["ns_steps"])  # [out, in*kh*kw]
            p.mul_(1 - lr * wd)  # decoupled decay with the unadjusted lr
            p.add_(ortho.view_as(p).to(p.dtype), alpha=-muon_lr(lr, p.shape))

    def _adamw_group(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["adamw_betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(g)
                state["exp_avg_sq"] = torch.zeros_like(g)
            state["step"] += 1
            m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            m.lerp_(g, 1 - beta1)
            v.lerp_(g.square(), 1 - beta2)
            direction = m / (group["adamw_eps"] + v.sqrt())  # eps on the uncorrected sqrt(v)
            step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)  # both bias corrections
            p.mul_(1 - lr * wd)
            p.add_(direction, alpha=-step_size)


def build_optimizer(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    lr: float = 1e-4,
    weight_decay: float = 0.1,
    **kwargs,
) -> MuonAdamW:
    """Muon + AdamW backup over (name, parameter) pairs with the spec's split and defaults.

    Groups are named ("muon", "adamw") in `group["name"]`; an empty side is left out. Extra keyword
    arguments (momentum, nesterov, ns_steps, adamw_betas, adamw_eps) go to `MuonAdamW`.
    """
    muon, adamw = split_parameters(named_parameters)
    if not muon and not adamw:
        raise ValueError("build_optimizer got no trainable parameters")
    groups = [
        {"params": [p for _, p in params], "names": [n for n, _ in params], "use_muon": use_muon,
         "name": "muon" if use_muon else "adamw"}
        for params, use_muon in ((muon, True), (adamw, False))
        if params
    ]  # fmt: skip
    return MuonAdamW(groups, lr=lr, weight_decay=weight_decay, **kwargs)
