"""Index bookkeeping as pure functions: M-RoPE position ids for the decoder, and the vision tower's patch
positions, window permutation and sequence boundaries. Each matches the transformers 4.52.4 function of the
same purpose (`Qwen2_5_VLModel.get_rope_index`, `Qwen2_5_VisionTransformerPretrainedModel.rot_pos_emb`,
`.get_window_index`, the `cu_seqlens` of its forward), one sequence or image at a time, without hidden state.
"""

from __future__ import annotations

import torch


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
                torch.zeros(t * gh * gw, dtype=torch.long),  # time index * second_per_grid_t (0 for images)
                torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).flatten(),
                torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).flatten(),
            ]
        )
        blocks.append(grid + nxt + n)
        nxt = int(blocks[-1].max()) + 1
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

    The merged grid (h/merge x w/merge) is cut into `window` x `window` tiles from the top-left; tiles at the right and
    bottom edges may be partial. Returns the unit indices tile by tile (row-major inside each tile) and the
    size of each non-empty tile.
    """
    t, gh, gw = grid[0], grid[1] // merge, grid[2] // merge
    nh, nw = -(-gh // window), -(-gw // window)
    index = torch.full((t, nh * window, nw * window), -1, dtype=torch.long)
    index[:, :gh, :gw] = torch.arange(t * gh * gw).view(t, gh, gw)
    tiles = index.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, window * window)
    keep = tiles >= 0
    lengths = keep.sum(1)
    return tiles[keep], lengths[lengths > 0].tolist()


def cumulative(lengths: list[int], start: int = 0) -> list[int]:
    """[a, b, c] -> [start, start+a, start+a+b, start+a+b+c]: sequence boundaries for packed attention."""
    out = [start]
    for n in lengths:
        out.append(out[-1] + n)
    return out
