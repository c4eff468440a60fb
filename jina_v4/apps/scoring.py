"""Late interaction on multi-vectors: MaxSim scores, the padded form, and per-cell similarity maps of images.

MaxSim(q, d) = Σ_i max_j q_i · d_j over the query's tokens i and the document's tokens j, on unit vectors, as
colpali-engine's `score_multi_vector` and PyLate's `colbert_scores` define it (inference does not divide by the
number of query tokens). Unlike colpali's, document padding is masked out of the max: colpali pads documents
with zero rows and takes an unmasked max, so when all of a query token's similarities with a document are
negative, a padding row wins at 0 and the document's score depends on the longest document in its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

from ..model.heads import Multi
from ..pipeline import encode

Vectors = Union[Sequence[torch.Tensor], Sequence[np.ndarray], torch.Tensor, np.ndarray]


def pad_multivectors(vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged (L_i, P) tensors -> padded (N, Lmax, P) with exactly-zero padding rows, and the (N, Lmax) mask."""
    if len(vectors) == 0:
        raise ValueError("pad_multivectors: no vectors given")
    vectors = [torch.as_tensor(v) for v in vectors]
    lengths = torch.tensor([len(v) for v in vectors])
    padded = torch.nn.utils.rnn.pad_sequence(vectors, batch_first=True, padding_value=0.0)
    return padded, torch.arange(padded.shape[1]) < lengths[:, None]


def _padded(x: Vectors, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of (L, P) tensors or arrays, or a padded (N, L, P) one (padding rows exactly zero) -> padded, mask."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(x)
        if x.dim() != 3:
            raise ValueError(
                f"{name}: expected a list of (L, P) tensors or a padded (N, L, P) tensor, got shape {tuple(x.shape)}"
            )
        padded, mask = x, x.abs().sum(-1) > 0
    else:
        for i, v in enumerate(x):
            if torch.as_tensor(v).dim() != 2:
                raise ValueError(f"{name}[{i}]: expected an (L, P) tensor, got shape {tuple(torch.as_tensor(v).shape)}")
        padded, mask = pad_multivectors(x)
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name}[{empty[0]}] has no vectors (0 tokens): its MaxSim is undefined")
    return padded, mask


def maxsim(
    queries: Vectors,
    documents: Vectors,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    max_elements: int = 2**26,
) -> torch.Tensor:
    """(Q, D) late-interaction scores, accumulated in fp32 (float64 inputs: float64), in blocks of up to
    `batch_size` queries x documents, fewer documents when a (q, d, query tokens, document tokens) block would
    pass `max_elements`. Empty lists give an empty (Q, D) result; a query or document with no vectors is an
    error naming it."""
    if len(queries) == 0 or len(documents) == 0:
        return torch.empty(len(queries), len(documents))
    q, q_mask = _padded(queries, "queries")
    d, d_mask = _padded(documents, "documents")
    if q.shape[-1] != d.shape[-1]:
        raise ValueError(f"queries have {q.shape[-1]}-d vectors, documents {d.shape[-1]}-d")
    dtype = torch.promote_types(torch.promote_types(q.dtype, d.dtype), torch.float32)
    device = torch.device(device) if device is not None else q.device
    out = torch.empty(len(q), len(d), dtype=dtype)
    doc_block = max(1, min(batch_size, max_elements // (min(batch_size, len(q)) * q.shape[1] * d.shape[1])))
    for i in range(0, len(q), batch_size):
        qb, qm = q[i : i + batch_size].to(device, dtype), q_mask[i : i + batch_size].to(device)
        for j in range(0, len(d), doc_block):
            db, dm = d[j : j + doc_block].to(device, dtype), d_mask[j : j + doc_block].to(device)
            out[i : i + batch_size, j : j + doc_block] = masked_maxsim(qb, qm, db, dm).cpu()
    return out


def masked_maxsim(q: torch.Tensor, q_mask: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """Padded (Q, n, P) queries and (D, s, P) documents with their masks -> (Q, D): Σ over real query tokens of
    the best dot product with a real document token. Differentiable (training divides it by n)."""
    sim = torch.einsum("qnp,dsp->qdns", q, d)  # (Q, D, query tokens, document tokens)
    best = sim.masked_fill(~d_mask[None, :, None, :], float("-inf")).amax(-1)  # (Q, D, n)
    return best.masked_fill(~q_mask[:, None, :], 0).sum(-1)


def patch_scores(query: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """(Lq, P) query vectors, (N, P) image-token vectors -> (N,): each token's MaxSim with the query when it
    stands alone as the document, i.e. the sum over query tokens of their dot products with it."""
    return image.float() @ query.float().sum(0)


@torch.inference_mode()
def similarity_map(model, query: str, image, task: str | None = None, max_pixels: int | None = None) -> torch.Tensor:
    """(h, w) over the image's merge units (28x28 px each of the resized image): each unit's late-interaction
    score with the query's multi-vectors (`patch_scores`)."""
    q = model.encode_text(query, task=task, return_multivector=True)
    item = model.prepare([{"image": image}], task, max_pixels=max_pixels, name="image")[0]
    d = encode(model, [item], Multi())[0].cpu()
    cells = torch.tensor(item.input_ids) == model.config.image_token_id
    merge = model.processor.image_cfg.merge_size
    return patch_scores(q, d[cells]).view(item.grid[1] // merge, item.grid[2] // merge)
