"""Exponential moving average of the trainable weights (LitEma of latent-diffusion, spec 3.7).

After every optimizer step:  n += 1;  d = min(decay, (1 + n) / (10 + n));
                             shadow -= (1 - d) * (shadow - param)
The warm-up term (1 + n) / (10 + n) makes the first updates follow the weights closely.
Only trainable parameters are averaged; BatchNorm running statistics are buffers, so an exported
EMA model takes them from the live model (`copy_to` leaves buffers alone).
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy of a model's trainable parameters, keyed by parameter name (fp32)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {
            name: p.detach().float().clone()
            for name, p in _named_trainable(model)  # unwrapped names: no "module." prefix
        }

    def current_decay(self) -> float:
        """The decay the next update will use: min(decay, (1 + n) / (10 + n)) after n += 1."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every shadow tensor towards the model's current weights."""
        decay = self.current_decay()
        self.num_updates += 1
        params = dict(_named_trainable(model))
        if params.keys() != self.shadow.keys():
            raise KeyError(
                "EMA was built on a model with different trainable parameters; missing "
                f"{sorted(self.shadow.keys() - params.keys())[:3]}, unexpected "
                f"{sorted(params.keys() - self.shadow.keys())[:3]}"
            )
        shadow = list(self.shadow.values())
        live = [params[name].detach().to(s.dtype) for name, s in self.shadow.items()]
        torch._foreach_lerp_(shadow, live, 1.0 - decay)  # shadow += (1 - d) * (param - shadow)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (e.g. a copy used for export or evaluation)."""
        params = dict(_named_trainable(model))
        missing = self.shadow.keys() - params.keys()
        if missing:
            raise KeyError(f"model lacks EMA parameters, e.g. {sorted(missing)[:3]}")
        for name, value in self.shadow.items():
            params[name].copy_(value)

    def state_dict(self) -> dict:
        """Plain tensors and numbers: safe for torch.save / torch.load(weights_only=True)."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {name: t.clone() for name, t in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; the parameter names must match this EMA's model."""
        if state["shadow"].keys() != self.shadow.keys():
            raise KeyError(
                "EMA state does not match the model's trainable parameters (e.g. "
                f"{sorted(state['shadow'].keys() ^ self.shadow.keys())[:3]})"
            )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


def _named_trainable(model: nn.Module):
    """(name, param) of trainable parameters, unwrapping DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
