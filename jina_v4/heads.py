"""Output heads on the final-normed hidden states, following the released `get_single_vector_embeddings` /
`get_multi_vector_embeddings`: masked mean pooling + L2 (single vector, Matryoshka truncation), and the
multi-vector projector with its task LoRA + per-token L2 (multi-vector). Works on packed (T, D) states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import LoRALinear, Task


def segment_ids(cu_seqlens: list[int], device: torch.device) -> torch.Tensor:
    """(T,) index of the sequence each packed token belongs to."""
    lengths = torch.tensor(cu_seqlens, device=device).diff()
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


def mean_pool(hidden: torch.Tensor, cu_seqlens: list[int], mask: torch.Tensor) -> torch.Tensor:
    """(T, D) -> (S, D) fp32: the mean of each sequence's tokens where `mask`, summed in fp32."""
    seg = segment_ids(cu_seqlens, hidden.device)[mask]
    S = len(cu_seqlens) - 1
    sums = hidden.new_zeros(S, hidden.shape[1], dtype=torch.float32).index_add_(0, seg, hidden[mask].float())
    counts = torch.zeros(S, device=hidden.device).index_add_(0, seg, torch.ones_like(seg, dtype=torch.float32))
    return sums / counts[:, None]


def single_vectors(
    hidden: torch.Tensor, cu_seqlens: list[int], pool_mask: torch.Tensor, truncate_dim: int | None = None
) -> torch.Tensor:
    """(T, D) -> (S, D or truncate_dim) fp32, unit length. Matryoshka: slice the normalised vector, renormalise."""
    v = F.normalize(mean_pool(hidden, cu_seqlens, pool_mask), dim=-1)
    return v if truncate_dim is None else F.normalize(v[:, :truncate_dim], dim=-1)


def multi_vectors(projector: LoRALinear, hidden: torch.Tensor, task: Task) -> torch.Tensor:
    """(T, D) -> (T, P) fp32: the task-adapted projection of every token, each of unit length."""
    return F.normalize(projector(hidden, task).float(), dim=-1)


def check_truncate_dim(truncate_dim: int | None, dims: tuple[int, ...]) -> None:
    if truncate_dim is not None and truncate_dim not in dims:
        raise ValueError(f"truncate_dim={truncate_dim!r} is not one of the Matryoshka dims {list(dims)}")
