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

# Number of context tokens per category: the embedding holds two categories (background ids
# 0..9, foreground ids 10..19), and a row of input_ids is one category's 10 tokens.
CATEGORIES = 2


@dataclass(frozen=True)
class MoebiusConfig:
    """Architecture of the student; the defaults are the released 0.226B model."""

    sample_size: int = 64  # latent side the cross-lambda tables are sized for (512 px / 8)
    in_channels: int = 9
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    transformer_layers_per_block: int = 1
    num_heads: int = 8  # "attention_head_dim" in the original config (a diffusers naming quirk)
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
            if c % self.num_heads or c % self.norm_num_groups:
                raise ValueError(
                    f"block width {c} must be divisible by num_heads={self.num_heads} and "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        if self.sample_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"sample_size {self.sample_size} must halve at every level")

    @property
    def context_len(self) -> int:
        """Tokens per row of input_ids (10 for the released model)."""
        return self.num_embeddings // CATEGORIES

    @classmethod
    def tiny(cls) -> MoebiusConfig:
        """A few-hundred-k-parameter model with every block type, for fast tests."""
        return cls(
            sample_size=16,
            block_out_channels=(16, 32, 64),
            num_heads=4,
            cross_attention_dim=32,
            encoder_hid_dim=32,
            norm_num_groups=8,
        )

    @classmethod
    def from_original(cls, cfg: dict[str, Any], num_embeddings: int = 20) -> MoebiusConfig:
        """Read the original YAML-style config dict (sections `data`, `vae`, `model`)."""
        model = dict(cfg["model"])
        sample_size = cfg["data"]["image_size"] // cfg["vae"]["downsample_ratio"]
        if "sample_size" in model and model["sample_size"] != sample_size:
            raise ValueError(f"model.sample_size {model['sample_size']} != image/vae {sample_size}")
        for key, supported in [
            ("mid_block_type", None),
            ("use_lambda_cross_attn", True),
            ("use_local_self_attn", True),
            ("encoder_hid_dim_type", "text_proj"),
            ("use_linear_projection", False),
        ]:
            if model.get(key, supported) != supported:
                raise ValueError(
                    f"original setting {key}={model[key]!r} is not the Moebius architecture "
                    f"(supported: {supported!r})"
                )
        heads = model.get("num_attention_heads") or model.get("attention_head_dim", 8)
        if not isinstance(heads, int):
            raise ValueError(f"per-level head counts are not supported, got {heads!r}")
        defaults = cls()
        return cls(
            sample_size=sample_size,
            in_channels=model.get("in_channels", defaults.in_channels),
            out_channels=model.get("out_channels", defaults.out_channels),
            block_out_channels=tuple(model.get("block_out_channels", defaults.block_out_channels)),
            layers_per_block=model.get("layers_per_block", defaults.layers_per_block),
            transformer_layers_per_block=model.get(
                "transformer_layers_per_block", defaults.transformer_layers_per_block
            ),
            num_heads=heads,
            cross_attention_dim=model.get("cross_attention_dim", defaults.cross_attention_dim),
            encoder_hid_dim=model.get("encoder_hid_dim", defaults.encoder_hid_dim),
            num_embeddings=num_embeddings,
            mix_mlp_ratio=model.get("mix_mlp_ratio", defaults.mix_mlp_ratio),
            norm_num_groups=model.get("norm_num_groups", defaults.norm_num_groups),
            norm_eps=model.get("norm_eps", defaults.norm_eps),
            flip_sin_to_cos=model.get("flip_sin_to_cos", defaults.flip_sin_to_cos),
            freq_shift=model.get("freq_shift", defaults.freq_shift),
        )

    def replace(self, **changes) -> MoebiusConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class LambdaUNet(nn.Module):
    """The denoiser (`diff_model`): conv_in, 3 down stages, no mid block, 3 up stages, conv_out."""

    def __init__(self, cfg: MoebiusConfig):
        super().__init__()
        chs = cfg.block_out_channels
        temb_dim = 4 * chs[0]
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = DepthwiseSeparableConv(cfg.in_channels, chs[0])
        self.time_embedding = TimestepEmbedding(chs[0], temb_dim)
        self.encoder_hid_proj = nn.Linear(cfg.encoder_hid_dim, cfg.cross_attention_dim)

        def block_kwargs(level: int) -> dict:
            return dict(
                context_dim=cfg.cross_attention_dim,
                heads=cfg.num_heads,
                grid=cfg.sample_size // 2**level,
                context_len=cfg.context_len,
                local_size=cfg.local_lambda_size,
                mlp_ratio=cfg.mix_mlp_ratio,
                num_layers=cfg.transformer_layers_per_block,
            )

        levels = len(chs)
        skip_chs = [chs[0]]  # channels of every pushed skip, in push order
        self.down_blocks = nn.ModuleList()
        for i, out_ch in enumerate(chs):
            last = i == levels - 1
            in_ch = chs[max(i - 1, 0)]
            self.down_blocks.append(
                DownStage(
                    in_ch,
                    out_ch,
                    cfg.layers_per_block,
                    not last,
                    temb_dim,
                    groups,
                    eps,
                    **block_kwargs(i),
                )
            )
            skip_chs += [out_ch] * (cfg.layers_per_block + (0 if last else 1))
        self.up_blocks = nn.ModuleList()
        prev_ch = chs[-1]
        for i, out_ch in enumerate(reversed(chs)):
            level = levels - 1 - i
            stage_skips = [skip_chs.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(
                UpStage(
                    prev_ch,
                    out_ch,
                    stage_skips,
                    level > 0,
                    temb_dim,
                    groups,
                    eps,
                    **block_kwargs(level),
                )
            )
            prev_ch = out_ch
        self.conv_norm_out = nn.GroupNorm(groups, chs[0], eps=eps)
        self.conv_out = DepthwiseSeparableConv(chs[0], cfg.out_channels)
        self.cfg = cfg

    def forward(self, sample, timesteps, context, return_features: bool = False):
        """sample [B, 9, s, s], timesteps [B], context [B, l, D_hid] -> eps [B, 4, s, s]."""
        cfg = self.cfg
        t_feats = timestep_sinusoid(
            timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
        ).to(sample.dtype)
        temb = self.time_embedding(t_feats)  # (B, 4*C0)
        context = self.encoder_hid_proj(context)  # (B, l, cross_attention_dim)
        x = self.conv_in(sample)
        skips, features = [x], []
        for stage in self.down_blocks:
            x = stage(x, temb, context, skips)
            features.append(x)
        for stage in self.up_blocks:
            x = stage(x, temb, context, skips)
            features.append(x)
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
        return_features: bool = False,
    ):
        """eps [B, 4, s, s]; with `return_features`, also the 6 stage outputs (down0-2, up0-2)."""
        self._check_inputs(sample, input_ids)
        timesteps = expand_timesteps(timesteps, sample.shape[0], sample.device)
        context = self.embedding_layer(input_ids)  # (B, l, encoder_hid_dim)
        return self.diff_model(sample, timesteps, context, return_features)

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
        b, n = sample.shape[0], cfg.context_len
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
