"""Building blocks of the Moebius student: depthwise-separable resnets, MixFFN, the LlambdaMI
transformer block and its 2-D wrapper, down/upsamplers and the down/up stages.

Module and attribute names follow the released checkpoint (diffusers / timm / Sana naming), so
its state dict loads with strict=True.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moebius.models.lambda_layers import CrossLambda, SelfLambda

# The transformer wrapper's GroupNorm uses eps 1e-6 (diffusers Transformer2DModel), unlike the
# 1e-5 of the resnets and the output norm: a quirk of the released model that the weights expect.
TRANSFORMER_NORM_EPS = 1e-6


class DepthwiseSeparableConv(nn.Module):
    """y = BN2(PW_1x1(ReLU(BN1(DW_kxk(x))))) (+ x when in == out): timm's DepthwiseSeparableConv."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, *, skip: bool = True):
        super().__init__()
        self.conv_dw = nn.Conv2d(
            in_ch, in_ch, kernel_size, padding=kernel_size // 2, groups=in_ch, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv_pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.has_skip = skip and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(F.relu(self.bn1(self.conv_dw(x)))))
        return y + x if self.has_skip else y


class DWResnetBlock2D(nn.Module):
    """Diffusers ResnetBlock2D with depthwise-separable convs; the time embedding adds a bias."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = DepthwiseSeparableConv(in_ch, out_ch)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = DepthwiseSeparableConv(out_ch, out_ch)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # per-channel bias (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class _Conv(nn.Module):
    """A conv held under `.conv` (Sana's ConvLayer naming, kept for checkpoint keys)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MixFFN(nn.Module):
    """Sana GLUMBConv: 1x1 expand + SiLU, depthwise 3x3, gated (a * SiLU(g)), 1x1 project; NCHW."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.inverted_conv = _Conv(nn.Conv2d(dim, 2 * hidden, 1))
        self.depth_conv = _Conv(nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden))
        self.point_conv = _Conv(nn.Conv2d(hidden, dim, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depth_conv(F.silu(self.inverted_conv(x)))  # (B, 2F, H, W)
        a, gate = x.chunk(2, dim=1)
        return self.point_conv(a * F.silu(gate))


def _layer_norm_2d(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over channels of an NCHW map (= the token LayerNorm of the original)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LambdaTransformerBlock(nn.Module):
    """LlambdaMI block: x += SelfLambda(LN1 x); x += CrossLambda(LN2 x, c); x += MixFFN(LN3 x).

    Runs on NCHW maps: the original flattens to row-major tokens and back, which is the same math.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        heads: int,
        grid: int,
        num_context_tokens: int,
        local_size: int,
        mlp_ratio: float,
    ):
        super().__init__()
        dim_k = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfLambda(dim, heads, dim_k, local_size)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossLambda(dim, context_dim, heads, dim_k, grid, num_context_tokens)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = MixFFN(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(_layer_norm_2d(self.norm1, x))
        x = x + self.attn2(_layer_norm_2d(self.norm2, x), context)
        return x + self.ff(_layer_norm_2d(self.norm3, x))


class MixTransformer2D(nn.Module):
    """Diffusers Transformer2DModel wrapper: GN -> 1x1 proj_in -> block -> 1x1 proj_out -> + x."""

    def __init__(self, dim: int, groups: int, num_layers: int = 1, **block_kwargs):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(
            LambdaTransformerBlock(dim, **block_kwargs) for _ in range(num_layers)
        )
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(self.norm(x))
        for block in self.transformer_blocks:
            h = block(h, context)
        return self.proj_out(h) + x


class Downsample2D(nn.Module):
    """Full 3x3 conv with stride 2 (padding 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest upsampling to `size` (2x by default), then a full 3x3 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class DownStage(nn.Module):
    """[resnet, transformer] x layers, then an optional stride-2 downsampler."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        layers: int,
        *,
        downsample: bool,
        temb_dim: int,
        groups: int,
        eps: float,
        **transformer_kwargs,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            DWResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_dim, groups, eps)
            for i in range(layers)
        )
        self.attentions = nn.ModuleList(
            MixTransformer2D(out_ch, groups, **transformer_kwargs) for _ in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, x, temb, context) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, C_in, H, W] -> (output, skips: every transformer/downsampler output)."""
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            x = attn(resnet(x, temb), context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpStage(nn.Module):
    """[cat(x, skip) -> resnet -> transformer] x (layers + 1), then an optional 2x upsampler."""

    def __init__(
        self,
        prev_ch: int,
        out_ch: int,
        skip_chs: list[int],
        *,
        upsample: bool,
        temb_dim: int,
        groups: int,
        eps: float,
        **transformer_kwargs,
    ):
        super().__init__()
        in_chs = [prev_ch] + [out_ch] * (len(skip_chs) - 1)
        self.resnets = nn.ModuleList(
            DWResnetBlock2D(c + s, out_ch, temb_dim, groups, eps)
            for c, s in zip(in_chs, skip_chs, strict=True)
        )
        self.attentions = nn.ModuleList(
            MixTransformer2D(out_ch, groups, **transformer_kwargs) for _ in skip_chs
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, skips: list[torch.Tensor], temb, context, *, upsample_size=None):
        """x [B, C_prev, H, W]; `skips` in push order, the last consumed first -> [B, C_out, ..]."""
        for resnet, attn, skip in zip(self.resnets, self.attentions, reversed(skips), strict=True):
            x = attn(resnet(torch.cat([x, skip], dim=1), temb), context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size=upsample_size)  # to the next skip's size
        return x
