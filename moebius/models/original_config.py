"""Reading the original YAML-style configs (sections `data`, `vae`, `model`) into our fields.

Both networks use the same rules, so one function holds them: the original's names are mapped
onto ours (`attention_head_dim` is really the number of heads, a diffusers naming quirk), keys
that only restate the architecture must hold the value the architecture has, and any other key
is an error: ignoring it could silently build another network than the one the weights expect.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Original name -> our field name (the same for both networks).
RENAMES = {"attention_head_dim": "num_attention_heads"}

# diffusers UNet2DConditionModel keys whose default is the only value both networks support.
DIFFUSERS_FIXED = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim_type": "text_proj",
}
# Keys that describe nothing our networks build (no class embedding exists to project).
DEAD = ("projection_class_embeddings_input_dim", "addition_embed_type_num_heads")


def read_original(
    config_cls: type, cfg: dict[str, Any], *, fixed: dict[str, Any], num_embeddings: int
) -> dict[str, Any]:
    """Constructor keywords of `config_cls` from an original config dict.

    `fixed` adds the network's own must-have values (block types, model_type, ...) to
    DIFFUSERS_FIXED. sample_size = data.image_size // vae.downsample_ratio.
    """
    missing = [section for section in ("data", "vae", "model") if section not in cfg]
    if missing:
        raise ValueError(f"original config lacks section(s) {missing}; it has {sorted(cfg)}")
    model = dict(cfg["model"])
    for key, value in {**DIFFUSERS_FIXED, **fixed}.items():
        given = model.pop(key, value)
        given = list(given) if isinstance(given, tuple) else given
        if given != (list(value) if isinstance(value, tuple) else value):
            raise ValueError(
                f"original setting model.{key}={given!r} is not the {config_cls.__name__} "
                f"architecture (supported: {value!r})"
            )
    for key in DEAD:
        model.pop(key, None)
    if model.get("num_attention_heads") is not None and "attention_head_dim" in model:
        model.pop("attention_head_dim")  # diffusers: num_attention_heads wins when set
    elif model.get("num_attention_heads", 0) is None:
        model.pop("num_attention_heads")
    sample_size = cfg["data"]["image_size"] // cfg["vae"]["downsample_ratio"]
    if model.pop("sample_size", sample_size) != sample_size:
        raise ValueError(f"model.sample_size differs from data.image_size // vae {sample_size}")
    if model.pop("num_embeddings", num_embeddings) != num_embeddings:
        raise ValueError(f"model.num_embeddings differs from num_embeddings={num_embeddings}")
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"sample_size", "num_embeddings"}
    unknown = sorted(set(model) - fields - set(RENAMES))
    if unknown:
        raise ValueError(
            f"unsupported original model keys {unknown} for {config_cls.__name__}; supported: "
            f"{sorted(fields | set(RENAMES) | set(DIFFUSERS_FIXED) | set(fixed))}"
        )
    kwargs = {RENAMES.get(k, k): tuple(v) if isinstance(v, list) else v for k, v in model.items()}
    heads = kwargs.get("num_attention_heads")
    if heads is not None and not isinstance(heads, int):
        raise ValueError(f"per-level head counts are not supported, got {heads!r}")
    return {**kwargs, "sample_size": sample_size, "num_embeddings": num_embeddings}
