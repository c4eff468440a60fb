"""The Qwen2.5-VL language model as an encoder: token embeddings, causal decoder layers with M-RoPE, the final
RMSNorm. Follows transformers 4.52.4 `Qwen2_5_VLTextModel` (SDPA path) without KV cache, LM head or
generation code. Module names equal the checkpoint's (`model.layers.N.self_attn.q_proj`, ...).

Dimensions: T packed tokens (all sequences of the batch, no padding), D hidden, H query heads,
K key/value heads, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from ..execution import checkpointed
from .config import TextConfig
from .layers import MLP, RMSNorm, attention
from .lora import LoRALinear
from .positions import Segments, apply_rope, mrope_cos_sin


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqs: Segments) -> torch.Tensor:
        T, d = x.shape[0], self.head_dim
        q = self.q_proj(x).view(T, -1, d)  # (T, H, d)
        k = self.k_proj(x).view(T, -1, d)  # (T, K, d)
        v = self.v_proj(x).view(T, -1, d)  # (T, K, d)
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, seqs, self.causal)  # (T, H, d)
        return self.o_proj(o.reshape(T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False, linear=LoRALinear)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqs: Segments) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, seqs)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.checkpointing = False  # training: recompute each layer in the backward pass instead of storing it

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, seqs: Segments, hidden_states: list | None = None
    ) -> torch.Tensor:
        """x: (T, D) input embeddings; position_ids: (3, T). Returns the final-normed states (T, D).
        Pass a list as `hidden_states` to collect each layer's input and the final output (the reference's
        `output_hidden_states`, one more tensor than there are layers)."""
        c = self.cfg
        cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section, x.dtype)  # (T, d)
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpointed(layer, x, cos, sin, seqs)
            else:
                x = layer(x, cos, sin, seqs)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x
