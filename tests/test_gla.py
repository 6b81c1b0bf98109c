"""Gated linear attention: chunked vs token-by-token kernels and the reference layer vectors."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path
from safetensors import safe_open
from safetensors.torch import load_file

from moebius.models.gla import (
    KERNELS,
    GatedLinearAttention,
    gla_chunked,
    gla_recurrent,
    set_gla_kernel,
)


def random_qkvg(batch, length, heads, dim_k, dim_v, gate_scale, dtype, seed=0):
    """q, k, v ~ N(0, 1) and log gates g = logsigmoid(gate_scale * N(0,1) - gate_scale) <= 0."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k = randn(batch, length, heads, dim_k), randn(batch, length, heads, dim_k)
    v = randn(batch, length, heads, dim_v)
    g = F.logsigmoid(gate_scale * randn(batch, length, heads, dim_k) - gate_scale)
    return tuple(x.to(dtype) for x in (q, k, v, g))


@pytest.fixture(scope="module")
def vectors():
    return load_file(shared_path("reference", "parity_teacher", "gla_layer.safetensors"))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 5e-5), (torch.float64, 1e-11)])
@pytest.mark.parametrize(
    "length, chunk_size, gate_scale",
    [(1, 64, 1.0), (37, 16, 0.1), (130, 64, 1.0), (100, 32, 4.0), (64, 64, 30.0)],
)
def test_chunked_matches_recurrent(dtype, atol, length, chunk_size, gate_scale):
    # T not a multiple of the chunk, mild to extreme decay (scale 30: log gates down to ~-100 per
    # token, where a factored exp(b_t) * exp(-b_s) would overflow in float32).
    q, k, v, g = random_qkvg(2, length, 3, 5, 7, gate_scale, dtype)
    o_ref, state_ref = gla_recurrent(q, k, v, g)
    o, state = gla_chunked(q, k, v, g, chunk_size=chunk_size)
    assert o.shape == v.shape and o.dtype == dtype and state.shape == (2, 3, 5, 7)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, atol=atol, rtol=0)
    torch.testing.assert_close(state, state_ref, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 5e-5), (torch.float64, 1e-11)])
@pytest.mark.parametrize("gate_scale", [1.0, 30.0])
def test_chunked_blocks_carry_the_state(dtype, atol, gate_scale):
    # Several token blocks (block_size 40 rounds down to 2 chunks of 16), a ragged last block and
    # a padded last chunk: the state must be carried exactly from block to block.
    q, k, v, g = random_qkvg(2, 150, 3, 5, 7, gate_scale, dtype, seed=1)
    o_ref, state_ref = gla_recurrent(q, k, v, g)
    o, state = gla_chunked(q, k, v, g, chunk_size=16, block_size=40)
    torch.testing.assert_close(o, o_ref, atol=atol, rtol=0)
    torch.testing.assert_close(state, state_ref, atol=atol, rtol=0)
    o_one_block, _ = gla_chunked(q, k, v, g, chunk_size=16, block_size=1024)
    torch.testing.assert_close(o, o_one_block, atol=atol, rtol=0)


def test_chunked_is_causal():
    q, k, v, g = random_qkvg(1, 90, 2, 4, 4, 1.0, torch.float64)
    v_changed = v.clone()
    v_changed[:, 50:] += 1.0  # only tokens >= 50 change
    o, _ = gla_chunked(q, k, v, g, chunk_size=16)
    o_changed, _ = gla_chunked(q, k, v_changed, g, chunk_size=16)
    assert torch.equal(o[:, :50], o_changed[:, :50])
    assert (o[:, 50:] - o_changed[:, 50:]).abs().max() > 0.1


def test_half_precision_inputs_run_in_float32():
    q, k, v, g = random_qkvg(1, 40, 2, 4, 6, 1.0, torch.float32)
    o_ref, _ = gla_recurrent(q, k, v, g)
    o, state = gla_chunked(*(x.bfloat16() for x in (q, k, v, g)))
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(o.float(), o_ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("name", ["kernel_typical", "kernel_strong"])
@pytest.mark.parametrize("kernel", [gla_chunked, gla_recurrent])
def test_kernel_vectors(vectors, name, kernel):
    q, k, v, g = (vectors[f"{name}.{x}"] for x in "qkvg")
    o, state = kernel(q, k, v, g)
    assert (o - vectors[f"{name}.o"]).abs().max() <= 5e-5
    assert (state - vectors[f"{name}.final_state"]).abs().max() <= 5e-5
    o, state = kernel(q.double(), k.double(), v.double(), g.double())
    assert (o - vectors[f"{name}.o_fp64"]).abs().max() <= 1e-10
    assert (state - vectors[f"{name}.final_state_fp64"]).abs().max() <= 1e-10


def reference_layer(vectors) -> GatedLinearAttention:
    path = shared_path("reference", "parity_teacher", "gla_layer.safetensors")
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["gla_layer_config"])
    layer = GatedLinearAttention(
        config["hidden_size"],
        num_heads=config["num_heads"],
        expand_k=config["expand_k"],
        expand_v=config["expand_v"],
        gate_low_rank_dim=config["gate_low_rank_dim"],
        gate_logit_normalizer=config["gate_logit_normalizer"],
        norm_eps=config["norm_eps"],
    )
    prefix = "weights."
    weights = {k[len(prefix) :]: v for k, v in vectors.items() if k.startswith(prefix)}
    layer.load_state_dict(weights, strict=True)
    return layer.eval()


@pytest.mark.parametrize("case", ["T100", "T16", "T200"])
@pytest.mark.parametrize("kernel", ["chunked", "recurrent"])
@pytest.mark.parametrize("recurrence_dtype", [None, torch.float32])  # None: float64 on CPU
def test_layer_vectors(vectors, case, kernel, recurrence_dtype):
    layer = reference_layer(vectors)
    layer.kernel, layer.recurrence_dtype = kernel, recurrence_dtype
    x = vectors[f"{case}.x"]
    with torch.no_grad():
        assert (layer(x) - vectors[f"{case}.y"]).abs().max() <= 5e-5
        # The layer's kernel call on its recorded arguments ([B, T, H, D]).
        args = [vectors[f"{case}.kernel.{name}"] for name in ("q", "k", "v", "gk")]
        o, _ = KERNELS[kernel](*args)
        assert (o - vectors[f"{case}.kernel.o"]).abs().max() <= 5e-5
        y64 = layer.double()(x.double())
    assert y64.dtype == torch.float64
    assert (y64 - vectors[f"{case}.y_fp64"]).abs().max() <= 1e-10


def test_layer_shapes_and_kernel_choice():
    layer = GatedLinearAttention(64, num_heads=8)
    names = [name for name, _ in layer.named_parameters()]
    assert names == [
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "g_proj.weight",
        "gk_proj.0.weight",
        "gk_proj.1.weight",
        "gk_proj.1.bias",
        "o_proj.weight",
        "g_norm_swish_gate.weight",
    ]
    assert layer.q_proj.weight.shape == (32, 64) and layer.gk_proj[1].weight.shape == (32, 16)
    assert layer.g_norm_swish_gate.weight.shape == (8,)  # value dim 64 / 8 heads
    assert sum(p.numel() for p in layer.parameters()) == 4 * 64**2 + 24.625 * 64
    set_gla_kernel(torch.nn.Sequential(layer), "recurrent")
    assert layer.kernel == "recurrent"
    with pytest.raises(ValueError, match="unknown GLA kernel"):
        layer.kernel = "flash"
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GatedLinearAttention(40, num_heads=16)
