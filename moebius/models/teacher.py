"""PixelHacker, the 0.862B teacher: a Stable Diffusion 1.5 layout UNet with GLA self-attention.

`PixelHackerUNet` = `embedding_layer` (20 learned category tokens of width 3072; ids 0..9 =
"background", 10..19 = "foreground") + `diff_model`, the UNet. Per level the UNet has
`layers_per_block` resnets (each followed by a Transformer2D on every level but the deepest) and
a stride-2 conv between levels; a cross-attention mid block; and a mirrored up path that
concatenates the skips. Inputs are latents only: [B, 9, h, w] = noisy latent (4) | hole mask (1) |
masked-image latent (4); output is the epsilon prediction [B, 4, h, w]. Any latent size works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moebius.models.blocks import Downsample2D, Upsample2D
from moebius.models.embeddings import TimestepEmbedding, expand_timesteps, timestep_sinusoid
from moebius.models.gla import set_gla_kernel
from moebius.models.original_config import read_original
from moebius.models.teacher_blocks import ResnetBlock2D, Transformer2D

# Original model keys that only restate the PixelHacker architecture (see `from_original`).
ORIGINAL_FIXED = {
    "model_type": "UNet2DGLAConditionModel",
    "use_gated_cross_attn": False,
    "transformer_layers_per_block": 1,
}


@dataclass(frozen=True)
class PixelHackerConfig:
    """Architecture of the teacher; the defaults are the released PixelHacker model."""

    in_channels: int = 9  # noisy latent 4 | hole mask 1 | masked-image latent 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    num_attention_heads: int = 8  # "attention_head_dim: 8" in the original config (diffusers quirk)
    cross_attention_dim: int = 768
    encoder_hid_dim: int = 3072  # width of the category tokens before encoder_hid_proj
    num_embeddings: int = 20  # 2 categories x 10 tokens
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    sample_size: int = 64  # training latent size (512 px / 8); the network itself is size-agnostic
    gla_expand_k: float = 0.5
    gla_expand_v: float = 1.0
    gla_gate_low_rank_dim: int = 16
    gla_gate_logit_normalizer: float = 16.0
    gla_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups or channels % self.num_attention_heads:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels}: every width must be divisible "
                    f"by norm_num_groups={self.norm_num_groups} and "
                    f"num_attention_heads={self.num_attention_heads}"
                )
        if self.num_embeddings % 2:
            raise ValueError(f"num_embeddings={self.num_embeddings} must be even (2 categories)")

    @property
    def num_context_tokens(self) -> int:
        """Tokens per category (10): the length of `input_ids` per sample."""
        return self.num_embeddings // 2

    @classmethod
    def tiny(cls) -> PixelHackerConfig:
        """3.3M-parameter teacher for tests (the configuration of the reference parity vectors)."""
        return cls(
            block_out_channels=(32, 64, 64, 64),
            cross_attention_dim=48,
            encoder_hid_dim=96,
            sample_size=32,
        )

    @classmethod
    def from_original(cls, cfg: dict[str, Any], num_embeddings: int = 20) -> PixelHackerConfig:
        """Config from the original YAML dict (sections `data`, `vae`, `model`); unknown keys raise.

        sample_size = data.image_size // vae.downsample_ratio; see `original_config.read_original`.
        """
        return cls(**read_original(cls, cfg, fixed=ORIGINAL_FIXED, num_embeddings=num_embeddings))


def _resnet(c: PixelHackerConfig, in_channels: int, out_channels: int) -> ResnetBlock2D:
    """A resnet with the config's GroupNorm and the time-embedding width 4 * C0."""
    temb_channels = 4 * c.block_out_channels[0]
    return ResnetBlock2D(in_channels, out_channels, temb_channels, c.norm_num_groups, c.norm_eps)


def _transformer(c: PixelHackerConfig, channels: int) -> Transformer2D:
    """A Transformer2D (GLA, cross-attention, GEGLU) with the config's heads and GLA settings."""
    gla_kwargs = {
        "expand_k": c.gla_expand_k,
        "expand_v": c.gla_expand_v,
        "gate_low_rank_dim": c.gla_gate_low_rank_dim,
        "gate_logit_normalizer": c.gla_gate_logit_normalizer,
        "norm_eps": c.gla_norm_eps,
    }
    heads, groups = c.num_attention_heads, c.norm_num_groups
    return Transformer2D(channels, c.cross_attention_dim, heads, groups, gla_kwargs)


class DownBlock(nn.Module):
    """`layers_per_block` x (resnet [+ transformer]), then an optional stride-2 downsampler."""

    def __init__(
        self,
        c: PixelHackerConfig,
        in_channels: int,
        out_channels: int,
        *,
        attention: bool,
        downsample: bool,
    ):
        super().__init__()
        n = c.layers_per_block
        self.attentions = nn.ModuleList(
            [_transformer(c, out_channels) for _ in range(n)] if attention else []
        )
        self.resnets = nn.ModuleList(
            [_resnet(c, in_channels if i == 0 else out_channels, out_channels) for i in range(n)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x, emb, context):
        """x [B, C_in, H, W] -> (output, skips: every resnet/transformer/downsampler output)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet -> transformer -> resnet at the deepest level."""

    def __init__(self, c: PixelHackerConfig):
        super().__init__()
        channels = c.block_out_channels[-1]
        self.attentions = nn.ModuleList([_transformer(c, channels)])
        self.resnets = nn.ModuleList([_resnet(c, channels, channels) for _ in range(2)])

    def forward(self, x, emb, context):
        """x [B, C, H, W] -> [B, C, H, W]."""
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


class UpBlock(nn.Module):
    """(layers_per_block + 1) x (concat skip -> resnet [+ transformer]), optional upsampler."""

    def __init__(
        self,
        c: PixelHackerConfig,
        prev_channels: int,
        out_channels: int,
        skip_channels: list[int],
        *,
        attention: bool,
        upsample: bool,
    ):
        super().__init__()
        self.attentions = nn.ModuleList(
            [_transformer(c, out_channels) for _ in skip_channels] if attention else []
        )
        self.resnets = nn.ModuleList(
            [
                _resnet(c, (prev_channels if i == 0 else out_channels) + skip, out_channels)
                for i, skip in enumerate(skip_channels)
            ]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x, skips: list[torch.Tensor], emb, context, *, upsample_size=None):
        """x [B, C_prev, H, W]; `skips` in push order, the last consumed first -> [B, C_out, ..]."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips), strict=True)):
            x = resnet(torch.cat([x, skip], dim=1), emb)  # up path first, then skip
            if self.attentions:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size=upsample_size)  # to the next skip's size
        return x


class GLAUNet(nn.Module):
    """The UNet (`diff_model`): (sample, timesteps [B], tokens [B, L, encoder_hid_dim]) -> eps."""

    def __init__(self, c: PixelHackerConfig):
        super().__init__()
        widths, levels = c.block_out_channels, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], 4 * widths[0])
        self.encoder_hid_proj = nn.Linear(c.encoder_hid_dim, c.cross_attention_dim)
        # Registration order = the released state dict: down, up, mid.
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        skip_channels = [widths[0]]  # widths of the skips the down path pushes, conv_in first
        # The deepest level has no attention (SD 1.5 DownBlock2D / UpBlock2D); the down path has
        # no downsampler there, the up path none at the top.
        for i, width in enumerate(widths):
            last = i == levels - 1
            self.down_blocks.append(
                DownBlock(c, widths[max(i - 1, 0)], width, attention=not last, downsample=not last)
            )
            skip_channels += [width] * (c.layers_per_block + (not last))  # + downsampler output
        for i, width in enumerate(reversed(widths)):
            prev = widths[levels - max(i, 1)]  # width coming up from the level below
            skips = [skip_channels.pop() for _ in range(c.layers_per_block + 1)]  # consumed order
            self.up_blocks.append(
                UpBlock(c, prev, width, skips, attention=i > 0, upsample=i < levels - 1)
            )
        self.mid_block = MidBlock(c)
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, widths[0], eps=c.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)
        self.config = c

    def forward(
        self, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """sample [B, C_in, H, W], timesteps [B] -> (eps [B, C_out, H, W], block outputs)."""
        c = self.config
        # Sinusoid in float32 (the released model was run with exactly this rounding), then cast.
        t_features = timestep_sinusoid(
            timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift
        ).to(sample.dtype)
        emb = self.time_embedding(t_features)  # (B, 4 * C0)
        context = self.encoder_hid_proj(encoder_hidden_states)  # (B, L, cross_attention_dim)

        x = self.conv_in(sample)
        skips, features = [x], []
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips += block_skips
            features.append(x)  # after the downsampler
        x = self.mid_block(x, emb, context)
        features.append(x)
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, block_skips = skips[:-n], skips[-n:]
            size = tuple(skips[-1].shape[-2:]) if skips else None  # odd sizes line up
            x = block(x, block_skips, emb, context, upsample_size=size)
            features.append(x)  # after the upsampler
        eps = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return eps, features


class PixelHackerUNet(nn.Module):
    """Teacher = category-token embedding + GLA UNet; tensors in, epsilon prediction out."""

    def __init__(self, config: PixelHackerConfig | None = None):
        super().__init__()
        self.config = config = PixelHackerConfig() if config is None else config
        self.embedding_layer = nn.Embedding(config.num_embeddings, config.encoder_hid_dim)
        self.diff_model = GLAUNet(config)

    def set_gla_kernel(self, name: str) -> PixelHackerUNet:
        """Use GLA kernel `name` ("auto", "chunked", "recurrent") in every layer; returns self."""
        set_gla_kernel(self, name)
        return self

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor | int,
        input_ids: torch.Tensor,
        *,
        return_features: bool = False,
    ):
        """eps [B, 4, h, w] for sample [B, 9, h, w], timesteps [1] or [B], input_ids [B, 10].

        With `return_features`, also the 2 * levels + 1 block outputs (down blocks after their
        downsampler, mid, up blocks after their upsampler) for feature distillation.
        """
        self._check_inputs(sample, input_ids)
        timesteps = expand_timesteps(timesteps, sample.shape[0], sample.device)
        tokens = self.embedding_layer(input_ids)  # (B, 10, encoder_hid_dim)
        eps, features = self.diff_model(sample, timesteps, tokens)
        return (eps, features) if return_features else eps

    def _check_inputs(self, sample: torch.Tensor, input_ids: torch.Tensor) -> None:
        c, dtype = self.config, self.embedding_layer.weight.dtype
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(
                f"sample must be [B, {c.in_channels}, h, w] (noisy latent 4 | mask 1 | "
                f"masked-image latent 4), got {list(sample.shape)}"
            )
        if sample.dtype != dtype:
            raise TypeError(f"sample is {sample.dtype} but the model is {dtype}; cast one of them")
        expected = [sample.shape[0], c.num_context_tokens]
        if list(input_ids.shape) != expected or input_ids.is_floating_point():
            raise ValueError(
                f"input_ids must be integer [B, {c.num_context_tokens}] = {expected} (ids 0..9 "
                f"background, 10..19 foreground), got {input_ids.dtype} {list(input_ids.shape)}"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= c.num_embeddings):
            raise ValueError(
                f"input_ids must lie in [0, {c.num_embeddings}), got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
