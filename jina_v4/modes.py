"""The execution mode of a forward: deterministic shapes (an input's output bit-identical whatever shares its
batch) and the varlen attention kernel. `mode(...)` sets it per thread and per task for the calls inside.

Two things make a row's result depend on its batch in stock CPU kernels, and deterministic mode removes both:
- a matrix product picks its kernel, blocking and thread split by shape, so the number of rows in the batch
  changes how a row's sums are taken: `rowwise` runs products on tiles of exactly ROWS rows;
- an elementwise kernel rounds differently in its vectorised body and its scalar remainder for exp, erf, cos and
  sin, and the remainder falls where a thread's share of the tensor ends, which moves with the batch:
  `pointwise` runs such functions on tiles small enough for one thread and padded to whole vectors, so every
  element takes the vectorised path.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Mode:
    deterministic: bool = False  # fixed shapes and vectorised elementwise math: a row's result ignores its batch
    varlen: bool = False  # packed attention through `varlen_attn` on CUDA (else SDPA, padded or per length)


_MODE: ContextVar[Mode] = ContextVar("jina_v4_mode", default=Mode())
ROWS = 256  # deterministic mode: every matrix product sees exactly this many rows
VECTOR = 64  # elements: a whole number of double vectors at every SIMD width (fp32, bf16, float64; x86 and Arm)
GRAIN = 32768  # torch's grain size: an elementwise kernel on no more elements runs in the calling thread


@contextlib.contextmanager
def mode(m: Mode):
    """Run the enclosed calls in mode `m` (per thread and per task: concurrent calls do not interfere)."""
    token = _MODE.set(m)
    try:
        yield
    finally:
        _MODE.reset(token)


def current() -> Mode:
    return _MODE.get()


def rowwise(fn, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    """fn(x, *rest) for a function of independent rows. In deterministic mode it runs on tiles of exactly ROWS
    rows (the last zero-padded), written into one output buffer (no full-size temporary: on a CPU a fresh
    buffer's page faults cost as much as a copy)."""
    n = x.shape[0]
    if not _MODE.get().deterministic or n == 0:
        return fn(x, *rest)
    out = None
    for a in range(0, n, ROWS):
        tile = [t[a:a + ROWS] for t in (x, *rest)]
        m = tile[0].shape[0]
        if m < ROWS:  # the last tile, zero-padded to the full shape
            tile = [F.pad(t, (0, 0) * (t.dim() - 1) + (0, ROWS - m)) for t in tile]
        y = fn(*tile)[:m]
        if out is None:
            out = y.new_empty(n, *y.shape[1:])
        out[a:a + m] = y
    return out


def pointwise(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for an elementwise function. In deterministic mode fn runs on tiles of whole rows, each row padded
    to a multiple of VECTOR elements (rows longer than GRAIN cut into pieces of GRAIN) and each tile within GRAIN
    elements, so every element goes through the vectorised code and its result depends on its value alone."""
    if not _MODE.get().deterministic or x.numel() == 0:
        return fn(x)
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[1]
    if n > GRAIN:  # elementwise: a long row is as good as several rows of GRAIN
        rows = F.pad(rows, (0, -n % GRAIN)).view(-1, GRAIN)
    width = -(-rows.shape[1] // VECTOR) * VECTOR
    R = max(1, GRAIN // width)
    out = torch.empty_like(rows)
    for a in range(0, len(rows), R):
        tile = rows[a:a + R]
        padded = F.pad(tile, (0, width - rows.shape[1], 0, R - len(tile)))
        out[a:a + len(tile)] = fn(padded)[:len(tile), :rows.shape[1]]
    return out.view(len(x.reshape(-1, n)), -1)[:, :n].reshape(x.shape)
