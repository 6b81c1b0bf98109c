"""The Moebius student: a 3-level latent-diffusion UNet built from LlambdaMI blocks (0.226B).

`MoebiusUNet` = `embedding_layer` (20 category embeddings) + `diff_model` (the UNet), the layout of
the released `diffusion_pytorch_model.bin`. It predicts the noise eps of a 4-channel latent from
a 9-channel input [noisy latent x_t (4) | hole mask (1) | masked-image latent (4)].

Eval vs train mode matters: the network is full of BatchNorms. `model.eval()` uses their running
statistics, which is what the released weights need at inference; `train()` uses batch statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moebius.models.blocks import DepthwiseSeparableConv, DownStage, UpStage
from moebius.models.embeddings import TimestepEmbedding, expand_timesteps, timestep_sinusoid
from moebius.models.original_config import read_original

# Number of context tokens per category: the embedding holds two categories (background ids
# 0..9, foreground ids 10..19), and a row of input_ids is one category's 10 tokens.
CATEGORIES = 2
# Original model keys that only restate the Moebius architecture (see `from_original`).
ORIGINAL_FIXED = {
    "model_type": "UNet2DLambdaDWConvMixFFNConditionModel_prune_down_mid_up_block_8x8",
    "mid_block_type": None,
    "use_lambda_cross_attn": True,
    "use_local_self_attn": True,
}


@dataclass(frozen=True)
class MoebiusConfig:
    """Architecture of the student; the defaults are the released 0.226B model."""

    sample_size: int = 64  # latent side the cross-lambda tables are sized for (512 px / 8)
    in_channels: int = 9
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    transformer_layers_per_block: int = 1
    num_attention_heads: int = 8  # "attention_head_dim" in the original config (diffusers quirk)
    cross_attention_dim: int = 768
    encoder_hid_dim: int = 3072
    num_embeddings: int = 20
    mix_mlp_ratio: float = 2.5
    local_lambda_size: int = 15
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0

    def __post_init__(self):
        for c in self.block_out_channels:
            if c % self.num_attention_heads or c % self.norm_num_groups:
                raise ValueError(
                    f"block width {c} must be divisible by "
                    f"num_attention_heads={self.num_attention_heads} and "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        if self.sample_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"sample_size {self.sample_size} must halve at every level")

    @property
    def num_context_tokens(self) -> int:
        """Tokens per category (10): the length of `input_ids` per sample."""
        return self.num_embeddings // CATEGORIES

    @classmethod
    def tiny(cls) -> MoebiusConfig:
        """A few-hundred-k-parameter model with every block type, for fast tests."""
        return cls(
            sample_size=16,
            block_out_channels=(16, 32, 64),
            num_attention_heads=4,
            cross_attention_dim=32,
            encoder_hid_dim=32,
            norm_num_groups=8,
        )

    @classmethod
    def from_original(cls, cfg: dict[str, Any], num_embeddings: int = 20) -> MoebiusConfig:
        """Config from the original YAML dict (sections `data`, `vae`, `model`); unknown keys raise.

        sample_size = data.image_size // vae.downsample_ratio; see `original_config.read_original`.
        """
        model = dict(cfg.get("model", {}))
        for key, block in (("down_block_types", "DWMixTFDownBlock2D"),
                           ("up_block_types", "DWMixTFUpBlock2D")):  # fmt: skip
            types = model.pop(key, None)
            if types is not None and set(types) != {block}:
                raise ValueError(f"original {key} {types} is not the Moebius architecture")
        return cls(**read_original(cls, {**cfg, "model": model}, fixed=ORIGINAL_FIXED,
                                   num_embeddings=num_embeddings))  # fmt: skip

    def replace(self, **changes) -> MoebiusConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class LambdaUNet(nn.Module):
    """The denoiser (`diff_model`): conv_in, 3 down stages, no mid block, 3 up stages, conv_out."""

    def __init__(self, config: MoebiusConfig):
        super().__init__()
        c, widths = config, config.block_out_channels
        levels, temb_dim = len(widths), 4 * widths[0]
        self.conv_in = DepthwiseSeparableConv(c.in_channels, widths[0])
        self.time_embedding = TimestepEmbedding(widths[0], temb_dim)
        self.encoder_hid_proj = nn.Linear(c.encoder_hid_dim, c.cross_attention_dim)

        def stage_kwargs(level: int) -> dict:
            return dict(
                temb_dim=temb_dim,
                groups=c.norm_num_groups,
                eps=c.norm_eps,
                context_dim=c.cross_attention_dim,
                heads=c.num_attention_heads,
                grid=c.sample_size // 2**level,
                num_context_tokens=c.num_context_tokens,
                local_size=c.local_lambda_size,
                mlp_ratio=c.mix_mlp_ratio,
                num_layers=c.transformer_layers_per_block,
            )

        skip_widths = [widths[0]]  # width of every skip the down path returns, conv_in first
        self.down_blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            last = i == levels - 1
            self.down_blocks.append(
                DownStage(widths[max(i - 1, 0)], width, c.layers_per_block,
                          downsample=not last, **stage_kwargs(i))
            )  # fmt: skip
            skip_widths += [width] * (c.layers_per_block + (not last))  # + downsampler output
        self.up_blocks = nn.ModuleList()
        for i, width in enumerate(reversed(widths)):
            level = levels - 1 - i
            skips = [skip_widths.pop() for _ in range(c.layers_per_block + 1)]  # consumed order
            prev = widths[min(level + 1, levels - 1)]  # width coming up from the level below
            self.up_blocks.append(
                UpStage(prev, width, skips, upsample=level > 0, **stage_kwargs(level))
            )
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, widths[0], eps=c.norm_eps)
        self.conv_out = DepthwiseSeparableConv(widths[0], c.out_channels)
        self.config = config

    def forward(self, sample, timesteps, context, *, return_features: bool = False):
        """sample [B, 9, s, s], timesteps [B], context [B, l, D_hid] -> eps [B, 4, s, s]."""
        c = self.config
        t_feats = timestep_sinusoid(
            timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift
        ).to(sample.dtype)
        temb = self.time_embedding(t_feats)  # (B, 4*C0)
        context = self.encoder_hid_proj(context)  # (B, l, cross_attention_dim)
        x = self.conv_in(sample)
        skips, features = [x], []
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
            features.append(x)  # after the downsampler
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, block_skips = skips[:-n], skips[-n:]
            size = tuple(skips[-1].shape[-2:]) if skips else None  # odd sizes line up
            x = block(x, block_skips, temb, context, upsample_size=size)
            features.append(x)  # after the upsampler
        eps = self.conv_out(F.silu(self.conv_norm_out(x)))
        return (eps, features) if return_features else eps


class MoebiusUNet(nn.Module):
    """Category embedding + LambdaUNet: `model(sample, timesteps, input_ids) -> eps`."""

    def __init__(self, config: MoebiusConfig | None = None):
        super().__init__()
        self.config = config or MoebiusConfig()
        self.embedding_layer = nn.Embedding(self.config.num_embeddings, self.config.encoder_hid_dim)
        self.diff_model = LambdaUNet(self.config)

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor | int,
        input_ids: torch.Tensor,
        *,
        return_features: bool = False,
    ):
        """eps [B, 4, s, s]; with `return_features`, also the 6 stage outputs (down0-2, up0-2)."""
        self._check_inputs(sample, input_ids)
        timesteps = expand_timesteps(timesteps, sample.shape[0], sample.device)
        context = self.embedding_layer(input_ids)  # (B, l, encoder_hid_dim)
        return self.diff_model(sample, timesteps, context, return_features=return_features)

    def _check_inputs(self, sample: torch.Tensor, input_ids: torch.Tensor) -> None:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"sample must be [B, {cfg.in_channels}, H, W] (noisy latent 4 | mask 1 | "
                f"masked-image latent 4), got {list(sample.shape)}"
            )
        s = cfg.sample_size
        if tuple(sample.shape[-2:]) != (s, s):
            raise ValueError(
                f"this model runs only on a {s}x{s} latent (its cross-lambda position tables are "
                f"sized for it), i.e. {s * 8}x{s * 8}-pixel images with an 8x VAE; got a "
                f"{sample.shape[-2]}x{sample.shape[-1]} latent. Resize or crop to the native size "
                "(InpaintPipeline's size strategies do this for any image)."
            )
        b, n = sample.shape[0], cfg.num_context_tokens
        if input_ids.shape != (b, n) or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor of shape [B, {n}] = [{b}, {n}], got "
                f"{input_ids.dtype} {list(input_ids.shape)}"
            )
        if input_ids.device.type == "meta" or not input_ids.numel():
            return  # shape-only runs have no values to check
        if input_ids.min() < 0 or input_ids.max() >= cfg.num_embeddings:
            raise ValueError(
                f"input_ids must lie in [0, {cfg.num_embeddings}), got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
