"""Where each token sits, as pure functions: its sequence in a packed batch, its M-RoPE position, the vision
tower's patch positions and windows, and the rotary embedding those positions give (text and vision share
one angle helper). Each index function matches the transformers 4.52.4 function of the same purpose
(`Qwen2_5_VLModel.get_rope_index`, `Qwen2_5_VisionTransformerPretrainedModel.rot_pos_emb` / `.get_window_index`,
`Qwen2_5_VLRotaryEmbedding`, `apply_multimodal_rotary_pos_emb`), one sequence or image at a time.

Dimensions: T tokens, S sequences, N patches, d head dim.
"""

from __future__ import annotations

import torch

# ---- sequences in a packed batch ---------------------------------------------------------------------------


def cumulative(lengths: list[int]) -> list[int]:
    """[a, b, c] -> [0, a, a+b, a+b+c]: sequence boundaries for packed attention."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


class Segments:
    """S sequences packed into T rows. The boundaries are Python ints, so no kernel has to ask the device for
    them; the index tensors are built once on the host and move to the device with the batch."""

    def __init__(self, cu: list[int]):
        self.cu = cu  # (S+1,) sequence starts, then T
        self.lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        self.max_len = max(self.lengths, default=0)
        self.runs: list[list[int]] = []  # [start, count, length] of consecutive sequences of equal length
        for a, n in zip(cu[:-1], self.lengths):
            if self.runs and self.runs[-1][2] == n:
                self.runs[-1][1] += 1
            else:
                self.runs.append([a, 1, n])
        self.cu_t = torch.tensor(cu, dtype=torch.int32)  # (S+1,) for varlen kernels
        # (T,) each token's place in the right-padded (S, max_len) grid, for one padded attention call
        self.slots = torch.cat(
            [torch.arange(n) + s * self.max_len for s, n in enumerate(self.lengths)]
            or [torch.zeros(0, dtype=torch.long)]
        )

    def to(self, device: torch.device) -> Segments:
        moved = object.__new__(Segments)
        moved.__dict__.update(self.__dict__)
        moved.cu_t, moved.slots = (t.to(device, non_blocking=True) for t in (self.cu_t, self.slots))
        return moved


# ---- rotary embedding --------------------------------------------------------------------------------------


def rotary_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """(...,) positions -> (..., dim/2) angles position·θ^(-2j/dim), in at least fp32: the reference computes
    them in fp32 with autocast off (float64 positions give float64 angles)."""
    dtype = torch.promote_types(positions.dtype, torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device).to(dtype) / dim))
    return positions.to(dtype)[..., None] * inv_freq


def cos_sin(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., d/2) angles -> cos, sin (..., d) in the half-split layout (each angle serves channels j and j+d/2)."""
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def mrope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, T) temporal/height/width positions -> cos, sin (T, d). Channel chunks [t, h, w, t, h, w] of sizes
    mrope_section * 2 take their angle from axis i % 3. `dtype` is the hidden dtype: the reference casts
    cos and sin to it (bf16 in the release) before rotating."""
    compute = torch.promote_types(dtype, torch.float32)
    cos, sin = cos_sin(rotary_angles(position_ids.to(compute), head_dim, theta), compute)  # (3, T, d)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([c[i % 3] for i, c in enumerate(x.split(list(mrope_section) * 2, dim=-1))], -1).to(dtype)

    return pick(cos), pick(sin)


def vision_cos_sin(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) patch (row, column) -> cos, sin (N, d), in at least fp32 (the reference rotates in fp32). Each half
    of the channels (the two halves of `rotate_half`) holds d/4 row angles, then d/4 column angles: for d = 80,
    channels 0-19 and 40-59 turn with the row, 20-39 and 60-79 with the column."""
    compute = torch.promote_types(dtype, torch.float32)
    angles = rotary_angles(positions.to(compute), head_dim // 2, 10000.0).flatten(1)  # (N, 2, d/4) -> (N, d/2)
    return cos_sin(angles, compute)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, d); cos, sin: (T, d), broadcast over heads. Real-valued half-split (NeoX) convention."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


# ---- position indices --------------------------------------------------------------------------------------


def rope_index(
    input_ids: list[int], grids: list[tuple[int, int, int]], image_token_id: int, merge: int
) -> torch.Tensor:
    """Positions (3, L) on the temporal/height/width axes for one unpadded sequence.

    Text advances all three axes together. Image i (grid (t, h, w) in patches) occupies the next
    t·h·w/merge² pad tokens as a (t, h/merge, w/merge) block: T constant (still images), H = start + row,
    W = start + column. Whatever follows starts at the block's maximum + 1.
    """
    blocks, st, nxt = [], 0, 0
    for t, h, w in grids:
        ed = input_ids.index(image_token_id, st)  # first pad token of this image
        n = ed - st
        blocks.append(torch.arange(n).expand(3, n) + nxt)
        gh, gw = h // merge, w // merge
        grid = torch.stack(
            [
                torch.zeros(t * gh * gw, dtype=torch.long),  # time index · second_per_grid_t = 0
                torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).flatten(),
                torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).flatten(),
            ]
        )
        blocks.append(grid + nxt + n)
        nxt += n + max(gh, gw)  # the block's maximum + 1
        st = ed + t * gh * gw
    n = len(input_ids) - st
    blocks.append(torch.arange(n).expand(3, n) + nxt)
    return torch.cat(blocks, dim=1)


def vision_positions(grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """(t·h·w, 2) (row, column) of each patch, in the processor's patch order: 2x2 merge units row-major,
    row-major inside each unit, repeated over t."""
    t, h, w = grid
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
    pos = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], dim=-1)
    return pos.repeat(t, 1)


def window_index(grid: tuple[int, int, int], window: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """Window permutation of one image's merge units, and the window lengths (in merge units).

    The merged grid (h/merge x w/merge) is cut into `window` x `window` tiles from the top-left; tiles at the
    right and bottom edges may be partial. Returns the unit indices tile by tile (row-major inside each tile)
    and the size of each non-empty tile.
    """
    t, gh, gw = grid[0], grid[1] // merge, grid[2] // merge
    nh, nw = -(-gh // window), -(-gw // window)
    index = torch.full((t, nh * window, nw * window), -1, dtype=torch.long)
    index[:, :gh, :gw] = torch.arange(t * gh * gw).view(t, gh, gw)
    tiles = index.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, window * window)
    keep = tiles >= 0
    lengths = keep.sum(1)
    return tiles[keep], lengths[lengths > 0].tolist()


class VisionLayout:
    """Where each patch of a batch's images sits: its (row, column) for the rotary, the window permutation of
    the merge units, and the sequences of the window blocks and of the full-attention blocks (one per frame)."""

    def __init__(self, grids: list[tuple[int, int, int]], window: int, merge: int):
        unit = merge * merge
        self.positions = torch.cat([vision_positions(g, merge) for g in grids])  # (N, 2)
        index, windows, offset = [], [], 0
        for g in grids:
            idx, lengths = window_index(g, window, merge)
            index.append(idx + offset)
            windows += [n * unit for n in lengths]
            offset += g[0] * g[1] * g[2] // unit
        self.index = torch.cat(index)  # (U,) merge units in window order
        self.windows = Segments(cumulative(windows))  # in patches, window order
        self.images = Segments(cumulative([h * w for t, h, w in grids for _ in range(t)]))

    def to(self, device: torch.device) -> VisionLayout:
        moved = object.__new__(VisionLayout)
        moved.__dict__.update(self.__dict__)
        moved.positions, moved.index = (t.to(device, non_blocking=True) for t in (self.positions, self.index))
        moved.windows, moved.images = self.windows.to(device), self.images.to(device)
        return moved
