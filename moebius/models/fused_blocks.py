"""Inference blocks with fused convolutions and in-place elementwise ops (used by `optimize`).

Each class takes the plain block (BatchNorms already folded where it has them) and computes the
same function with fewer passes over memory and fewer fresh large tensors:

* a convolution followed by ReLU / SiLU, or followed by a residual add, runs as one oneDNN
  convolution with a post-op (`torch.ops.mkldnn._convolution_pointwise`, the kernels inductor
  uses on CPU) — on other devices, in reduced precision on a CPU without mkldnn, or while
  `torch.compile` traces, the same math runs as separate ops;
* activations and adds on temporaries run in place;
* the MixFFN's value and gate halves are computed as two half-width convolutions instead of
  one double-width tensor that is then split: the same per-channel math, with temporaries half
  the size (fresh large tensors are page-faulted in on every call: on a 2-core VM a SiLU with
  a fresh 52 MB output takes 25 ms, 26 MB 9 ms, in place 1.4-2.6 ms; bench/fresh_tensors.py).

Rounding differs from the plain blocks only by the order of float additions (≤ 1e-6 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moebius.models.blocks import (
    DepthwiseSeparableConv,
    DWResnetBlock2D,
    LambdaTransformerBlock,
    MixFFN,
    MixTransformer2D,
    _layer_norm_2d,
)

ACTIVATIONS = {"none": lambda y: y, "relu": F.relu_, "swish": lambda y: F.silu(y, inplace=True)}


def _mkldnn(x: torch.Tensor) -> bool:
    """Whether oneDNN's fused convolution ops take `x` here (eager CPU, float32 / bfloat16)."""
    return (
        not torch.compiler.is_compiling()  # first: nothing else is evaluated while tracing
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def _geometry(conv: nn.Conv2d) -> tuple:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv_act(conv: nn.Conv2d, x: torch.Tensor, act: str = "none") -> torch.Tensor:
    """act(conv(x)) with act in ACTIVATIONS ("swish" = SiLU), fused on CPU."""
    if _mkldnn(x):
        op = torch.ops.mkldnn._convolution_pointwise
        return op(x, conv.weight, conv.bias, *_geometry(conv), act, [], "")
    return ACTIVATIONS[act](conv(x))


def conv_add(conv: nn.Conv2d, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """conv(x) + other as a new tensor, fused on CPU (other must match conv(x) in layout)."""
    if _mkldnn(x) and other.dtype == x.dtype and _same_layout(x, other):
        op = torch.ops.mkldnn._convolution_pointwise.binary
        return op(x, other, conv.weight, conv.bias, *_geometry(conv), "add", 1.0, None, [], None)
    return conv(x) + other


def conv_add_(acc: torch.Tensor, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """acc += conv(x) in place (acc is a temporary the caller owns), fused on CPU."""
    if _mkldnn(x) and acc.dtype == x.dtype and _same_layout(x, acc):
        op = torch.ops.mkldnn._convolution_pointwise_.binary
        return op(acc, x, conv.weight, conv.bias, *_geometry(conv), "add", 1.0, None, [], None)
    return acc.add_(conv(x))


def _same_layout(x: torch.Tensor, other: torch.Tensor) -> bool:
    """Both channels-last, or both contiguous NCHW (oneDNN's binary post-op needs one format)."""
    cl = torch.channels_last
    return (x.is_contiguous(memory_format=cl) and other.is_contiguous(memory_format=cl)) or (
        x.is_contiguous() and other.is_contiguous()
    )


def _conv_slice(conv: nn.Conv2d, rows: slice) -> nn.Conv2d:
    """A conv computing only output channels `rows` of `conv` (depthwise: those channels)."""
    weight = conv.weight[rows].detach()
    out_ch = weight.shape[0]
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    new = nn.Conv2d(
        out_ch if depthwise else conv.in_channels,
        out_ch,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        out_ch if depthwise else conv.groups,
        bias=conv.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    new.weight.data.copy_(weight)
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias[rows].detach())
    return new.requires_grad_(False)


class FusedSeparableConv(nn.Module):
    """`DepthwiseSeparableConv` (BatchNorms folded): ReLU fused into the depthwise conv, the
    skip add into the pointwise conv."""

    def __init__(self, block: DepthwiseSeparableConv):
        super().__init__()
        if not isinstance(block.bn1, nn.Identity):
            raise ValueError("fold the BatchNorms first (optimize.fold_separable_conv)")
        self.conv_dw, self.conv_pw, self.has_skip = block.conv_dw, block.conv_pw, block.has_skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = conv_act(self.conv_dw, x, "relu")
        return conv_add(self.conv_pw, y, x) if self.has_skip else conv_act(self.conv_pw, y)


class FusedResnet(nn.Module):
    """`DWResnetBlock2D` with in-place SiLUs and adds on its temporaries."""

    def __init__(self, block: DWResnetBlock2D):
        super().__init__()
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.conv1, self.conv2 = FusedSeparableConv(block.conv1), FusedSeparableConv(block.conv2)
        self.time_emb_proj, self.conv_shortcut = block.time_emb_proj, block.conv_shortcut

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h.add_(self.time_emb_proj(F.silu(temb))[:, :, None, None])
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        if self.conv_shortcut is None:
            return h.add_(x)
        return conv_add_(h, self.conv_shortcut, x)


class FusedMixFFN(nn.Module):
    """`MixFFN` as value and gate halves: a = DW_a(SiLU(W_a x)), g = SiLU(DW_g(SiLU(W_g x))),
    out = P(a * g) — SiLUs fused into the convs, the residual add into P when given."""

    def __init__(self, ff: MixFFN):
        super().__init__()
        expand, depth = ff.inverted_conv.conv, ff.depth_conv.conv
        hidden = expand.out_channels // 2
        value, gate = slice(0, hidden), slice(hidden, 2 * hidden)
        self.expand_value, self.expand_gate = _conv_slice(expand, value), _conv_slice(expand, gate)
        self.depth_value, self.depth_gate = _conv_slice(depth, value), _conv_slice(depth, gate)
        self.point_conv = ff.point_conv.conv

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """point_conv(a * SiLU(g)), plus `residual` (accumulated into it in place) when given."""
        a = conv_act(self.depth_value, conv_act(self.expand_value, x, "swish"))
        g = conv_act(self.depth_gate, conv_act(self.expand_gate, x, "swish"), "swish")
        a.mul_(g)
        del g
        if residual is None:
            return self.point_conv(a)
        return conv_add_(residual, self.point_conv, a)


class FusedTransformerBlock(nn.Module):
    """`LambdaTransformerBlock` whose residual stream is updated in place after the first add."""

    def __init__(self, block: LambdaTransformerBlock):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = block.norm1, block.norm2, block.norm3
        self.attn1, self.attn2 = block.attn1, block.attn2
        self.ff = FusedMixFFN(block.ff)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(_layer_norm_2d(self.norm1, x))  # a new tensor: the input stays intact
        x.add_(self.attn2(_layer_norm_2d(self.norm2, x), context))
        return self.ff(_layer_norm_2d(self.norm3, x), residual=x)


class FusedTransformer2D(nn.Module):
    """`MixTransformer2D` with its output projection and skip add as one fused conv."""

    def __init__(self, block: MixTransformer2D):
        super().__init__()
        self.norm, self.proj_in, self.proj_out = block.norm, block.proj_in, block.proj_out
        self.transformer_blocks = nn.ModuleList(
            FusedTransformerBlock(b) for b in block.transformer_blocks
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(self.norm(x))
        for block in self.transformer_blocks:
            h = block(h, context)
        return conv_add(self.proj_out, h, x)
