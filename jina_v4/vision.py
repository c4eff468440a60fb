"""The Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window attention with full-attention blocks, the
2x2 patch merger. Follows transformers 4.52.4 `Qwen2_5_VisionTransformerPretrainedModel`. Several images of
different sizes run packed in one call; attention never crosses an image or a window, and no patches x patches
mask is built (see `layers.varlen_attention`).

Dimensions: N patches of all images (14x14 px, 2 frames), C = in_channels·t·p·p = 1176, E vision hidden,
U = N/4 merge units (one decoder token each), d vision head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig
from .layers import MLP, RMSNorm, apply_rope, varlen_attention
from .positions import cumulative, vision_positions, window_index


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same Conv3d call as the reference (a matmul would do, but sums in another order: ~1e-6 off in
        # fp32); it is under 1% of the tower's FLOPs.
        w = self.proj.weight
        x = x.to(w.dtype).view(-1, *w.shape[1:])  # (N, C) -> (N, in_channels, t, p, p)
        return self.proj(x).view(x.shape[0], -1)  # (N, E)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cos, sin, cu_seqlens: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # 3 x (N, heads, d)
        # The reference applies the vision rotary in fp32 and casts back.
        q = apply_rope(q.float(), cos, sin).to(v.dtype)
        k = apply_rope(k.float(), cos, sin).to(v.dtype)
        o = varlen_attention(q, k, v, cu_seqlens, causal=False)  # (N, heads, d)
        return self.proj(o.reshape(N, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, cu_seqlens: list[int]) -> torch.Tensor:
        x = self.attn(self.norm1(x), cos, sin, cu_seqlens).add_(x)  # into the fresh sublayer output, as text.py
        return self.mlp(self.norm2(x)).add_(x)


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))  # (N, E) -> (U, 4E) -> (U, D)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def rotary(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, d) in fp32: the first d/2 channels rotate with the patch row, the next with its column."""
        dim = self.cfg.head_dim // 2
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # (d/4,)
        pos = torch.cat([vision_positions(g, self.cfg.spatial_merge_size) for g in grids])  # (N, 2)
        theta = (pos[:, :, None] * inv_freq).flatten(1)  # (N, d/2)
        emb = torch.cat((theta, theta), dim=-1)  # (N, d)
        return emb.cos(), emb.sin()

    def windows(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int], list[int]]:
        """Window permutation of all merge units (U,), window boundaries and image boundaries, in patches."""
        c = self.cfg
        window = c.window_size // c.spatial_merge_size // c.patch_size
        unit = c.spatial_merge_size**2
        index, win_lengths, offset = [], [], 0
        for g in grids:
            idx, lengths = window_index(g, window, c.spatial_merge_size)
            index.append(idx + offset)
            win_lengths += [n * unit for n in lengths]
            offset += g[0] * g[1] * g[2] // unit
        images = [h * w for t, h, w in grids for _ in range(t)]  # full attention: one sequence per frame
        return torch.cat(index), cumulative(win_lengths), cumulative(images)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values: (N, C) patches of all images, concatenated; grids: (t, h, w) per image, in patches.
        Returns (U, D): one decoder embedding per merge unit, in each image's row-major merged order."""
        unit = self.cfg.spatial_merge_size**2
        x = self.patch_embed(pixel_values)  # (N, E)
        N, dev = x.shape[0], x.device
        cos, sin = self.rotary(grids)
        index, cu_window, cu_full = self.windows(grids)

        def to_windows(t: torch.Tensor) -> torch.Tensor:  # permute whole merge units into window order
            return t.view(N // unit, unit, -1)[index.to(t.device)].view(N, -1)

        x, cos, sin = to_windows(x), to_windows(cos.to(dev)), to_windows(sin.to(dev))
        full = set(self.cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cu_full if i in full else cu_window)
        merged = self.merger(x)  # (U, D), window order
        out = torch.empty_like(merged)
        out[index.to(dev)] = merged  # back to row-major order (the reference's argsort(window_index))
        return out
