"""Packed attention, timed the ways it can be run, on the same inputs:

- vision windows at the real head shape (16 heads x 80): one SDPA call per run of equal-length windows (what
  jina_v4 does), all windows padded into one call with a key mask, and one SDPA call per window;
- causal text at the real decoder shape (16 query heads, 2 key/value heads, 128): one SDPA call per run of
  equal-length sequences (jina_v4 on a CPU) against the sequences right-padded to the longest in one call
  (jina_v4's CUDA default), on batches of the bench's log-uniform 10-2,000-token text mix.

    python scripts/bench_attention.py --megapixels 0.6 1 2 --dtype float32
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from jina_v4.execution import mode
from jina_v4.model.images import smart_resize
from jina_v4.model.layers import attention
from jina_v4.model.positions import Segments, cumulative, window_index
from jina_v4.model.processing import Item, token_batches


def padded(q, k, v, cu):
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    S, L = len(lengths), max(lengths)
    valid = torch.arange(L, device=q.device) < torch.tensor(lengths, device=q.device)[:, None]
    slots = valid.flatten().nonzero().squeeze(1)
    grids = []
    for t in (q, k, v):
        g = t.new_zeros(S * L, *t.shape[1:])
        g[slots] = t
        grids.append(g.view(S, L, *t.shape[1:]).transpose(1, 2))
    out = F.scaled_dot_product_attention(*grids, attn_mask=valid[:, None, None, :])
    return out.transpose(1, 2).reshape(S * L, *q.shape[1:])[slots]


def per_window(q, k, v, cu):
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1], cu[1:]):
        out[a:b] = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
    return out


def padded_causal(q, k, v, seqs: Segments):
    """The CUDA default of layers.attention, run here on the CPU: right-padded to the longest, one call."""
    S, L, d = len(seqs.lengths), seqs.max_len, q.shape[-1]

    def pad(t):
        grid = t.new_zeros(S * L, t.shape[1], d)
        grid[seqs.slots] = t
        return grid.view(S, L, -1, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2).reshape(S * L, q.shape[1], d)[seqs.slots]


def text_batches(n: int, seed: int = 0) -> list[Segments]:
    """The bench's text mix (log-uniform 10-2,000 tokens) cut into jina_v4's token-budget batches."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(math.log(10), math.log(2000), n)).astype(int).tolist()
    items = [Item([0] * m, "retrieval") for m in lengths]
    return [Segments(cumulative(sorted((lengths[i] for i in b), reverse=True))) for b in token_batches(items, 16384)]


def timeit(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megapixels", type=float, nargs="+", default=[0.6, 1.0, 2.0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--texts", type=int, default=32, help="texts in the causal-text comparison")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{'image':>12} {'patches':>8} {'windows':>8} {'runs s':>12} {'padded+mask s':>14} {'per-window s':>13}")
    for mp in args.megapixels:
        side = int((mp * 1e6) ** 0.5)
        h, w = smart_resize(side, int(side * 4 / 3), 28, 3136, int(mp * 1e6 * 4 / 3))
        grid = (1, h // 14, w // 14)
        _, lengths = window_index(grid, 4, 2)
        cu = cumulative([n * 4 for n in lengths])
        N = grid[1] * grid[2]
        q, k, v = (torch.randn(N, 16, 80, dtype=dtype, device=args.device) for _ in range(3))
        ref = per_window(q, k, v, cu)
        for out in (attention(q, k, v, Segments(cu), False), padded(q, k, v, cu)):
            assert (out - ref).abs().max() < 1e-2
        a = timeit(lambda: attention(q, k, v, Segments(cu), False), args.repeat)
        b = timeit(lambda: padded(q, k, v, cu), args.repeat)
        c = timeit(lambda: per_window(q, k, v, cu), args.repeat)
        print(f"{h:>5}x{w:<6} {N:>8} {len(lengths):>8} {a:>12.4f} {b:>14.4f} {c:>13.4f}")
    print(f"\ncausal text, one layer, {args.texts} texts of 10-2,000 tokens in token-budget batches")
    batches = text_batches(args.texts)
    qkv = [tuple(torch.randn(s.cu[-1], h, 128, dtype=dtype, device=args.device) for h in (16, 2, 2)) for s in batches]

    def per_length():
        with mode(deterministic=True):  # the per-length path on every device
            return [attention(*t, s, True) for t, s in zip(qkv, batches)]

    def padded_text():
        return [padded_causal(*t, s) for t, s in zip(qkv, batches)]

    for x, y in zip(per_length(), padded_text()):
        assert (x - y).abs().max() < 1e-2
    a, b = timeit(per_length, args.repeat), timeit(padded_text, args.repeat)
    print(f"{'tokens':>8} {'batches':>8} {'per length s':>13} {'padded s':>10} {'padded / per length':>20}")
    print(f"{sum(s.cu[-1] for s in batches):>8} {len(batches):>8} {a:>13.4f} {b:>10.4f} {b / a:>20.2f}")


if __name__ == "__main__":
    main()
