"""Late chunking: embed a long text once, then pool its token states per chunk, so every chunk's vector is
computed in the context of the whole document. Chunks are sentences, a token budget, or character spans.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.config import check_truncate_dim
from ..model.heads import matryoshka, mean_rows
from ..model.processing import MAX_TEXT_TOKENS, checked_text
from ..pipeline import encode


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
        piece = text[max(a, 0) : max(b, 0)]
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


def chunk_rows(anchor: list[int], spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Each chunk's token rows, ascending: the tokens whose anchor its span holds. Two binary searches a span over
    the anchors in order, so the cost is (tokens + chunks) x log(tokens) plus the rows returned; a (chunks, tokens)
    mask would take 32 GB for a million sentences of a long text."""
    at = torch.tensor(anchor, dtype=torch.long)
    order = torch.argsort(at, stable=True)  # anchors ascending, rows ascending among equal anchors
    bounds = torch.tensor(spans, dtype=torch.long).reshape(-1, 2)
    first = torch.searchsorted(at[order], bounds[:, 0].contiguous()).tolist()  # first anchor >= the span's start
    last = torch.searchsorted(at[order], bounds[:, 1].contiguous()).tolist()  # first anchor >= its end
    return [order[a:b].sort().values for a, b in zip(first, last)]


def chunk_spans(text: str, chunks, anchor: list[int], end: int):
    """The chunks' character spans ("sentences", an int token budget, or the caller's (start, end) spans) and
    each chunk's token rows."""
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
    return spans, chunk_rows(anchor, spans)


class EmptyChunk(ValueError):
    """A chunk that keeps no token of its own; `chunk` is its number."""

    def __init__(self, chunk: int, span: tuple[int, int], max_length: int):
        super().__init__(f"chunk {chunk} {span} has no tokens left after truncation at max_length={max_length}")
        self.chunk = chunk


@dataclass(frozen=True)
class ChunkPooling:
    """A head (heads.py) for one text: each chunk's normalised mean of its tokens' states, Matryoshka-truncated."""

    groups: list  # per chunk, the token rows it pools
    truncate_dim: int | None = None

    def __call__(self, model, h: torch.Tensor, batch) -> list[torch.Tensor]:
        return [matryoshka(F.normalize(mean_rows(h, self.groups), dim=-1), self.truncate_dim)]


def chunk_item(model, text: str, chunks, task: str | None, prompt_name: str, max_length: int):
    """The text as one Item with its token offsets, the chunks' character spans, and each chunk's token rows."""
    text = checked_text(text, "text")
    item = model.prepare([{"text": text}], task, prompt_name, max_length, name="text")[0]
    prefix = model.tasks[item.task].prompt("", prompt_name)
    offsets = [(a - len(prefix), b - len(prefix)) for a, b in item.offsets]  # of `text`; the prefix's are negative
    spans, groups = chunk_spans(text, chunks, anchors(text, offsets), offsets[-1][1])
    return item, spans, groups


def check_chunks(spans: list[tuple[int, int]], groups: list, max_length: int) -> None:
    """Every chunk must keep a token of its own (EmptyChunk names the first that does not)."""
    for i, (span, rows) in enumerate(zip(spans, groups)):
        if len(rows) == 0:
            raise EmptyChunk(i, span, max_length)


@torch.inference_mode()
def encode_chunks(
    model,
    text: str,
    chunks: str | int | Sequence[tuple[int, int]] = "sentences",
    task: str | None = None,
    prompt_name: str = "passage",
    max_length: int = MAX_TEXT_TOKENS,
    truncate_dim: int | None = None,
    return_numpy: bool = False,
    deterministic: bool = False,
):
    """Late chunking with `model`: embed `text` once (up to 32768 tokens), then one single vector per chunk,
    the normalised mean of the chunk's token states. A token belongs to the chunk holding its first
    non-whitespace character (`anchors`); the prefix belongs to none. Returns (C, D) vectors and the spans."""
    check_truncate_dim(truncate_dim, model.config.matryoshka_dims)
    item, spans, groups = chunk_item(model, text, chunks, task, prompt_name, max_length)
    check_chunks(spans, groups, max_length)
    head = ChunkPooling(groups, truncate_dim or model.config.truncate_dim)
    vecs = encode(model, [item], head, deterministic=deterministic)[0].cpu()
    return (vecs.numpy() if return_numpy else vecs), spans
