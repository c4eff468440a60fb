"""The Qwen2.5-VL language model as an encoder: token embeddings, causal decoder layers with M-RoPE, the final
RMSNorm. Follows transformers 4.52.4 `Qwen2_5_VLTextModel` (SDPA path) without KV cache, LM head or
generation code. Module names equal the checkpoint's (`model.layers.N.self_attn.q_proj`, ...).

Dimensions: T packed tokens (all sequences of the batch, no padding), D hidden, H query heads,
K key/value heads, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TextConfig
from .layers import MLP, RMSNorm, apply_rope, varlen_attention
from .lora import LoRALinear, Task


def mrope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids: (3, T) on the temporal/height/width axes -> cos, sin: (T, d).

    Channel chunks [t, h, w, t, h, w] of sizes mrope_section * 2 take their angle from axis i % 3.
    Computed in fp32 and cast to the hidden dtype, as the reference does before applying them.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)  # (3, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (3, T, d)
    chunks = list(mrope_section) * 2

    def pick(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([c[i % 3] for i, c in enumerate(x.split(chunks, dim=-1))], dim=-1).to(dtype)

    return pick(emb.cos()), pick(emb.sin())


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.head_dim = d
        self.causal = True  # the released model is causal everywhere, image tokens included
        self.q_proj = LoRALinear(D, H * d, bias=True)
        self.k_proj = LoRALinear(D, K * d, bias=True)
        self.v_proj = LoRALinear(D, K * d, bias=True)
        self.o_proj = LoRALinear(H * d, D, bias=False)

    def forward(self, x, cos, sin, cu_seqlens: list[int], task: Task) -> torch.Tensor:
        T, d = x.shape[0], self.head_dim
        q = self.q_proj(x, task).view(T, -1, d)  # (T, H, d)
        k = self.k_proj(x, task).view(T, -1, d)  # (T, K, d)
        v = self.v_proj(x, task).view(T, -1, d)  # (T, K, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = varlen_attention(q, k, v, cu_seqlens, self.causal)  # (T, H, d)
        return self.o_proj(o.reshape(T, -1), task)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False, linear=LoRALinear)

    def forward(self, x, cos, sin, cu_seqlens: list[int], task: Task) -> torch.Tensor:
        # Residual adds land in the sublayer's fresh output (a + x == x + a exactly); x itself is never written.
        x = self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, task).add_(x)
        return self.mlp(self.post_attention_layernorm(x), task=task).add_(x)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: list[int],
        task: Task,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (T, D) input embeddings; position_ids: (3, T). Returns the final-normed states (T, D).
        Pass a list as `hidden_states` to collect each layer's input and the final output (the reference's
        `output_hidden_states`, num_hidden_layers + 1 tensors)."""
        c = self.cfg
        cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section, x.dtype)
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, cos, sin, cu_seqlens, task)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x
