"""Inputs to ready packed batches, as the released `JinaEmbeddingsV4Processor` builds each input.

Text: the task's prefix (`"Query: "` / `"Passage: "`, config.Task) + text through tokenizer.json (no BOS/EOS),
cut on the right at max_length. Images: `images.image_patches`, with the fixed image prompt around t·h·w/4
`<|image_pad|>` tokens. `prepare` turns inputs into `Item`s; `batches` packs items, longest first under a token
budget, into `Batch`es that hold everything a forward needs (ids, M-RoPE positions, patches and their layout, the
rows that receive image features, the task of each row) and mark where each input's tokens and its image tokens
sit. What is pooled from those is the heads' business (heads.py).
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import BPE

from .config import ConfigError, JinaV4Config, PreprocessorConfig, Task, TokenizerConfig, read_json
from .images import ImageInput, image_patches, load_image
from .positions import Segments, VisionLayout, cumulative, rope_index

IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
MAX_TEXT_TOKENS = 32768  # the reference caps max_length here


@dataclass
class Item:
    """One prepared input: its task and token ids, and for an image its patches and grid."""

    input_ids: list[int]
    task: str
    pixel_values: torch.Tensor | None = None  # (N, C·t·p·p)
    grid: tuple[int, int, int] | None = None  # (t, h, w) in patches
    dropped: int = 0  # tokens cut past max_length (a lower bound when `cut`)
    offsets: list[tuple[int, int]] = field(default_factory=list, repr=False)  # text: characters of each token
    cut: int = 0  # characters of a long text never tokenized: it had more than max_length tokens anyway

    @property
    def cost(self) -> int:
        """What the item adds to a forward: its tokens, and an image's patches."""
        return len(self.input_ids) + (0 if self.pixel_values is None else len(self.pixel_values))


class TaskRows(NamedTuple):
    """The tasks of a mixed batch: names (k,) and masks (T, k), 1 where a packed row belongs to names[i]."""

    names: list[str]
    masks: torch.Tensor


@dataclass
class Batch:
    """S sequences packed without padding into T tokens, and the N patches of its images."""

    index: list[int]  # (S,) the item each sequence came from
    input_ids: torch.Tensor  # (T,)
    position_ids: torch.Tensor  # (3, T) M-RoPE positions
    seqs: Segments  # where each sequence's tokens sit
    images: list[tuple[int, int] | None]  # (S,) per sequence: its vision_start .. vision_end rows (inclusive)
    task: str | TaskRows  # one task, or the task of each row
    image_rows: torch.Tensor  # (N/4,) the tokens that receive image features, in patch-merge order
    pixel_values: torch.Tensor | None = None  # (N, C·t·p·p)
    vision: VisionLayout | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> Batch:
        if self.input_ids.device == device and (isinstance(self.task, str) or self.task.masks.dtype == dtype):
            return self

        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        task = self.task if isinstance(self.task, str) else TaskRows(self.task.names, self.task.masks.to(device, dtype))
        return replace(
            self,
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            seqs=self.seqs.to(device),
            task=task,
            image_rows=move(self.image_rows),
            pixel_values=move(self.pixel_values),
            vision=None if self.vision is None else self.vision.to(device),
        )


def token_batches(items: list[Item], max_tokens: int, batch_size: int | None = None) -> list[list[int]]:
    """Item indices, longest first, cut into batches of at most `max_tokens` (tokens + patches) and, when given,
    `batch_size` items. Items x longest stays within `max_tokens` too, which bounds a padded attention call:
    one long text never drags a crowd of short ones along."""
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    batches: list[list[int]] = []
    used = longest = 0
    for i in sorted(range(len(items)), key=lambda i: -items[i].cost):
        n = len(items[i].input_ids)
        full = batches and (used + items[i].cost > max_tokens or len(batches[-1]) == batch_size)
        if not batches or full or (len(batches[-1]) + 1) * max(longest, n) > max_tokens:
            batches.append([])
            used = longest = 0
        batches[-1].append(i)
        used, longest = used + items[i].cost, max(longest, n)
    return batches


class Processor:
    def __init__(
        self, tokenizer: Tokenizer, config: JinaV4Config, image_cfg: PreprocessorConfig, tokenizer_cfg: TokenizerConfig
    ):
        self.tokenizer, self.image_cfg = tokenizer, image_cfg
        tokenizer.no_truncation()  # truncation is per call (`tokenize`), never state shared between calls
        tokenizer.no_padding()
        self._token_id(tokenizer_cfg.pad_token, "tokenizer_config.json: key 'pad_token'")
        for key, token in (
            ("image_token_id", "<|image_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ):
            if self._token_id(token, "tokenizer.json") != getattr(config, key):
                raise ConfigError(
                    f"config.json: key '{key}' is {getattr(config, key)}, but tokenizer.json "
                    f"maps {token} to {tokenizer.token_to_id(token)}"
                )
        self.image_token_id = config.image_token_id
        self.vision_start, self.vision_end = config.vision_start_token_id, config.vision_end_token_id
        v = config.vision_config
        self.window = v.window_size // v.spatial_merge_size // v.patch_size  # in merge units
        self.token_chars = max(map(len, tokenizer.get_vocab(with_added_tokens=True)))  # byte-level: the most bytes
        self._joined: tuple[Tokenizer | None, set | None] = (None, None)  # joined(): for this tokenizer
        self.image_prompt = self.tokenize([IMAGE_PROMPT])[0].input_ids

    @classmethod
    def from_dir(cls, path: Path, config: JinaV4Config) -> Processor:
        try:
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise ConfigError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
        image_cfg = PreprocessorConfig.from_dict(read_json(path / "preprocessor_config.json"))
        image_cfg.check_against(config.vision_config, str(path / "preprocessor_config.json"), str(path / "config.json"))
        return cls(tokenizer, config, image_cfg, TokenizerConfig.from_dict(read_json(path / "tokenizer_config.json")))

    def _token_id(self, token: str, where: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ConfigError(f"{where}: token {token!r} is not in the vocabulary")
        return i

    def tokenize(self, prompts: list[str], max_length: int = MAX_TEXT_TOKENS, task: str = "") -> list[Item]:
        """Prompts -> Items (ids and character offsets), cut on the right at min(max_length, 32768) exactly as
        the tokenizer's own truncation would cut them (no special tokens are added). A prompt longer than n + 2
        tokens can cover is tokenized that far: its words ending a token's length earlier are the whole text's."""
        if not (isinstance(max_length, int) and max_length > 0):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        n, items = min(max_length, MAX_TEXT_TOKENS), []
        ends = [cut_point(p, (n + 2) * self.token_chars) for p in prompts]
        cut = self.tokenizer.encode_batch([p[:end] for p, end in zip(prompts, ends)], add_special_tokens=True)
        for p, end, e in zip(prompts, ends, cut):
            kept = settled(e, end - self.token_chars, self.joined()) if end < len(p) else len(e)
            if kept < n and end < len(p):  # a word the cut may change reaches into the first n tokens
                e, end = self.tokenizer.encode(p, add_special_tokens=True), len(p)
            dropped = len(e) - n if end == len(p) else kept + 1 - n  # a cut text: at least one more token
            ids = e.ids  # each read of an Encoding's list builds the whole list anew: once per text
            items.append(Item(ids[:n], task, dropped=max(0, dropped), offsets=e.offsets[:n], cut=len(p) - end))
        return items

    def joined(self) -> set | None:
        """The pairs of characters that sit side by side in some token of the BPE vocabulary (built on first use):
        no merge crosses a token boundary between any other two. None for a tokenizer this does not hold for."""
        if self._joined[0] is not self.tokenizer:
            m = self.tokenizer.model
            plain = isinstance(m, BPE) and not (m.dropout or m.continuing_subword_prefix or m.end_of_word_suffix)
            vocab = self.tokenizer.get_vocab(with_added_tokens=False) if plain else None
            self._joined = (
                self.tokenizer,
                None if vocab is None else {(a, b) for t in vocab for a, b in zip(t, t[1:])},
            )
        return self._joined[1]

    def image_item(self, image: ImageInput, task: str, max_pixels: int | None = None) -> Item:
        pixels, grid = image_patches(load_image(image), self.image_cfg, max_pixels)
        pad, n = self.image_token_id, grid[0] * grid[1] * grid[2] // self.image_cfg.merge_size**2
        i = self.image_prompt.index(pad)
        return Item(self.image_prompt[:i] + [pad] * n + self.image_prompt[i + 1 :], task, pixels, grid)

    def prepare(
        self,
        inputs: Sequence[str | ImageInput | dict],
        tasks: Sequence[Task],
        prompt_name: str = "query",
        max_length: int = MAX_TEXT_TOKENS,
        max_pixels: int | None = None,
        errors: str = "raise",
        name: str = "inputs",
    ) -> list[Any]:
        """Inputs -> one `Item` each, inputs[i] under tasks[i] (config.Task: its adapter and prompt rule). A str is
        text; a PIL image, Path or bytes is an image; {"text": s} and {"image": path_or_url} say it explicitly. A
        bad input raises an error naming it (`inputs[3] ('...'): ...`), or with errors="return" stands in the list
        as its exception. A text over max_length is cut on the right, with a warning."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors={errors!r} is not 'raise' or 'return'")
        texts: dict[int, str] = {}
        prompts: list[str] = []
        items: list[Any] = [None] * len(inputs)
        for i, x in enumerate(inputs):
            kind, value = next(iter(x.items())) if isinstance(x, dict) and len(x) == 1 else (None, x)
            try:
                if kind == "text" or (kind is None and isinstance(x, str)):
                    texts[i] = checked_text(value, f"{name}[{i}]")
                    prompts.append(tasks[i].prompt(texts[i], prompt_name))
                elif kind == "image" or (kind is None and isinstance(x, (Image.Image, Path, bytes))):
                    try:
                        items[i] = self.image_item(value, tasks[i].name, max_pixels)
                    except Exception as e:
                        raise InputError(f"{name}[{i}]", value, f"{type(e).__name__}: {e}") from e
                elif kind in ("video", "audio"):
                    raise TypeError(f"{name}[{i}] is a {kind}: jina-embeddings-v4 embeds texts and still images only")
                else:
                    raise TypeError(f"{name}[{i}] is neither text nor an image: {describe(x)}")
            except (TypeError, ValueError) as e:
                if errors == "raise":
                    raise
                items[i] = e
        for i, item in zip(texts, self.tokenize(prompts, max_length)):
            items[i] = replace(item, task=tasks[i].name)
            if item.dropped:
                warnings.warn(
                    f"{name}[{i}] ({describe(texts[i])}): {'at least ' if item.cut else ''}{item.dropped} tokens "
                    f"past max_length={min(max_length, MAX_TEXT_TOKENS)} were dropped",
                    stacklevel=4,
                )
        return items

    def batches(self, items: list[Item], max_tokens: int, batch_size: int | None = None) -> Iterator[Batch]:
        for index in token_batches(items, max_tokens, batch_size):
            yield self.collate([items[i] for i in index], index)

    def collate(self, items: list[Item], index: list[int] | None = None) -> Batch:
        """Items -> one packed Batch (`index`: the items' numbers in the caller's list, default 0..S-1)."""
        merge = self.image_cfg.merge_size
        seqs = Segments(cumulative([len(it.input_ids) for it in items]))
        positions, images = [], []
        for it in items:
            if it.grid is None:  # text: 1-D positions
                positions.append(torch.arange(len(it.input_ids)).expand(3, -1))
                images.append(None)
                continue
            if it.grid[0] != 1:
                raise ValueError(f"an image of {it.grid[0]} temporal patches: video is not supported")
            positions.append(rope_index(it.input_ids, [it.grid], self.image_token_id, merge))
            a = it.input_ids.index(self.vision_start)
            images.append((a, it.input_ids.index(self.vision_end, a)))
        ids = torch.tensor([t for it in items for t in it.input_ids], dtype=torch.long)
        names = sorted({it.task for it in items})
        if len(names) == 1:
            task: str | TaskRows = names[0]
        else:
            seq_task = torch.tensor([names.index(it.task) for it in items])
            rows = torch.repeat_interleave(seq_task, torch.tensor(seqs.lengths))
            task = TaskRows(names, (rows[:, None] == torch.arange(len(names))).float())
        pictures = [it for it in items if it.grid is not None]
        return Batch(
            index=list(range(len(items))) if index is None else index,
            input_ids=ids,
            position_ids=torch.cat(positions, dim=1),
            seqs=seqs,
            images=images,
            task=task,
            image_rows=(ids == self.image_token_id).nonzero().flatten(),
            pixel_values=torch.cat([it.pixel_values for it in pictures]) if pictures else None,
            vision=VisionLayout([it.grid for it in pictures], self.window, merge) if pictures else None,
        )


def as_list(xs: Any, what: str) -> list:
    if isinstance(xs, (str, bytes, dict, Image.Image)) or not hasattr(xs, "__iter__"):
        raise TypeError(f"{what} must be a list, got {describe(xs)}")
    return list(xs)


class InputError(ValueError):
    """A bad input, named by its position and a short preview; `reason` is the rest of the message."""

    def __init__(self, where: str, value: Any, reason: str):
        super().__init__(f"{where} ({describe(value)}): {reason}")
        self.reason = reason


def checked_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{where} is {type(text).__name__}, not str: {describe(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(where, text, f"not valid Unicode: a lone surrogate at character {e.start}") from None
    return text


def cut_point(text: str, k: int) -> int:
    """The first index >= k that Unicode normalization cannot reach across (a character that neither decomposes
    nor combines with the one before it), or len(text) when none comes soon."""
    for i in range(k, min(len(text), k + 256)):
        c = text[i]
        if c < "\x80" or (
            unicodedata.category(c)[0] in "LNPSZ"
            and not unicodedata.decomposition(c)
            and not unicodedata.combining(c)
            and not "\u1160" <= c <= "\u11ff"  # Hangul vowels and final consonants join the syllable before
        ):
            return i
    return len(text)


def settled(encoding, limit: int, joined: set | None = None) -> int:
    """The leading tokens of a cut text that are the whole text's: those of the words (pre-tokens) that end by
    character `limit` (a word ends where the next one starts, and the reported start of a word's first token is
    never before its true start) and, in the word after them, those before a boundary that no merge can cross
    (`joined`: Processor.joined) and that starts by `limit`: BPE treats the two sides of it apart."""
    words, offsets, tokens = encoding.word_ids, encoding.offsets, encoding.tokens  # each read builds a new list
    kept = 0
    for j, (start, _) in enumerate(offsets):
        if start > limit:
            break
        if j == 0 or words[j] is None or words[j] != words[j - 1]:
            kept = j
        elif joined is not None and (tokens[j - 1][-1], tokens[j][0]) not in joined:
            kept = j
    return kept


def preview(s: str, width: int = 40) -> str:
    """s, cut to `width` characters with an ellipsis."""
    return s if len(s) <= width else s[: width - 3] + "..."


def describe(x: Any, width: int = 40) -> str:
    """A short preview of an input for messages."""
    return preview(repr(x) if not isinstance(x, Image.Image) else f"<PIL image {x.mode} {x.width}x{x.height}>", width)
