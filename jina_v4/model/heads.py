"""Output heads on the final-normed hidden states, following the released `get_single_vector_embeddings` /
`get_multi_vector_embeddings`. The heads own how vectors are made: which rows an input pools (`MeanPooling`),
the L2 and Matryoshka truncation, and the multi-vector projector with its task LoRA. Works on packed (T, D)
states and the batch's marks of where each input sits (processing.Batch).

A head, for the pipeline (pipeline.encode), is a callable (model, h, batch) -> one output per sequence:
`Single`, `Multi`, `Both` here; anything of that shape works (NOTES.md, "Recipes").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import lora
from .config import check_truncate_dim
from .processing import Batch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums and outputs in fp32 at least (bf16 states are pooled in fp32; float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def mean_rows(h: torch.Tensor, groups: list) -> torch.Tensor:
    """(T, D), G groups of row numbers (ranges, lists or 1-D tensors, on the host) -> (G, D): each group's mean,
    summed in at least fp32."""
    rows = [torch.as_tensor(g, dtype=torch.long) for g in groups]
    sizes = torch.tensor([len(r) for r in rows])
    owner = torch.repeat_interleave(torch.arange(len(rows)), sizes, output_size=sum(map(len, rows)))
    owner = owner.to(h.device, non_blocking=True)
    dtype = accumulation_dtype(h.dtype)
    picked = h[torch.cat(rows).to(h.device, non_blocking=True)].to(dtype)
    sums = h.new_zeros(len(rows), h.shape[1], dtype=dtype).index_add_(0, owner, picked)
    return sums / sizes.to(h.device, dtype, non_blocking=True)[:, None]


class MeanPooling(nn.Module):
    """The released rule: a text is the mean of all its tokens (the prompt prefix included); an image the mean of
    its vision_start .. vision_end rows (the image tokens and the two markers)."""

    def forward(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:  # (T, D) -> (S, D)
        spans = [
            range(s, s + n) if img is None else range(s + img[0], s + img[1] + 1)
            for s, n, img in zip(batch.seqs.cu, batch.seqs.lengths, batch.images)
        ]
        return mean_rows(h, spans)


def matryoshka(v: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Unit vectors (N, D) -> their first `dim` components, renormalised (the released truncation)."""
    return v if dim is None else F.normalize(v[:, :dim], dim=-1)


def single_vectors(model, h: torch.Tensor, batch: Batch, truncate_dim: int | None = None) -> torch.Tensor:
    """(T, D) -> (S, D or truncate_dim), unit length: the model's pooling, L2, Matryoshka."""
    return matryoshka(F.normalize(model.pooling(h, batch), dim=-1), truncate_dim)


def multi_vectors(model, h: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
    """(T, D) -> per sequence (L_i, P): the task-adapted projection of every token, each of unit length."""
    with lora.active(batch.task):
        p = model.multi_vector_projector(h)
    return F.normalize(p.to(accumulation_dtype(h.dtype)), dim=-1).split(batch.seqs.lengths)


@dataclass(frozen=True)
class Single:
    """Single vectors, Matryoshka-truncated to `truncate_dim` when given."""

    truncate_dim: int | None = None

    def __call__(self, model, h: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
        return list(single_vectors(model, h, batch, self.truncate_dim))


@dataclass(frozen=True)
class Multi:
    """Multi-vectors: (L_i, P) per input."""

    def __call__(self, model, h: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
        return list(multi_vectors(model, h, batch))


@dataclass(frozen=True)
class Both:
    """(single vector, multi-vectors) per input: what training scores."""

    def __call__(self, model, h: torch.Tensor, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(single_vectors(model, h, batch), multi_vectors(model, h, batch)))


def head_for(multivector: bool, truncate_dim: int | None, dims: tuple[int, ...]) -> Single | Multi:
    """The head that a request for single or multi-vectors names; multi-vectors are never truncated."""
    if multivector and truncate_dim is not None:
        raise ValueError(
            "truncate_dim applies to single vectors; multi-vectors are never truncated "
            "(drop truncate_dim or return_multivector)"
        )
    check_truncate_dim(truncate_dim, dims)
    return Multi() if multivector else Single(truncate_dim)
