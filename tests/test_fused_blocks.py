"""`moebius.models.fused_blocks`: fused / in-place blocks compute the plain blocks' function.

Each block runs both through oneDNN's fused convolutions (eager CPU) and through the separate-op
fallback (mkldnn disabled: what other devices and torch.compile traces run), in NCHW and
channels-last, and must match the plain block within float32 rounding and leave its input intact.
"""

import copy

import pytest
import torch
from test_optimize import _randomize_batchnorms

from moebius.models.blocks import (
    DepthwiseSeparableConv,
    DWResnetBlock2D,
    MixFFN,
    MixTransformer2D,
)
from moebius.models.fused_blocks import (
    FusedMixFFN,
    FusedResnet,
    FusedSeparableConv,
    FusedTransformer2D,
    conv_act,
    conv_add,
    conv_add_,
)
from moebius.models.lambda_layers import SelfLambda
from moebius.models.optimize import FastSelfLambda, fold_separable_conv

CL = torch.channels_last
# torch.backends.mkldnn.flags() warns about an Intel-GPU-only TF32 switch it also resets.
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")


def _check(fused, plain, *inputs, channels_last: bool, mkldnn: bool, rtol: float = 1e-5):
    """fused(*inputs) == plain(*inputs) within rtol of the output's scale; inputs untouched."""
    with torch.no_grad():
        ref = plain(*inputs)
        if channels_last:
            inputs = [x.contiguous(memory_format=CL) if x.ndim == 4 else x for x in inputs]
        copies = [x.clone() for x in inputs]
        with torch.backends.mkldnn.flags(enabled=mkldnn):
            out = fused(*inputs)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= rtol * ref.abs().max()
    for x, before in zip(inputs, copies, strict=True):
        assert torch.equal(x, before), "a fused block wrote into its input"
    return out


paths = pytest.mark.parametrize(
    "channels_last,mkldnn", [(False, True), (True, True), (True, False), (False, False)]
)


def test_conv_helpers_match_separate_ops():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=CL)
    other = torch.randn(2, 12, 9, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        y = conv(x)
        assert torch.allclose(conv_act(conv, x, "swish"), torch.nn.functional.silu(y), atol=1e-6)
        assert torch.allclose(conv_act(conv, x, "relu"), y.relu(), atol=1e-6)
        assert torch.allclose(conv_add(conv, x, other), y + other, atol=1e-6)
        acc = other.clone()
        out = conv_add_(acc, conv, x)
        assert out.data_ptr() == acc.data_ptr() and torch.allclose(acc, y + other, atol=1e-6)
        # Mixed layouts take the separate-op path and still agree.
        assert torch.allclose(conv_add(conv, x, other.contiguous()), y + other, atol=1e-6)


@paths
@pytest.mark.parametrize("in_ch,out_ch", [(16, 16), (16, 24)])
def test_fused_separable_conv(in_ch, out_ch, channels_last, mkldnn):
    torch.manual_seed(0)
    plain = _randomize_batchnorms(DepthwiseSeparableConv(in_ch, out_ch))
    x = torch.randn(2, in_ch, 10, 9)
    folded = copy.deepcopy(plain)
    fold_separable_conv(folded)
    _check(FusedSeparableConv(folded), plain, x, channels_last=channels_last, mkldnn=mkldnn)


def test_fused_separable_conv_needs_folded_norms():
    with pytest.raises(ValueError, match="fold the BatchNorms"):
        FusedSeparableConv(DepthwiseSeparableConv(8, 8))


@paths
@pytest.mark.parametrize("in_ch,out_ch", [(32, 32), (48, 32)])
def test_fused_resnet(in_ch, out_ch, channels_last, mkldnn):
    torch.manual_seed(0)
    plain = _randomize_batchnorms(DWResnetBlock2D(in_ch, out_ch, 20, groups=8, eps=1e-5))
    fused_src = copy.deepcopy(plain)
    for module in fused_src.modules():
        if isinstance(module, DepthwiseSeparableConv):
            fold_separable_conv(module)
    fused = FusedResnet(fused_src)
    x, temb = torch.randn(2, in_ch, 8, 10), torch.randn(2, 20)
    _check(fused, plain, x, temb, channels_last=channels_last, mkldnn=mkldnn)


@paths
def test_fused_mixffn_with_and_without_residual(channels_last, mkldnn):
    torch.manual_seed(0)
    plain = MixFFN(16, mlp_ratio=2.5).eval()
    fused = FusedMixFFN(plain)
    assert fused.expand_value.out_channels == fused.depth_gate.out_channels == 40
    x = torch.randn(2, 16, 9, 11)
    _check(fused, plain, x, channels_last=channels_last, mkldnn=mkldnn)
    residual = torch.randn(2, 16, 9, 11)
    layout = CL if channels_last else torch.contiguous_format
    acc = residual.clone().contiguous(memory_format=layout)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=mkldnn):
        out = fused(x.contiguous(memory_format=layout), residual=acc)
        ref = plain(x) + residual
    assert out.data_ptr() == acc.data_ptr()  # accumulated in place
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@paths
def test_fused_transformer(channels_last, mkldnn):
    torch.manual_seed(0)
    kwargs = dict(context_dim=24, heads=4, grid=6, num_context_tokens=5, local_size=5)
    plain = _randomize_batchnorms(MixTransformer2D(32, groups=8, mlp_ratio=2.5, **kwargs))
    fused = FusedTransformer2D(plain)
    x, context = torch.randn(2, 32, 6, 6), torch.randn(2, 5, 24)
    _check(fused, plain, x, context, channels_last=channels_last, mkldnn=mkldnn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_self_lambda_cpu_and_layout_paths_agree(dtype, monkeypatch):
    """The per-image strided path (eager CPU) and the laid-out path (GPU, torch.compile)."""
    torch.manual_seed(0)
    layer = _randomize_batchnorms(SelfLambda(32, heads=4, dim_k=8, local_size=7))
    fast = FastSelfLambda(layer).to(dtype)
    x = torch.randn(3, 32, 10, 12).to(dtype).contiguous(memory_format=CL)
    with torch.no_grad():
        per_image = fast(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        laid_out = fast(x)
        ref = layer(x.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (per_image.float() - laid_out.float()).abs().max() <= tol * ref.abs().max()
    assert (per_image.float() - ref).abs().max() <= tol * ref.abs().max() * 2
