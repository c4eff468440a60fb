"""Late chunking: embed a long text once, then pool its token states per chunk, so every chunk's vector is
computed in the context of the whole document. Chunks are sentences, a token budget, or character spans.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import check_truncate_dim
from .heads import accumulation_dtype, matryoshka
from .processing import MAX_TEXT_TOKENS, checked_text, text_prompt


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


def anchors(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """Each token's first non-whitespace character in `text` (-1 for a token of whitespace or of the prompt's
    prefix). Offsets are characters of `text` (negative inside the prefix). The anchor, not the start, places
    a token: Qwen's tokens carry their leading space (" Second" starts on the space before the sentence), the
    first word's token may begin inside the prefix ("Passage:" + " Coastal"), and byte-level BPE splits some
    characters into several tokens that share the character's offsets."""
    out = []
    for a, b in offsets:
        piece = text[max(a, 0):max(b, 0)]
        lead = len(piece) - len(piece.lstrip())
        out.append(max(a, 0) + lead if lead < len(piece) else -1)
    return out


def token_chunks(anchor: list[int], budget: int, end: int) -> list[tuple[int, int]]:
    """Character spans of consecutive groups of `budget` tokens (whitespace tokens uncounted), each from its first
    token's anchor to the next group's (the last to `end`). Tokens that share a character stay together, so a
    group may grow by their number."""
    if budget < 1:
        raise ValueError(f"token budget must be positive, got {budget}")
    words = [a for a in anchor if a >= 0]
    starts = sorted(set(words[::budget]))
    return list(zip(starts, starts[1:] + [end]))


def chunk_token_mask(anchor: list[int], spans: list[tuple[int, int]]) -> torch.Tensor:
    """(chunks, tokens) bool: a token belongs to the chunk whose span holds its anchor."""
    at = torch.tensor(anchor)
    return torch.stack([(at >= a) & (at < b) for a, b in spans])


def chunk_spans(text: str, chunks, anchor: list[int], end: int, max_length: int):
    """The chunks' character spans ("sentences", an int token budget, or the caller's (start, end) spans) and
    their (C, L) token membership; every chunk must keep at least one token."""
    if chunks == "sentences":
        spans = sentence_spans(text)
    elif isinstance(chunks, int):
        spans = token_chunks(anchor, chunks, end)
    else:
        spans = [tuple(s) for s in chunks]
        for a, b in spans:
            if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b <= len(text)):
                raise ValueError(f"chunk span ({a}, {b}) is not a non-empty range inside the text")
    if not spans:
        raise ValueError("the text holds no chunk to embed")
    mask = chunk_token_mask(anchor, spans)
    for (a, b), n in zip(spans, mask.sum(1).tolist()):
        if n == 0:
            raise ValueError(f"chunk ({a}, {b}) has no tokens left after truncation at max_length={max_length}")
    return spans, mask


def pool_chunks(hidden: torch.Tensor, mask: torch.Tensor, truncate_dim: int | None = None) -> torch.Tensor:
    """(L, D) token states, (C, L) membership -> (C, D) normalised means in at least fp32."""
    dtype = accumulation_dtype(hidden.dtype)
    m = mask.to(hidden.device, dtype)
    return matryoshka(F.normalize((m @ hidden.to(dtype)) / m.sum(1, keepdim=True), dim=-1), truncate_dim)


@torch.inference_mode()
def encode_chunks(model, text: str, chunks: str | int | Sequence[tuple[int, int]] = "sentences",
                  task: str | None = None, prompt_name: str = "passage", max_length: int = MAX_TEXT_TOKENS,
                  truncate_dim: int | None = None, return_numpy: bool = False, deterministic: bool = False):
    """Late chunking with `model`: embed `text` once (up to 32768 tokens), then one single vector per chunk,
    the normalised mean of the chunk's token states. A token belongs to the chunk holding its first
    non-whitespace character (`anchors`); the prefix belongs to none. Returns (C, D) vectors and the spans."""
    text = checked_text(text, "text")
    task = model.processor.tasks(task or model.task, 1)[0]
    check_truncate_dim(truncate_dim, model.config.matryoshka_dims)
    prompt = text_prompt(text, task, prompt_name)
    item = model.processor.tokenize([prompt], max_length, task)[0]
    shift = len(prompt) - len(text)
    offsets = [(a - shift, b - shift) for a, b in item.offsets]  # characters of `text`; the prefix's are negative
    spans, mask = chunk_spans(text, chunks, anchors(text, offsets), offsets[-1][1], max_length)
    h = model(model.processor.collate([item]), deterministic=deterministic)
    vecs = pool_chunks(h, mask, truncate_dim or model.config.truncate_dim).cpu()
    return (vecs.numpy() if return_numpy else vecs), spans
