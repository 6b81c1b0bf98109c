"""Output-preserving inference optimisations: `optimize(model, dtype=None) -> optimised copy`.

The plain modules (lambda_layers.py, blocks.py) stay the readable reference that matches the
original numerically; this file swaps in equivalent inference-only modules on a deep copy:

* BatchNorm folding: every eval BatchNorm that follows a conv / projection becomes part of its
  weight and bias (w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta).
* `FastSelfLambda`: one fused q|k|v 1x1 conv; the 15x15 position conv writes its output
  channels-last and a strided batched matmul applies it in place (no layout pass on CPU).
* `FastCrossLambda`: the content lambda and values depend only on the category ids (constant for
  a whole run, both guidance branches in one batch), so they are computed once and cached.
* `FastUpsample2D`: nearest 2x + 3x3 conv as one 2x2 conv per output phase on the source grid
  (4/9 of the FLOPs of the 19 % of the UNet that the two upsamplers are).
* `fused_blocks`: ReLU / SiLU and residual adds fused into the convolutions next to them
  (oneDNN post-ops on CPU), in-place ops on temporaries, the MixFFN as two half-width halves.
* Channels-last activations end to end (1x1 convs become plain GEMMs, the LayerNorm over
  channels needs no transpose); the UNet still takes and returns ordinary NCHW tensors.
* Reduced precision (`dtype=torch.bfloat16 / float16`): weights and activations in that dtype,
  with the position softmax and the lambda sums in float32.  On a CPU without AVX-512 BF16 or
  AMX, bfloat16 is emulated and slower, so the CPU path then stays float32 and logs why.

* `compile=True`: torch.compile of the result (meant for GPUs; slower than eager on CPU here).

The copy is for inference only: its state dict has folded weights and must not be saved.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from moebius.models.blocks import (
    DepthwiseSeparableConv,
    DWResnetBlock2D,
    MixTransformer2D,
    Upsample2D,
)
from moebius.models.fused_blocks import FusedResnet, FusedTransformer2D
from moebius.models.lambda_layers import CrossLambda, SelfLambda

logger = logging.getLogger(__name__)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bfloat16 matmuls/convs natively (AVX-512 BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype the fast path really uses on `device` (bf16 falls back to fp32 on slow CPUs)."""
    if dtype is None:
        return torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"optimize supports float32, bfloat16 and float16, got {dtype}")
    if device.type == "cpu" and dtype != torch.float32:
        if dtype == torch.float16 or not cpu_has_fast_bf16():
            logger.warning(
                "%s requested on a CPU without AVX-512 BF16 / AMX bf16 support: reduced "
                "precision would be emulated and slower, so the fast path stays float32",
                dtype,
            )
            return torch.float32
    return dtype


# ----------------------------------------------------------------------------- BatchNorm folding
def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as y = x * scale + shift, computed in float64."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    return scale, shift


def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of `bn(layer(x))` for a conv / linear layer with out channels on dim 0."""
    scale, shift = _bn_scale_shift(bn)
    w = weight.double() * scale.view(-1, *[1] * (weight.ndim - 1))
    b = shift if bias is None else bias.double() * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def _conv_with(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A copy of `conv`'s geometry carrying the given weight and bias."""
    new = nn.Conv2d(
        conv.in_channels,
        weight.shape[0],
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        device=weight.device,
        dtype=weight.dtype,
    )
    new.weight.data.copy_(weight)
    new.bias.data.copy_(bias)
    return new


def fold_separable_conv(block: DepthwiseSeparableConv) -> None:
    """conv_dw <- bn1 and conv_pw <- bn2 in place; the BatchNorms become identities."""
    block.conv_dw = _conv_with(block.conv_dw, *fold_bn(block.conv_dw.weight, None, block.bn1))
    block.conv_pw = _conv_with(block.conv_pw, *fold_bn(block.conv_pw.weight, None, block.bn2))
    block.bn1, block.bn2 = nn.Identity(), nn.Identity()


# ----------------------------------------------------------------------------- lambda layers
def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] (a view when x is channels-last)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class FastSelfLambda(nn.Module):
    """`SelfLambda` with folded norms, a fused q|k|v projection and no layout passes.

    y_n = q_n^T (lambda_c + lambda_p,n) = q_n^T lambda_c + q_n^T lambda_p,n.  The first term is
    one batched matmul for all positions.  The position conv (value channels folded into the
    batch, as released) writes lambda_p channels-last, i.e. (v, n, k) with k innermost, and the
    second term is one strided batched matmul over n reading it in place (on CPU, one image at
    a time; elsewhere, and under torch.compile, lambda_c + lambda_p is laid out as (B, n, v, k)
    for a single matmul).  A depthwise form (groups = v, k kernels repeated) measured slower.
    """

    def __init__(self, layer: SelfLambda):
        super().__init__()
        h, k, v = layer.heads, layer.dim_k, layer.dim_v
        self.heads, self.dim_k, self.dim_v = h, k, v
        wq, bq = fold_bn(layer.to_q.weight, None, layer.norm_q)
        wv, bv = fold_bn(layer.to_v.weight, None, layer.norm_v)
        wk = layer.to_k.weight
        self.to_qkv = _conv_with(
            layer.to_q, torch.cat([wq, wk, wv]), torch.cat([bq, wk.new_zeros(k), bv])
        )
        pos = layer.pos_conv
        self.register_buffer("pos_weight", pos.weight[:, :, 0].detach().clone())  # (k, 1, r, r)
        self.register_buffer("pos_bias", pos.bias.detach().clone())

    def position_lambdas(self, values: torch.Tensor) -> torch.Tensor:
        """values [B, v, H, W] -> lambda_p [B, n, v, k] (a strided view)."""
        b, v, hgt, wid = values.shape
        # One input channel: give it channels-last strides explicitly (for C = 1 the layouts
        # coincide, and only these strides make oneDNN write the output channels-last).
        folded = values.contiguous().view(b * v, 1, hgt, wid)
        if not torch.compiler.is_compiling():  # inductor chooses layouts itself
            folded = folded.as_strided(folded.shape, (hgt * wid, 1, wid, 1))
        pad = self.pos_weight.shape[-1] // 2
        pos = F.conv2d(folded, self.pos_weight, self.pos_bias, padding=pad)  # (B*v, k, H, W)
        return _rows(pos).reshape(b, v, hgt * wid, self.dim_k).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, C, H, W] (channels-last)."""
        b, _, hgt, wid = x.shape
        h, k, v, n = self.heads, self.dim_k, self.dim_v, hgt * wid
        q, keys, values = self.to_qkv(x).split([h * k, k, v], dim=1)
        # Softmax over positions and the content-lambda sum over n in float32 (bf16-safe).
        keys = keys.flatten(2).float().softmax(dim=-1)  # (B, k, n)
        content = torch.bmm(keys, _rows(values).float()).to(x.dtype)  # (B, k, v)
        q = _rows(q).reshape(b, n, h, k)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            y = self._per_image(q, content, values)
        else:
            pos = self.position_lambdas(values)  # (B, n, v, k), maybe a strided view
            # lambda_c + lambda_p,n in contiguous (B, n, v, k), then one batched matmul.
            lambdas = (pos + content.transpose(1, 2)[:, None]).contiguous()
            y = torch.bmm(q.reshape(b * n, h, k), lambdas.view(b * n, v, k).transpose(1, 2))
        return y.view(b, hgt, wid, h * v).permute(0, 3, 1, 2)  # (B*n, h, v) -> channels-last

    def _per_image(
        self, q: torch.Tensor, content: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """CPU: y = q lambda_c + q lambda_p,n one image at a time -> [B*n, h, v].

        The position lambdas of one image (n, v, k) stay under glibc's largest mmap threshold
        (bigger temporaries are mapped fresh and page-faulted on every call), and the matmul
        reads them through strides, so they are never laid out again.
        """
        b, n, h, k = q.shape
        v = content.shape[-1]
        y = torch.bmm(q.reshape(b, n * h, k), content).view(b, n, h, v)
        for i in range(b):
            pos = self.position_lambdas(values[i : i + 1])[0]  # (n, v, k), a strided view
            y[i].baddbmm_(q[i], pos.transpose(1, 2))
        return y.view(b * n, h, v)


class FastCrossLambda(nn.Module):
    """`CrossLambda` with folded norms and the ids-only lambdas cached per context."""

    def __init__(self, layer: CrossLambda):
        super().__init__()
        self.heads, self.dim_k, self.dim_v = layer.heads, layer.dim_k, layer.dim_v
        self.grid, self.context_len = layer.grid, layer.context_len
        self.to_q = _conv_with(layer.to_q, *fold_bn(layer.to_q.weight, None, layer.norm_q))
        self.to_k = copy.deepcopy(layer.to_k)
        wv, bv = fold_bn(layer.to_v.weight, None, layer.norm_v)
        self.to_v = nn.Linear(wv.shape[1], wv.shape[0], device=wv.device, dtype=wv.dtype)
        self.to_v.weight.data.copy_(wv)
        self.to_v.bias.data.copy_(bv)
        # rel_pos_emb [n, l, k, 1] -> [n, k, l]: per-position (k x l) matrices for one bmm.
        table = layer.rel_pos_emb[..., 0].transpose(1, 2).contiguous().detach()
        self.register_buffer("table", table)
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def context_lambdas(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(content lambda [B, k, v], values^T [B, l, v]) in float32, cached per context."""
        if torch.compiler.is_compiling():  # inside a compiled graph: recomputed, tiny
            return self._context_lambdas(context)
        cache = self._cache  # read once: another thread may replace it meanwhile
        if cache is not None and cache[0].shape == context.shape and torch.equal(cache[0], context):
            return cache[1], cache[2]
        content, values = self._context_lambdas(context)
        self._cache = (context.clone(), content, values)
        return content, values

    def _context_lambdas(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.to_k(context).float().transpose(1, 2).softmax(dim=-1)  # (B, k, l)
        values = self.to_v(context).float()  # (B, l, v), BatchNorm folded in
        return torch.bmm(keys, values), values

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], context [B, l, D] -> [B, C, H, W] (channels-last)."""
        b, _, hgt, wid = x.shape
        h, k, v, n = self.heads, self.dim_k, self.dim_v, hgt * wid
        if n != self.grid**2 or context.shape[1] != self.context_len:
            raise ValueError(
                f"cross-lambda table is sized for a {self.grid}x{self.grid} grid and "
                f"{self.context_len} context tokens, got {hgt}x{wid} and {context.shape[1]}"
            )
        content, values = self.context_lambdas(context)
        q = _rows(self.to_q(x))  # (B, n, h*k)
        y = torch.bmm(q.reshape(b, n * h, k), content.to(q.dtype))  # (B, n*h, v)
        # Position lambda_n = E_n V^T: apply q first, (q E)_n [n, B*h, l], then V^T.
        q_pos = q.reshape(b, n, h, k).transpose(0, 1).reshape(n, b * h, k)
        q_table = torch.bmm(q_pos, self.table.to(q.dtype))  # (n, B*h, l)
        q_table = q_table.view(n, b, h, -1).transpose(0, 1).reshape(b, n * h, -1)
        y = torch.baddbmm(y, q_table, values.to(q.dtype))  # (B, n*h, v)
        return y.view(b, hgt, wid, h * v).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- upsampler
# Nearest 2x upsampling then a 3x3 conv reads, for output row 2i + a, the source rows
# i - 1, i (a = 0: kernel rows {0}, {1, 2}) or i, i + 1 (a = 1: kernel rows {0, 1}, {2}).
# SUBPIXEL_TAPS[a, t, u] = 1 when 3x3 kernel row u lands on 2x2 tap t of phase a.
SUBPIXEL_TAPS = torch.tensor([[[1.0, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]])


class FastUpsample2D(nn.Module):
    """`Upsample2D` (nearest 2x + 3x3 conv) as one 2x2 conv on the source grid: 4/9 of the FLOPs.

    Each of the 4 output phases (a, b) is a 2x2 conv of the zero-padded source with summed
    kernel taps; the phases are interleaved back into the 2H x 2W output.  Other target sizes
    (odd skips) run the plain nearest + 3x3 path.
    """

    def __init__(self, up: nn.Module):
        super().__init__()
        self.conv = up.conv
        taps = SUBPIXEL_TAPS.to(self.conv.weight.dtype)
        w = self.conv.weight.detach().double()  # (Co, Ci, 3, 3)
        w4 = torch.einsum("aiy,bjx,ocyx->abocij", taps.double(), taps.double(), w)
        self.register_buffer("weight", w4.flatten(0, 2).to(self.conv.weight.dtype))  # (4Co,Ci,2,2)
        self.register_buffer("bias", self.conv.bias.detach().repeat(4))

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        b, _, hgt, wid = x.shape
        if size is not None and tuple(size) != (2 * hgt, 2 * wid):
            return self.conv(F.interpolate(x, size=size, mode="nearest"))
        z = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)  # (B, 4Co, H+1, W+1)
        z = z.unflatten(1, (2, 2, -1))  # (B, a, b, Co, H+1, W+1)
        shape = (b, z.shape[3], 2 * hgt, 2 * wid)
        out = torch.empty(shape, dtype=z.dtype, device=z.device, memory_format=torch.channels_last)
        for a in (0, 1):
            for c in (0, 1):
                out[:, :, a::2, c::2] = z[:, a, c, :, a : a + hgt, c : c + wid]
        return out


# ----------------------------------------------------------------------------- layout
class ChannelsLastIn(nn.Module):
    """Runs `module` on a channels-last (and `dtype`) copy of its NCHW input."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))


class ContiguousOut(nn.Module):
    """Returns `module`'s output as an ordinary contiguous NCHW tensor."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).contiguous()


def _replace(model: nn.Module, kind: type, make) -> int:
    """Replace every submodule of type `kind` by `make(module)`; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is kind:
                setattr(parent, name, make(child))
                count += 1
    return count


def _to_channels_last(model: nn.Module) -> None:
    """4-D conv weights to channels-last so mkldnn/cuDNN pick NHWC kernels without reorders."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- entry point
def optimize(
    model: nn.Module, dtype: torch.dtype | None = None, *, compile: bool = False
) -> nn.Module:
    """An optimised inference copy of a student or teacher UNet; `model` itself is untouched.

    Same outputs as the plain model within float32 rounding (dtype None / float32), or a
    reduced-precision copy (bfloat16 / float16) where the device runs it natively.

    `compile=True` also hands the UNet to `torch.compile` (inductor, static shapes, frozen
    weights): it compiles on the first call (minutes, cached on disk for later processes). It
    is meant for GPUs: on CPU the compiled graph measured slower than the eager fast modules.
    """
    from moebius.models.student import MoebiusUNet
    from moebius.models.teacher import PixelHackerUNet

    if not isinstance(model, (MoebiusUNet, PixelHackerUNet)):
        raise TypeError(f"optimize takes a MoebiusUNet or PixelHackerUNet, got {type(model)}")
    device = next(model.parameters()).device
    dtype = resolve_dtype(dtype, device)
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    if isinstance(fast, MoebiusUNet):
        for module in fast.modules():
            if isinstance(module, DepthwiseSeparableConv):
                fold_separable_conv(module)
        _replace(fast, SelfLambda, FastSelfLambda)
        _replace(fast, CrossLambda, FastCrossLambda)
        _replace(fast, Upsample2D, FastUpsample2D)
        _replace(fast, MixTransformer2D, FusedTransformer2D)
        _replace(fast, DWResnetBlock2D, FusedResnet)
        unet = fast.diff_model
        unet.conv_in, unet.conv_out = ChannelsLastIn(unet.conv_in), ContiguousOut(unet.conv_out)
        _to_channels_last(fast)
    fast.to(dtype=dtype)
    if compile:
        if device.type == "cpu":
            logger.warning(
                "torch.compile of the fast UNet measured slower than the eager fast path on "
                "CPU (bench/results/unet_step_compile_cpu.json); it is meant for GPUs"
            )
        target = fast.diff_model if isinstance(fast, MoebiusUNet) else fast
        target.compile(dynamic=False, options={"freezing": True})
    fast.optimized_dtype = dtype
    fast.optimized_compiled = compile
    return fast
