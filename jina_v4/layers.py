"""Building blocks shared by the decoder and the vision tower: RMSNorm, rotary helpers, the SwiGLU MLP and
variable-length attention over packed sequences.

Sequences are packed: a batch is a (T, ...) tensor of all valid tokens plus `cu_seqlens` (S+1,), the start
of each sequence. No padding token ever goes through a Linear layer, and no (T, T) mask is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As Qwen2RMSNorm: normalise in fp32, cast back to the input dtype, then scale by the weight.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Decoder: no bias; vision blocks: with bias."""

    def __init__(self, dim: int, hidden: int, bias: bool, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.gate_proj = linear(dim, hidden, bias=bias)
        self.up_proj = linear(dim, hidden, bias=bias)
        self.down_proj = linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor, **lora) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, **lora)) * self.up_proj(x, **lora), **lora)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, d); cos, sin: (T, d), broadcast over heads. Real-valued half-split (NeoX) convention."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], causal: bool
) -> torch.Tensor:
    """Attention inside each packed sequence. q: (T, Hq, d); k, v: (T, Hkv, d) with Hq % Hkv == 0.

    Sequences are gathered into a (S, H, Lmax, d) batch for one SDPA call. Causal: right padding needs no mask,
    since a valid query never sees a later (padded) key. Non-causal: a (S, 1, 1, Lmax) key mask, linear in T.
    """
    T, Hq, d = q.shape
    lengths = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    S, L = len(lengths), max(lengths)
    gqa = k.shape[1] != Hq
    if all(n == L for n in lengths):  # equal lengths: a free view, no mask
        out = F.scaled_dot_product_attention(
            *(t.view(S, L, -1, d).transpose(1, 2) for t in (q, k, v)), is_causal=causal, enable_gqa=gqa
        )
        return out.transpose(1, 2).reshape(T, Hq, d)
    lens = torch.tensor(lengths, device=q.device)
    valid = torch.arange(L, device=q.device) < lens[:, None]  # (S, L)
    slots = valid.flatten().nonzero().squeeze(1)  # (T,) position of each token in the (S*L) grid

    def pad(t: torch.Tensor) -> torch.Tensor:  # (T, H, d) -> (S, H, L, d)
        grid = t.new_zeros(S * L, t.shape[1], d)
        grid[slots] = t
        return grid.view(S, L, -1, d).transpose(1, 2)

    mask = None if causal else valid[:, None, None, :]
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(S * L, Hq, d)[slots]
