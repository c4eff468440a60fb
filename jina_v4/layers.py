"""Building blocks shared by the decoder and the vision tower: RMSNorm, Linear, the SwiGLU MLP, GELU, attention
over packed sequences, and the one home of the in-place speed tricks. Their shapes follow the forward's mode
(modes.py).

Sequences are packed: a batch is a (T, ...) tensor of all valid tokens plus its `Segments`. No padding token
ever goes through a Linear layer, and no (T, T) mask is ever built.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .modes import current, pointwise, rowwise
from .positions import Segments

try:  # flash varlen attention (torch >= 2.9); used on CUDA when switched on
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None


# ---- the one home of the in-place speed tricks --------------------------------------------------------------
# At inference, results land in a fresh temporary's own buffer instead of a new (T, ·) tensor: on a CPU the page
# faults of a new buffer cost as much as the arithmetic. Autograd needs the originals, so training takes a + b.


def residual(x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """x + fx, where fx is a sublayer's fresh output: x = residual(x, attn(norm(x)))."""
    return x + fx if torch.is_grad_enabled() else fx.add_(x)


def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b (a is a fresh temporary)."""
    return a * b if torch.is_grad_enabled() else a.mul_(b)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (gate is a fresh temporary)."""
    return mul(pointwise(lambda g: F.silu(g, inplace=not torch.is_grad_enabled()), gate), up)


# ---- modules --------------------------------------------------------------------------------------------------


class Linear(nn.Linear):
    """nn.Linear over packed rows (fixed shapes in deterministic mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rowwise(super().forward, x)


class GELU(nn.GELU):
    """The exact (erf) GELU, elementwise in the forward's mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise(super().forward, x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As Qwen2RMSNorm: normalise in fp32 (float64 stays float64), cast back to the input dtype, then scale.
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        return mul((h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype), self.weight)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Decoder: no bias, LoRA; vision blocks: with bias."""

    def __init__(self, dim: int, hidden: int, bias: bool, linear: type[nn.Linear] = Linear):
        super().__init__()
        self.gate_proj = linear(dim, hidden, bias=bias)
        self.up_proj = linear(dim, hidden, bias=bias)
        self.down_proj = linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor, *task) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x, *task), self.up_proj(x, *task)), *task)


# ---- attention ------------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Segments, causal: bool) -> torch.Tensor:
    """Attention inside each packed sequence. q: (T, Hq, d); k, v: (T, Hkv, d) with Hq % Hkv == 0.

    - per length (CPU; deterministic mode anywhere): each run of consecutive sequences of equal length is a
      free (n, H, L, d) view for one SDPA call: no copy, no padding, no mask, and a sequence's result never
      depends on the others. On a CPU this is 2.5x faster than padding causal text to the longest sequence.
    - padded (CUDA, causal): one SDPA call over the sequences right-padded to the longest; `is_causal` needs no
      mask, since a valid query never sees a later (padded) key.
    - varlen (CUDA, half precision, `Mode.varlen`): the packed tokens as they are, through `varlen_attn`.
    """
    T, Hq, d = q.shape
    gqa = k.shape[1] != Hq
    m = current()
    if q.is_cuda and not m.deterministic:
        if m.varlen and varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16):
            return _varlen(q, k, v, seqs, causal)
        if causal:
            S, L = len(seqs.lengths), seqs.max_len

            def pad(t: torch.Tensor) -> torch.Tensor:  # (T, H, d) -> (S, H, L, d), zeros past each end
                grid = t.new_zeros(S * L, t.shape[1], d)
                grid[seqs.slots] = t
                return grid.view(S, L, -1, d).transpose(1, 2)

            out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, enable_gqa=gqa)
            return out.transpose(1, 2).reshape(S * L, Hq, d)[seqs.slots]

    def run(a: int, n: int, L: int) -> torch.Tensor:  # rows a .. a+n·L -> (n·L, Hq, d)
        views = (t[a:a + n * L].view(n, L, -1, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(*views, is_causal=causal, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(n * L, Hq, d)

    return run(*seqs.runs[0]) if len(seqs.runs) == 1 else torch.cat([run(*r) for r in seqs.runs])


def _varlen(q, k, v, seqs: Segments, causal: bool) -> torch.Tensor:
    """`varlen_attn` across its torch versions: causality as `is_causal` or as a (-1, 0) window, GQA as a flag or
    by repeating the key/value heads."""
    params = inspect.signature(varlen_attn).parameters
    kw = {"is_causal": causal} if "is_causal" in params else {"window_size": (-1, 0) if causal else (-1, -1)}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, seqs.cu_t, seqs.cu_t, seqs.max_len, seqs.max_len, **kw)
