"""Building blocks shared by the decoder and the vision tower: RMSNorm, the SwiGLU MLP, and attention over packed
sequences.

Sequences are packed: a batch is a (T, ...) tensor of all valid tokens plus its `Segments`. No padding token
ever goes through a Linear layer, and no (T, T) mask is ever built. How attention runs (which kernel, in which
shapes) is the execution mode's choice (execution.py); the modules here hold only the math.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..execution import RowWise, current
from .positions import Segments


@functools.cache
def varlen_kernel():
    """torch's flash varlen attention (torch >= 2.9), or None. Imported on first use: its module pulls in
    torch._dynamo, about a second at every start of a process that never runs on CUDA."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - older torch
        return None
    return varlen_attn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As Qwen2RMSNorm: normalise in fp32 (float64 stays float64), cast back to the input dtype, then scale.
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLP(RowWise):
    """SwiGLU: down(silu(gate(x)) * up(x)). Decoder: no bias, LoRA Linears; vision blocks: with bias."""

    def __init__(self, dim: int, hidden: int, bias: bool, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.gate_proj = linear(dim, hidden, bias=bias)
        self.up_proj = linear(dim, hidden, bias=bias)
        self.down_proj = linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Segments, causal: bool) -> torch.Tensor:
    """Attention inside each packed sequence. q: (T, Hq, d); k, v: (T, Hkv, d) with Hq % Hkv == 0. The kernel is
    the execution mode's `attention` (execution.py):

    - "auto", CPU (and deterministic mode anywhere): each run of consecutive sequences of equal length is a free
      (n, H, L, d) view for one SDPA call: no copy, no padding, no mask, and a sequence's result never depends on
      the others. On a CPU this is 2.5x faster than padding causal text to the longest sequence.
    - "auto", CUDA, causal: one SDPA call over the sequences right-padded to the longest; `is_causal` needs no
      mask, since a valid query never sees a later (padded) key.
    - "varlen" (CUDA, half precision): the packed tokens as they are, through `varlen_attn`.
    - a function (q, k, v, seqs, causal) -> (T, Hq, d): that function.
    """
    m = current()
    if callable(m.attention):
        return m.attention(q, k, v, seqs, causal)
    if q.is_cuda and not m.deterministic:
        if m.attention == "varlen" and q.dtype in (torch.float16, torch.bfloat16) and varlen_kernel() is not None:
            return _varlen(q, k, v, seqs, causal)
        if causal:
            return _padded(q, k, v, seqs)
    return _per_length(q, k, v, seqs, causal)


def _per_length(q, k, v, seqs: Segments, causal: bool) -> torch.Tensor:
    T, Hq, d = q.shape
    gqa = k.shape[1] != Hq

    def run(a: int, n: int, L: int) -> torch.Tensor:  # rows a .. a+n·L -> (n·L, Hq, d)
        views = (t[a : a + n * L].view(n, L, -1, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(*views, is_causal=causal, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(n * L, Hq, d)

    return run(*seqs.runs[0]) if len(seqs.runs) == 1 else torch.cat([run(*r) for r in seqs.runs])


def _padded(q, k, v, seqs: Segments) -> torch.Tensor:
    T, Hq, d = q.shape
    S, L = len(seqs.lengths), seqs.max_len

    def pad(t: torch.Tensor) -> torch.Tensor:  # (T, H, d) -> (S, H, L, d), zeros past each end
        grid = t.new_zeros(S * L, t.shape[1], d)
        grid[seqs.slots] = t
        return grid.view(S, L, -1, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, enable_gqa=k.shape[1] != Hq)
    return out.transpose(1, 2).reshape(S * L, Hq, d)[seqs.slots]


def _varlen(q, k, v, seqs: Segments, causal: bool) -> torch.Tensor:
    """`varlen_attn` across its torch versions: causality as `is_causal` or as a (-1, 0) window, GQA as a flag or
    by repeating the key/value heads."""
    varlen_attn = varlen_kernel()
    params = inspect.signature(varlen_attn).parameters
    kw = {"is_causal": causal} if "is_causal" in params else {"window_size": (-1, 0) if causal else (-1, -1)}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, seqs.cu_t, seqs.cu_t, seqs.max_len, seqs.max_len, **kw)
