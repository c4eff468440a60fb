"""How a forward runs, kept out of the blocks: the attention kernel, deterministic shapes, and row chunks.

`mode(...)` sets, per thread and per task, for the calls inside it:
- `attention`: "auto" (per-length SDPA on a CPU, padded SDPA on CUDA), "varlen" (CUDA, half precision:
  `varlen_attn` on the packed tokens), or any function (q, k, v, seqs, causal) -> out (layers.attention).
- `deterministic`: an input's output bit-identical whatever shares its batch. Two things make a row's result
  depend on its batch in stock CPU kernels, and a `TorchFunctionMode` removes both, for every matrix product and
  every exp/erf/cos/sin-based function the model calls, without the blocks knowing:
  - a matrix product picks its kernel, blocking and thread split by shape, so the number of rows in the batch
    changes how a row's sums are taken: products run on tiles of exactly ROWS rows (`rowwise`);
  - an elementwise kernel rounds differently in its vectorised body and its scalar remainder, and the remainder
    falls where a thread's share of the tensor ends, which moves with the batch: SiLU, GELU, cos and sin run on
    tiles small enough for one thread and padded to whole vectors (`pointwise`).

`RowWise` modules (the MLPs: each token on its own) run on ROW_CHUNK rows at a time at inference, so their wide
intermediates, (rows, 11008) in the decoder, stay small however many tokens a batch holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

ROWS = 256  # deterministic mode: every matrix product sees exactly this many rows
VECTOR = 64  # elements: a whole number of double vectors at every SIMD width (fp32, bf16, float64; x86 and Arm)
GRAIN = 32768  # torch's grain size: an elementwise kernel on no more elements runs in the calling thread
ROW_CHUNK = 2048  # RowWise modules at inference: rows per call (a multiple of ROWS keeps the tiles where they were)


@dataclass(frozen=True)
class Mode:
    deterministic: bool = False  # fixed shapes and vectorised elementwise math: a row's result ignores its batch
    attention: Union[str, Callable] = "auto"  # "auto", "varlen", or a function (q, k, v, seqs, causal) -> out


_MODE: ContextVar[Mode] = ContextVar("jina_v4_mode", default=Mode())


def mode(**changes):
    """Run the enclosed calls with these Mode fields changed (per thread and task: concurrent calls do not mix)."""
    return _enter(dataclasses.replace(_MODE.get(), **changes))


@contextlib.contextmanager
def _enter(m: Mode):
    before = _MODE.get()
    token = _MODE.set(m)
    try:
        if m.deterministic and not before.deterministic:
            with Deterministic():
                yield
        else:
            yield
    finally:
        _MODE.reset(token)


def current() -> Mode:
    return _MODE.get()


def checkpointed(fn, *args):
    """fn(*args) with its activations recomputed in the backward pass (torch.utils.checkpoint), which runs the
    recomputation under the mode and the LoRA task of now."""
    from .model.lora import active, current_task

    task, m = current_task(), current()

    @contextlib.contextmanager
    def replay():
        with active(task), _enter(m):
            yield

    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), replay()))


class Deterministic(TorchFunctionMode):
    """Matrix products on row tiles, elementwise transcendental functions on whole-vector tiles (see above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _MODE.get().deterministic:  # switched off again inside
            return func(*args, **kwargs)
        if func in ROWWISE:
            return ROWWISE[func](*args, **kwargs)
        if func in POINTWISE:
            return pointwise(lambda t: func(t, *args[1:], **kwargs), args[0])
        return func(*args, **kwargs)


def rowwise(fn, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    """fn(x, *rest) for a function of independent rows, on tiles of exactly ROWS rows (the last zero-padded),
    written into one output buffer."""
    n = x.shape[0]
    if n == 0:
        return fn(x, *rest)
    out = None
    for a in range(0, n, ROWS):
        tile = [t[a : a + ROWS] for t in (x, *rest)]
        m = tile[0].shape[0]
        if m < ROWS:  # the last tile, zero-padded to the full shape
            tile = [F.pad(t, (0, 0) * (t.dim() - 1) + (0, ROWS - m)) for t in tile]
        y = fn(*tile)[:m]
        if out is None:
            out = y.new_empty(n, *y.shape[1:])
        out[a : a + m] = y
    return out


def pointwise(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for an elementwise function, on tiles of whole rows, each row padded to a multiple of VECTOR elements
    (rows longer than GRAIN cut into pieces of GRAIN) and each tile within GRAIN elements, so every element goes
    through the vectorised code and its result depends on its value alone."""
    if x.numel() == 0:
        return fn(x)
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if n > GRAIN:  # elementwise: a long row is as good as several rows of GRAIN
        rows = F.pad(rows, (0, -n % GRAIN)).view(-1, GRAIN)
    width = -(-rows.shape[1] // VECTOR) * VECTOR
    R = max(1, GRAIN // width)
    out = torch.empty_like(rows)
    for a in range(0, len(rows), R):
        tile = rows[a : a + R]
        padded = F.pad(tile, (0, width - rows.shape[1], 0, R - len(tile)))
        out[a : a + len(tile)] = fn(padded)[: len(tile), : rows.shape[1]]
    if n > GRAIN:
        out = out.view(-1, out.numel() // (x.numel() // n))[:, :n]
    return out.reshape(x.shape)


def _linear(x, weight, bias=None):
    return rowwise(lambda t: F.linear(t, weight, bias), x)


def _addmm_(y, a, b, *, beta=1, alpha=1):  # LoRA's y += s·(A x) Bᵀ on each tile of y's rows
    y.copy_(rowwise(lambda t, u: torch.addmm(t, u, b, beta=beta, alpha=alpha), y, a))
    return y


def _conv3d(x, weight, *args, **kwargs):  # the patch embedding: one output per patch
    return rowwise(lambda t: F.conv3d(t, weight, *args, **kwargs), x)


ROWWISE = {F.linear: _linear, torch.Tensor.addmm_: _addmm_, F.conv3d: _conv3d}
POINTWISE = {
    F.silu,
    F.gelu,
    torch.exp,
    torch.erf,
    torch.cos,
    torch.sin,
    torch.Tensor.exp,
    torch.Tensor.erf,
    torch.Tensor.cos,
    torch.Tensor.sin,
}


class RowWise(nn.Module):
    """A module whose rows (tokens) are independent, e.g. an MLP: at inference it runs on ROW_CHUNK rows at a
    time, the same arithmetic with small intermediates. With autograd it runs whole (the graph keeps them all)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or len(x) <= ROW_CHUNK:
            return super().__call__(x)
        out = None
        for a in range(0, len(x), ROW_CHUNK):
            y = super().__call__(x[a : a + ROW_CHUNK])
            if out is None:
                out = y.new_empty(len(x), *y.shape[1:])
            out[a : a + len(y)] = y
        return out
