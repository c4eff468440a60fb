"""Late interaction and late chunking on top of the model's outputs.

MaxSim (colpali-engine's `score_multi_vector`, PyLate's `colbert_scores`): for each query token the largest
dot product over a document's tokens, summed over the query's tokens. Late chunking: embed a long text once,
then pool its token states per chunk (sentences, a token budget, or character spans of the caller's).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F

Vectors = Sequence[torch.Tensor] | torch.Tensor


def pad_multivectors(vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged (L_i, P) tensors -> padded (N, Lmax, P) with exactly-zero padding rows, and the (N, Lmax) mask."""
    if len(vectors) == 0:
        raise ValueError("pad_multivectors: no vectors given")
    lengths = torch.tensor([len(v) for v in vectors])
    padded = torch.nn.utils.rnn.pad_sequence(list(vectors), batch_first=True, padding_value=0.0)
    return padded, torch.arange(padded.shape[1]) < lengths[:, None]


def _padded(x: Vectors, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 3:
            raise ValueError(f"{name}: expected a list of (L, P) tensors or a padded (N, L, P) tensor, "
                             f"got shape {tuple(x.shape)}")
        return x, x.abs().sum(-1) > 0  # padded rows are exactly zero
    if len(x) == 0:
        raise ValueError(f"{name}: empty")
    return pad_multivectors(x)


def maxsim(queries: Vectors, documents: Vectors, batch_size: int = 128,
           device: str | torch.device | None = None, max_elements: int = 2**26) -> torch.Tensor:
    """(Q, D) late-interaction scores, accumulated in fp32, in blocks of up to `batch_size` queries x
    documents, fewer documents when the (q, d, query tokens, document tokens) block would pass `max_elements`.

    Document padding is masked out of the max (a zero padding row never wins, so a score does not depend on
    which other documents share its block); query padding rows add nothing."""
    q, q_mask = _padded(queries, "queries")
    d, d_mask = _padded(documents, "documents")
    if q.shape[-1] != d.shape[-1]:
        raise ValueError(f"queries have {q.shape[-1]}-d vectors, documents {d.shape[-1]}-d")
    device = torch.device(device) if device is not None else q.device
    out = torch.empty(len(q), len(d))
    doc_block = max(1, min(batch_size, max_elements // (min(batch_size, len(q)) * q.shape[1] * d.shape[1])))
    for i in range(0, len(q), batch_size):
        qb, qm = q[i:i + batch_size].to(device, torch.float32), q_mask[i:i + batch_size].to(device)
        for j in range(0, len(d), doc_block):
            db, dm = d[j:j + doc_block].to(device, torch.float32), d_mask[j:j + doc_block].to(device)
            sim = torch.einsum("qnp,dsp->qdns", qb, db)  # (q, d, query tokens, document tokens)
            best = sim.masked_fill(~dm[None, :, None, :], float("-inf")).amax(-1)  # (q, d, n)
            out[i:i + batch_size, j:j + doc_block] = best.masked_fill(~qm[:, None, :], 0).sum(-1).cpu()
    return out


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of sentences: text up to and including . ! ? (and CJK 。！？) followed by a space or
    the end, or up to a line break; surrounding whitespace left out."""
    spans = []
    for m in re.finditer(r"[^\n]*?(?:[.!?]+(?=\s|$)|[。！？]+|\n|$)", text):
        a, b = m.span()
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            spans.append((a, b))
    return spans


def token_chunks(offsets: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """Character spans of consecutive groups of at most `budget` tokens, from the tokens' (start, end) offsets."""
    if budget < 1:
        raise ValueError(f"token budget must be positive, got {budget}")
    return [(offsets[i][0], offsets[min(i + budget, len(offsets)) - 1][1]) for i in range(0, len(offsets), budget)]


def chunk_token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> torch.Tensor:
    """(chunks, tokens) bool: a token belongs to the chunk whose span holds its first character."""
    starts = torch.tensor([a for a, _ in offsets])
    return torch.stack([(starts >= a) & (starts < b) for a, b in spans])


def chunk_spans(text: str, chunks, offsets: list[tuple[int, int]], max_length: int):
    """The chunks' character spans ("sentences", an int token budget, or the caller's (start, end) spans) and
    their (C, L) token membership; every chunk must keep at least one token."""
    if chunks == "sentences":
        spans = sentence_spans(text)
    elif isinstance(chunks, int):
        spans = token_chunks([o for o in offsets if o[0] >= 0], chunks)
    else:
        spans = [tuple(s) for s in chunks]
        for a, b in spans:
            if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b <= len(text)):
                raise ValueError(f"chunk span ({a}, {b}) is not a non-empty range inside the text")
    if not spans:
        raise ValueError("the text holds no chunk to embed")
    mask = chunk_token_mask(offsets, spans)
    for (a, b), n in zip(spans, mask.sum(1).tolist()):
        if n == 0:
            raise ValueError(f"chunk ({a}, {b}) has no tokens left after truncation at max_length={max_length}")
    return spans, mask


def pool_chunks(hidden: torch.Tensor, mask: torch.Tensor, truncate_dim: int | None = None) -> torch.Tensor:
    """(L, D) token states, (C, L) membership -> (C, D) normalised means in fp32 (an empty chunk is NaN)."""
    m = mask.to(hidden.device, torch.float32)
    v = F.normalize((m @ hidden.float()) / m.sum(1, keepdim=True), dim=-1)
    return v if truncate_dim is None else F.normalize(v[:, :truncate_dim], dim=-1)


def patch_scores(query: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """(Lq, P) query vectors, (N, P) image-token vectors -> (N,): each token's late-interaction score with the
    query when it stands alone as the document, i.e. the sum over query tokens of their dot products with it."""
    return image.float() @ query.float().sum(0)
