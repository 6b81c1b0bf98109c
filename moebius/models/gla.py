"""Gated linear attention (GLA), the self-attention of the PixelHacker teacher.

Per head, over tokens t = 1..T in row-major (raster) order, with zero initial state:

    S_t = diag(a_t) S_{t-1} + k_t^T v_t        S: [K, V], a_t = exp(g_t) in (0, 1]^K
    o_t = (q_t / sqrt(K)) S_t

It is causal: token t only sees tokens <= t. Two kernels compute it with one signature
`(q, k, v, g) -> (o, final_state)` on tensors laid out [B, T, H, D] (g = log forget gate):
`gla_recurrent` (token by token, the readable reference) and `gla_chunked` (parallel within
chunks, a short loop over chunks; pure PyTorch, any device, any T). `gla_auto` uses
flash-linear-attention's fused `chunk_gla` on CUDA when it is installed, else `gla_chunked`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The recurrence runs in at least float32 (fp16/bf16 inputs are upcast, float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def gla_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token GLA: q, k, g [B,T,H,K], v [B,T,H,V] -> o [B,T,H,V], final state [B,H,K,V]."""
    batch, length, heads, dim_k = q.shape
    scale = dim_k**-0.5 if scale is None else scale
    out_dtype, dtype = v.dtype, _compute_dtype(q.dtype)
    q, k, v, g = (x.to(dtype).transpose(1, 2) for x in (q, k, v, g))  # (B, H, T, D)
    state = q.new_zeros(batch, heads, dim_k, v.shape[-1])  # S_0 = 0, (B, H, K, V)
    outputs = []
    for t in range(length):
        # S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t
        state = state * g[:, :, t, :, None].exp() + k[:, :, t, :, None] * v[:, :, t, None, :]
        # o_t = (q_t * scale) S_t
        outputs.append((q[:, :, t, :, None] * scale * state).sum(dim=-2))
    o = torch.stack(outputs, dim=2) if outputs else v.new_zeros(v.shape)
    return o.transpose(1, 2).to(out_dtype), state


# Intra-chunk scores use exp(b_t - b_s) = exp(b_t) * exp(-b_s), i.e. one matmul, while a chunk's
# log decay spans at most this much: exp(+-30) is far inside even the float32 range, so the product
# is exact up to rounding. Chunks that decay more strongly are redone pairwise (exponent <= 0).
MAX_FACTORED_DECAY = 30.0


def _redo_deep_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    deep: torch.Tensor,
    scores: torch.Tensor,
    chunk_states: torch.Tensor,
) -> None:
    """Exact pairwise intra scores and chunk states, in place, for the chunks flagged `deep`.

    q, k, g [M, C, K], v [M, C, V], deep [M] bool, scores [M, C, C], chunk_states [M, K, V].
    Log decays are summed in float64 (where the device has it): b_t - b_s of two long sums would
    otherwise lose ~|b| * 1e-7 to cancellation in float32 exactly where gates decay strongly.
    """
    log_dtype = torch.float32 if q.device.type == "mps" else torch.float64
    size = q.shape[1]
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()[:, :, None]
    for part in deep.nonzero()[:, 0].split(64):  # bounded memory: 64 x C x C x K at a time
        b = g[part].to(log_dtype).cumsum(dim=1)  # (m, C, K)
        log_decay = b[:, :, None, :] - b[:, None, :, :]  # (m, C_t, C_s, K), <= 0 where s <= t
        decay = log_decay.masked_fill(~causal, -math.inf).exp().to(q.dtype)
        scores[part] = torch.einsum("mtk,mtsk->mts", q[part], decay * k[part][:, None])
        k_decayed = k[part] * (b[:, -1:] - b).exp().to(q.dtype)  # k_s exp(b_L - b_s)
        chunk_states[part] = torch.bmm(k_decayed.transpose(1, 2), v[part])


def _chunks(x: torch.Tensor, start: int, stop: int, chunk_size: int) -> torch.Tensor:
    """Tokens start:stop of x [B, T, H, D] as chunks [N, B, H, C, D] (a view, no copy)."""
    return x[:, start:stop].unflatten(1, (-1, chunk_size)).permute(1, 0, 3, 2, 4)


def gla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    chunk_size: int = 32,
    block_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-parallel GLA, same math and signature as `gla_recurrent`.

    Within a chunk, with b = cumsum(g) from the chunk start (b <= 0, decreasing):
      intra  o_t += sum_{s<=t} (sum_d q_td k_sd exp(b_td - b_sd)) v_s     (exponent <= 0)
      inter  o_t += (q_t * exp(b_t)) S_prev                                (exponent <= 0)
      state  S    = diag(exp(b_L)) S_prev + sum_s (k_s * exp(b_L - b_s))^T v_s   (exponent <= 0)
    The intra and state terms are evaluated as exp(b_t) * exp(-b_s) (matmuls) only in chunks
    whose decay spans <= MAX_FACTORED_DECAY; stronger chunks are redone with the exponents
    above, so nothing overflows however strongly the gates decay.

    The log decays b and exp(b) are computed for all chunks at once; everything else runs in
    blocks of `block_size` tokens (rounded down to whole chunks, at least one): all chunks of a
    block and all heads at once (batched matmuls), then a short loop carries S through the
    block's chunks. Blocks keep the temporaries small enough to stay in cache and to be reused by
    the allocator (on CPU full-length temporaries cost more in memory traffic and page faults
    than the arithmetic), while few enough blocks keep the per-op Python overhead small.
    """
    batch, length, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    scale = dim_k**-0.5 if scale is None else scale
    out_dtype, dtype = v.dtype, _compute_dtype(q.dtype)
    pad = -length % chunk_size
    # Padded tokens have q = k = v = 0 and g = 0 (no decay): they change neither o nor S.
    q, k, v, g = (
        F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)) if pad else x.to(dtype) for x in (q, k, v, g)
    )  # (B, T', H, D)
    padded = length + pad
    n_total = padded // chunk_size
    bh = batch * heads
    # Log decays of all chunks at once: b = cumsum(g) from each chunk start, (N, B*H, C, K).
    g_chunks = _chunks(g, 0, padded, chunk_size)
    b = torch.cumsum(g_chunks, dim=3, out=g_chunks.new_empty(g_chunks.shape)).flatten(1, 2)
    deep = -b[:, :, -1].amin(dim=-1) > MAX_FACTORED_DECAY  # (N, B*H): b_L is the minimum of b
    any_deep = bool(deep.any())
    b_exp = b.exp_()  # exp(b_t), (N, B*H, C, K)

    block_chunks = max(1, block_size // chunk_size)
    o = q.new_empty(batch, padded, heads, dim_v)
    state = q.new_zeros(bh, dim_k, dim_v)
    for first in range(0, n_total, block_chunks):
        last = min(first + block_chunks, n_total)
        start, stop = first * chunk_size, last * chunk_size
        n_chunks, n = last - first, (last - first) * bh  # M = n: chunks ordered (N, B, H)
        q_c, k_c, v_c = (_chunks(x, start, stop, chunk_size) for x in (q, k, v))
        e = b_exp[first:last].view(q_c.shape[:-1] + (dim_k,))  # (N, B, H, C, K)

        def buffer(x: torch.Tensor) -> torch.Tensor:
            return x.new_empty(x.shape)  # contiguous (N, B, H, C, D): chunk-major matrices

        q_decayed = torch.mul(q_c, e, out=buffer(q_c)).view(n, chunk_size, dim_k)
        q_decayed.mul_(scale)  # q_t * scale * exp(b_t)
        k_grown = torch.div(k_c, e, out=buffer(k_c)).view(n, chunk_size, dim_k)  # k_s exp(-b_s)
        v_block = buffer(v_c).copy_(v_c).view(n, chunk_size, dim_v)
        # Factored intra-chunk scores A[t, s] = sum_d q_td exp(b_td) k_sd exp(-b_sd), s <= t.
        # In deep chunks exp(-b) may overflow: those scores and states are replaced below.
        scores = torch.bmm(q_decayed, k_grown.transpose(1, 2)).tril_()  # (M, C_t, C_s)
        # Chunk states sum_s (k_s exp(b_L - b_s))^T v_s = diag(exp(b_L)) (k_grown^T v), (M, K, V)
        chunk_decay = e.view(n, chunk_size, dim_k)[:, -1, :, None]  # exp(b_L), (M, K, 1)
        chunk_states = torch.bmm(k_grown.transpose(1, 2), v_block).mul_(chunk_decay)
        if any_deep and deep[first:last].any():
            q_raw, k_raw = (x.reshape(n, chunk_size, dim_k) for x in (q_c, k_c))
            g_raw = g_chunks[first:last].reshape(n, chunk_size, dim_k)
            _redo_deep_chunks(
                q_raw * scale,
                k_raw,
                v_block,
                g_raw,
                deep[first:last].flatten(),
                scores,
                chunk_states,
            )
        o_block = torch.bmm(scores, v_block)  # intra-chunk part, (M, C, V)

        # Inter-chunk part: S before each chunk, S <- diag(exp(b_L)) S + chunk state.
        chunk_states = chunk_states.view(n_chunks, bh, dim_k, dim_v)
        chunk_decay = chunk_decay.view(n_chunks, bh, dim_k, 1)
        states = q.new_empty(n_chunks + 1, bh, dim_k, dim_v)
        states[0] = state
        for i in range(n_chunks):
            torch.addcmul(chunk_states[i], states[i], chunk_decay[i], out=states[i + 1])
        state = states[n_chunks]
        o_block.baddbmm_(q_decayed, states[:n_chunks].view(n, dim_k, dim_v))
        _chunks(o, start, stop, chunk_size).copy_(o_block.view(n_chunks, batch, heads, -1, dim_v))

    return o[:, :length].to(out_dtype), state.reshape(batch, heads, dim_k, dim_v)


@functools.cache
def _fla_chunk_gla() -> Kernel | None:
    """flash-linear-attention's Triton `chunk_gla` if installed (it needs CUDA), else None."""
    try:
        from fla.ops.gla import chunk_gla
    except ImportError:
        return None
    return chunk_gla


def gla_auto(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's fused `chunk_gla` for CUDA fp32/fp16/bf16 when it is installed, else `gla_chunked`."""
    fused = _fla_chunk_gla()
    if fused is not None and q.is_cuda and q.dtype != torch.float64:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return fused(q, k, v, g, scale=scale, output_final_state=True)
    return gla_chunked(q, k, v, g, scale=scale)


KERNELS: dict[str, Kernel] = {"auto": gla_auto, "chunked": gla_chunked, "recurrent": gla_recurrent}


class RMSNormSwishGate(nn.Module):
    """y = RMSNorm(o) * weight * swish(gate) over the last axis (one head), in at least float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # shared by all heads

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """o, gate [..., D] -> [..., D] in the compute dtype (float32 or float64)."""
        dtype = _compute_dtype(o.dtype)
        o, gate = o.to(dtype), gate.to(dtype)
        o = o * torch.rsqrt(o.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return o * self.weight.to(dtype) * gate * torch.sigmoid(gate)  # swish(g) = g sigmoid(g)


class GatedLinearAttention(nn.Module):
    """The GLA layer: projections, low-rank forget gate, recurrence, RMSNorm x swish gate, o_proj.

    Shapes for hidden size C and H heads: key dim C*expand_k (per head K), value dim
    C*expand_v (per head V). Tokens in, tokens out: x [B, T, C] -> [B, T, C]. `kernel` names
    the function in `KERNELS` that runs the recurrence; all give the same math.

    `recurrence_dtype` is the minimum dtype of the recurrence and the RMSNorm gate. The layer is
    ill-conditioned in float32: the RMSNorm divides by rms(o_t) over one head's few values,
    which for some tokens is ~1e-3 of the typical one, so kernel rounding is amplified ~1e3x
    (a whole float32 teacher moved by up to 5e-3 between equivalent chunk sizes). The default
    (None) therefore uses float64 on CPU, where it adds ~10% to the GLA layers' time (a few %
    of a teacher forward), and float32 elsewhere (fla's fused CUDA kernel accumulates in float32).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 8,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        norm_eps: float = 1e-6,
        kernel: str = "auto",
        recurrence_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(
                f"GLA key dim {key_dim} and value dim {value_dim} (hidden {hidden_size} x expand "
                f"{expand_k}/{expand_v}) must both be divisible by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.kernel = kernel
        self.recurrence_dtype = recurrence_dtype
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)  # output gate
        # Forget gate through a rank-16 bottleneck: C -> 16 -> key dim (bias on the second only).
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
            nn.Linear(gate_low_rank_dim, key_dim, bias=True),
        )
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.g_norm_swish_gate = RMSNormSwishGate(value_dim // num_heads, norm_eps)

    @property
    def kernel(self) -> str:
        """Name of the kernel in `KERNELS` used by forward ("auto", "chunked" or "recurrent")."""
        return self._kernel

    @kernel.setter
    def kernel(self, name: str) -> None:
        if name not in KERNELS:
            raise ValueError(f"unknown GLA kernel {name!r}; choose one of {sorted(KERNELS)}")
        self._kernel = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, C] (tokens in raster order) -> [B, T, C]."""
        batch, length, _ = x.shape
        dtype = self.recurrence_dtype
        if dtype is None:
            dtype = torch.float64 if x.device.type == "cpu" else torch.float32
        dtype = torch.promote_types(dtype, x.dtype)  # a minimum: float64 inputs stay float64
        split = functools.partial(torch.Tensor.unflatten, dim=-1, sizes=(self.num_heads, -1))
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))  # (B,T,H,D)
        # log a_t = logsigmoid(W2 W1 x_t + b) / 16: a_t in (0, 1], ~0.958 at pre-activation 0.
        g = split(F.logsigmoid(self.gk_proj(x)) / self.gate_logit_normalizer)
        o, _ = KERNELS[self.kernel](*(t.to(dtype) for t in (q, k, v, g)))  # (B, T, H, V)
        o = self.g_norm_swish_gate(o, split(self.g_proj(x))).to(x.dtype)
        return self.o_proj(o.reshape(batch, length, -1))


def set_gla_kernel(model: nn.Module, name: str) -> None:
    """Use kernel `name` ("auto", "chunked", "recurrent") in every GLA layer of `model`."""
    for module in model.modules():
        if isinstance(module, GatedLinearAttention):
            module.kernel = name
