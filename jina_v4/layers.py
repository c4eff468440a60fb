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
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return h.mul_(self.weight) if not torch.is_grad_enabled() else h * self.weight


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Decoder: no bias; vision blocks: with bias."""

    def __init__(self, dim: int, hidden: int, bias: bool, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.gate_proj = linear(dim, hidden, bias=bias)
        self.up_proj = linear(dim, hidden, bias=bias)
        self.down_proj = linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor, **lora) -> torch.Tensor:
        gate, up = self.gate_proj(x, **lora), self.up_proj(x, **lora)
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(gate) * up, **lora)
        # Inference: in place, so no fresh (T, intermediate) buffers (on a CPU their page faults cost as much).
        return self.down_proj(F.silu(gate, inplace=True).mul_(up), **lora)


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

    Causal (text): the sequences are right-padded into one (S, H, Lmax, d) SDPA call with `is_causal`, which
    needs no mask, since a valid query never sees a later (padded) key. Non-causal (vision windows, images):
    each run of consecutive equal-length sequences is a free view (n, H, L, d) for one SDPA call, so no copy,
    no padding and no mask. Full windows come in runs along each row of windows; partial ones sit at edges.
    """
    T, Hq, d = q.shape
    gqa = k.shape[1] != Hq

    def sdpa(a: int, n: int, L: int, is_causal: bool) -> torch.Tensor:  # rows a .. a+n·L -> (n·L, Hq, d)
        views = (t[a:a + n * L].view(n, L, -1, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(*views, is_causal=is_causal, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(n * L, Hq, d)

    runs = []  # [start, count, length] of consecutive equal-length sequences
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if runs and runs[-1][2] == b - a:
            runs[-1][1] += 1
        else:
            runs.append([a, 1, b - a])
    if len(runs) == 1:
        return sdpa(*runs[0], causal)
    if causal:
        lengths = torch.tensor([b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])], device=q.device)
        S, L = len(lengths), int(lengths.max())
        slots = (torch.arange(L, device=q.device) < lengths[:, None]).flatten().nonzero().squeeze(1)  # (T,)
        out = F.scaled_dot_product_attention(*(_pad(t, slots, S, L) for t in (q, k, v)), is_causal=True,
                                             enable_gqa=gqa)
        return out.transpose(1, 2).reshape(S * L, Hq, d)[slots]
    return torch.cat([sdpa(a, n, L, False) for a, n, L in runs])


def _pad(t: torch.Tensor, slots: torch.Tensor, S: int, L: int) -> torch.Tensor:
    """(T, H, d) packed -> (S, H, L, d) right-padded with zeros; `slots` are the tokens' places in S·L."""
    grid = t.new_zeros(S * L, t.shape[1], t.shape[2])
    grid[slots] = t
    return grid.view(S, L, -1, t.shape[2]).transpose(1, 2)
