"""The reference with its fp32 islands lifted to float64, for the float64 proofs of identity.

transformers computes RMSNorm, the text M-RoPE angles (inv_freq included) and the vision rotary in fp32 whatever
the model dtype. jina_v4 computes them in at least fp32, i.e. in float64 for a float64 model. Inside
`float64_islands()`, the oracle's four functions do the same (each is the transformers 4.52.4 function with
`float()` / `float32` replaced by "fp32 or wider"), so a float64 run of both implementations must agree to
rounding of float64: any remaining difference is a different algorithm.
"""

import contextlib
from unittest import mock

import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf


def wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rmsnorm(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(wide(input_dtype))
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def text_rotary(self, x, position_ids):
    dtype, dim = wide(x.dtype), 2 * self.inv_freq.shape[0]
    inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(x.device, dtype) / dim))
    inv_freq = inv_freq[None, None, :, None].expand(3, position_ids.shape[1], -1, 1)
    freqs = (inv_freq @ position_ids[:, :, None, :].to(dtype)).transpose(2, 3)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def vision_rotary(self, seqlen):
    dim = 2 * self.inv_freq.shape[0]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return torch.outer(torch.arange(seqlen, dtype=torch.float64), inv_freq)


def apply_rotary_pos_emb_vision(q, k, cos, sin):
    dq, dk = q.dtype, k.dtype
    q, k = q.to(wide(dq)), k.to(wide(dk))
    cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
    q_embed = (q * cos) + (hf.rotate_half(q) * sin)
    k_embed = (k * cos) + (hf.rotate_half(k) * sin)
    return q_embed.to(dq), k_embed.to(dk)


@contextlib.contextmanager
def float64_islands():
    with (
        mock.patch.object(hf.Qwen2RMSNorm, "forward", rmsnorm),
        mock.patch.object(hf.Qwen2_5_VLRotaryEmbedding, "forward", text_rotary),
        mock.patch.object(hf.Qwen2_5_VisionRotaryEmbedding, "forward", vision_rotary),
        mock.patch.object(hf, "apply_rotary_pos_emb_vision", apply_rotary_pos_emb_vision),
    ):
        yield
