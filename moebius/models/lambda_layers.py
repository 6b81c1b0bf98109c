"""Lambda layers (Bello 2021, "LambdaNetworks") as used by Moebius in place of attention.

A lambda layer summarises a context into a small linear map lambda (dim_k x dim_v) and applies
it to every query:  y_n = q_n^T (lambda_content + lambda_position_n).  Both layers here are
multi-query (one key/value set shared by all heads, "u = 1") and work on NCHW feature maps.

* `SelfLambda` (Local-lambda): context = the feature map itself; the position lambda comes from a
  15x15 convolution over each value channel (local contexts).
* `CrossLambda` (Interactive-lambda): context = the 10 category tokens; the position lambda comes
  from a learned table with one (m x dim_k) matrix per latent position, so it is sized for one grid.

Shapes: B batch, h heads, k = dim_k, v = dim_v, n = H*W positions, l = context tokens.
"""

import torch
import torch.nn.functional as F
from torch import nn


class PositionConv(nn.Module):
    """The local position-lambda convolution, stored in the released Conv3d layout.

    The checkpoint holds a Conv3d(1 -> dim_k, kernel (1, r, r)) whose depth axis runs over the value
    channels, i.e. every value channel is convolved independently with the same dim_k kernels. We
    keep the [dim_k, 1, 1, r, r] parameter so released keys load as they are, and run it as a
    Conv2d with the value axis folded into the batch (identical numbers, export-friendly graph).
    """

    def __init__(self, dim_k: int, size: int):
        super().__init__()
        if size % 2 != 1:
            raise ValueError(f"local lambda size must be odd, got {size}")
        self.weight = nn.Parameter(torch.empty(dim_k, 1, 1, size, size))
        self.bias = nn.Parameter(torch.zeros(dim_k))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """values [B, v, H, W] -> position lambdas [B, k, v, H*W]."""
        b, v, hgt, wid = values.shape
        weight = self.weight[:, :, 0]  # (k, 1, r, r)
        out = F.conv2d(
            values.reshape(b * v, 1, hgt, wid), weight, self.bias, padding=weight.shape[-1] // 2
        )  # (B*v, k, H, W)
        return out.reshape(b, v, -1, hgt * wid).transpose(1, 2)  # (B, k, v, n)


class SelfLambda(nn.Module):
    """Local-lambda self layer: content lambda over all positions + 15x15 position lambdas."""

    def __init__(self, dim: int, heads: int, dim_k: int, local_size: int = 15):
        super().__init__()
        if dim % heads:
            raise ValueError(f"channels {dim} must divide into {heads} heads")
        self.heads, self.dim_k, self.dim_v = heads, dim_k, dim // heads
        self.to_q = nn.Conv2d(dim, heads * dim_k, 1, bias=False)
        self.to_k = nn.Conv2d(dim, dim_k, 1, bias=False)
        self.to_v = nn.Conv2d(dim, self.dim_v, 1, bias=False)
        self.norm_q = nn.BatchNorm2d(heads * dim_k)
        self.norm_v = nn.BatchNorm2d(self.dim_v)
        self.pos_conv = PositionConv(dim_k, local_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, C, H, W] (channel = head * dim_v + v)."""
        b, _, hgt, wid = x.shape
        q = self.norm_q(self.to_q(x)).reshape(b, self.heads, self.dim_k, hgt * wid)
        keys = self.to_k(x).flatten(2).softmax(dim=-1)  # (B, k, n), normalised over positions
        values = self.norm_v(self.to_v(x))  # (B, v, H, W)
        content_lambda = torch.einsum("bkn,bvn->bkv", keys, values.flatten(2))
        position_lambda = self.pos_conv(values)  # (B, k, v, n)
        y = torch.einsum("bhkn,bkv->bhvn", q, content_lambda)
        y = y + torch.einsum("bhkn,bkvn->bhvn", q, position_lambda)
        return y.reshape(b, self.heads * self.dim_v, hgt, wid)


class CrossLambda(nn.Module):
    """Interactive-lambda cross layer: lambdas from the category tokens, one table row per position.

    `rel_pos_emb` [n*n, m, dim_k, 1] is sized for an n x n grid and m context tokens, which is why
    the released weights run only at their native latent size.
    """

    def __init__(
        self, dim: int, context_dim: int, heads: int, dim_k: int, grid: int, context_len: int
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"channels {dim} must divide into {heads} heads")
        self.heads, self.dim_k, self.dim_v = heads, dim_k, dim // heads
        self.grid, self.context_len = grid, context_len
        self.rel_pos_emb = nn.Parameter(torch.randn(grid * grid, context_len, dim_k, 1))
        self.to_q = nn.Conv2d(dim, heads * dim_k, 1, bias=False)
        self.to_k = nn.Linear(context_dim, dim_k, bias=False)
        self.to_v = nn.Linear(context_dim, self.dim_v, bias=False)
        self.norm_q = nn.BatchNorm2d(heads * dim_k)
        self.norm_v = nn.BatchNorm1d(self.dim_v)

    def context_lambdas(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, l, D] -> (content lambda [B, k, v], values [B, v, l]); ids-only."""
        keys = self.to_k(context).transpose(1, 2).softmax(dim=-1)  # (B, k, l), over tokens
        values = self.norm_v(self.to_v(context).transpose(1, 2))  # (B, v, l)
        return torch.einsum("bkl,bvl->bkv", keys, values), values

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], context [B, l, D] -> [B, C, H, W]."""
        b, _, hgt, wid = x.shape
        if hgt * wid != self.grid**2 or context.shape[1] != self.context_len:
            raise ValueError(
                f"cross-lambda table is sized for a {self.grid}x{self.grid} grid and "
                f"{self.context_len} context tokens, got {hgt}x{wid} and {context.shape[1]}"
            )
        q = self.norm_q(self.to_q(x)).reshape(b, self.heads, self.dim_k, hgt * wid)
        content_lambda, values = self.context_lambdas(context)
        y = torch.einsum("bhkn,bkv->bhvn", q, content_lambda)
        # Position lambda_n = E_n V^T (k x v per position); apply q first: (q E)_n [B,h,n,l].
        table = self.rel_pos_emb[..., 0].to(q.dtype)  # (n, l, k)
        q_table = torch.einsum("bhkn,nlk->bhnl", q, table)
        y = y + torch.einsum("bhnl,bvl->bhvn", q_table, values)
        return y.reshape(b, self.heads * self.dim_v, hgt, wid)
