"""Output heads on the final-normed hidden states, following the released `get_single_vector_embeddings` /
`get_multi_vector_embeddings`: masked mean pooling + L2 (single vector, Matryoshka truncation), and the
multi-vector projector with its task LoRA + per-token L2 (multi-vector). Works on packed (T, D) states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import LoRALinear


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums and outputs in fp32 at least (bf16 states are pooled in fp32; float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def mean_pool(hidden: torch.Tensor, rows: torch.Tensor, seqs: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(T, D) -> (S, D): the mean of each sequence's pooled rows, summed in at least fp32."""
    dtype = accumulation_dtype(hidden.dtype)
    sums = hidden.new_zeros(len(sizes), hidden.shape[1], dtype=dtype).index_add_(0, seqs, hidden[rows].to(dtype))
    return sums / sizes[:, None].to(dtype)


def matryoshka(v: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Unit vectors (N, D) -> their first `dim` components, renormalised (the released truncation)."""
    return v if dim is None else F.normalize(v[:, :dim], dim=-1)


def single_vectors(hidden: torch.Tensor, rows: torch.Tensor, seqs: torch.Tensor, sizes: torch.Tensor,
                   truncate_dim: int | None = None) -> torch.Tensor:
    """(T, D) -> (S, D or truncate_dim), unit length."""
    return matryoshka(F.normalize(mean_pool(hidden, rows, seqs, sizes), dim=-1), truncate_dim)


def multi_vectors(projector: LoRALinear, hidden: torch.Tensor, task) -> torch.Tensor:
    """(T, D) -> (T, P): the task-adapted projection of every token, each of unit length."""
    return F.normalize(projector(hidden, task).to(accumulation_dtype(hidden.dtype)), dim=-1)
