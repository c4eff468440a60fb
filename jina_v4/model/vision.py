"""The Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window attention with full-attention blocks, the
2x2 patch merger. Follows transformers 4.52.4 `Qwen2_5_VisionTransformerPretrainedModel`. Several images of
different sizes run packed in one call; attention never crosses an image or a window, and no patches x patches
mask is built (see `layers.attention`). Where each patch sits comes in a `positions.VisionLayout`.

Dimensions: N patches of all images (14x14 px, 2 frames), C = in_channels·t·p·p = 1176, E vision hidden,
U = N/4 merge units (one decoder token each), d vision head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig
from .layers import MLP, RMSNorm, attention
from .positions import Segments, VisionLayout, apply_rope, vision_cos_sin


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqs: Segments) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # 3 x (N, heads, d)
        # The reference applies the vision rotary in fp32 (cos and sin are fp32 or float64) and casts back.
        q, k = (apply_rope(t.to(cos.dtype), cos, sin).to(v.dtype) for t in (q, k))
        return self.proj(attention(q, k, v, seqs, causal=False).reshape(N, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqs: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seqs)
        return x + self.mlp(self.norm2(x))


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

    def forward(self, pixel_values: torch.Tensor, layout: VisionLayout) -> torch.Tensor:
        """pixel_values: (N, C) patches of all images, concatenated, in the layout's order.
        Returns (U, D): one decoder embedding per merge unit, in each image's row-major merged order."""
        unit = self.cfg.spatial_merge_size**2
        x = self.patch_embed(pixel_values)  # (N, E)
        cos, sin = vision_cos_sin(layout.positions, self.cfg.head_dim, x.dtype)  # (N, d)
        N = x.shape[0]

        def to_windows(t: torch.Tensor) -> torch.Tensor:  # whole merge units, permuted into window order
            return t.view(N // unit, unit, -1)[layout.index].view(N, -1)

        x, cos, sin = to_windows(x), to_windows(cos), to_windows(sin)
        full = set(self.cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout.images if i in full else layout.windows)
        merged = self.merger(x)  # (U, D), window order
        out = torch.empty_like(merged)
        out[layout.index] = merged  # back to row-major order (the reference's argsort(window_index))
        return out
