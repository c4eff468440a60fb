"""Inputs to token ids and pixels, as the released `JinaEmbeddingsV4Processor` builds them.

Text: `"{Query|Passage}: {text}"` through tokenizer.json (no BOS/EOS), truncated on the right.
Images: RGB -> smart_resize -> uint8 bicubic+antialias resize (bit-identical to the torchvision resize the
released fast processor runs on CPU) -> (x - 255·mean) / (255·std) in fp32 -> (N, C·t·p·p) patches, with the
fixed image prompt around t·h·w/4 `<|image_pad|>` tokens. Many items are then packed into one `Batch`.
"""

from __future__ import annotations

import io
import math
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer

from .config import ConfigError, JinaV4Config, PreprocessorConfig, TokenizerConfig
from .positions import cumulative, rope_index

PREFIXES = {"query": "Query", "passage": "Passage"}
IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
MAX_TEXT_TOKENS = 32768  # the reference caps max_length here
ImageInput = Union[Image.Image, str, os.PathLike, bytes]


def text_prompt(text: str, task: str, prompt_name: str) -> str:
    if prompt_name not in PREFIXES:
        raise ValueError(f"prompt_name={prompt_name!r} is not one of {list(PREFIXES)}")
    # text-matching is symmetric: both sides use the query prefix.
    return f"{PREFIXES['query' if task == 'text-matching' else prompt_name]}: {text}"


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Both sides to multiples of `factor` (Python's round), area within [min_pixels, max_pixels], aspect kept.
    Sides under `factor` are scaled up (as transformers >= 4.57; 4.52 raised instead)."""
    if min(height, width) < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > 200:
        aspect = max(height, width) / min(height, width)
        raise ValueError(f"image aspect ratio {aspect:.1f} is over 200 ({width}x{height})")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def load_image(image: ImageInput, timeout: float = 30.0) -> Image.Image:
    """A PIL image, a path, raw bytes or an http(s) URL -> an RGB PIL image (plain `convert("RGB")`)."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (bytes, bytearray)):
        img = Image.open(io.BytesIO(image))
    elif isinstance(image, str) and image.startswith(("http://", "https://")):
        with urllib.request.urlopen(image, timeout=timeout) as response:
            img = Image.open(io.BytesIO(response.read()))
    elif isinstance(image, (str, os.PathLike)):
        img = Image.open(Path(image))
    else:
        raise TypeError(f"expected a PIL image, a path, bytes or a URL, got {type(image).__name__}")
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def image_patches(img: Image.Image, cfg: PreprocessorConfig, max_pixels: int | None = None):
    """RGB image -> pixel_values (t·h·w, C·t·p·p) fp32 and grid (t, h, w) in patches."""
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    h, w = smart_resize(img.height, img.width, p * m, cfg.min_pixels, max_pixels or cfg.max_pixels)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    x = x.permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    # uint8 in, uint8 out: the CPU kernel rounds between its two passes, exactly as torchvision's resize.
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    x = (x.float() - mean[:, None, None]) / std[:, None, None]  # (3, h, w)
    gh, gw = h // p, w // p
    x = x[None].expand(tp, -1, -1, -1)  # a still image is repeated to temporal_patch_size frames
    x = x.reshape(1, tp, 3, gh // m, m, p, gw // m, m, p)  # (t, tp, c, bh, mh, ph, bw, mw, pw)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, bh, bw, mh, mw, c, tp, ph, pw)
    return x.reshape(gh * gw, 3 * tp * p * p), (1, gh, gw)


@dataclass
class Item:
    """One prepared input: token ids, and for an image its patches and grid."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None


@dataclass
class Batch:
    """Items packed without padding. T tokens, S sequences, N patches."""

    input_ids: torch.Tensor  # (T,)
    cu_seqlens: list[int]  # (S+1,) sequence starts in the packed tokens
    position_ids: torch.Tensor  # (3, T) M-RoPE positions
    pool_mask: torch.Tensor  # (T,) bool: the tokens each single vector averages
    image_mask: torch.Tensor  # (T,) bool: the tokens that receive image features
    pixel_values: torch.Tensor | None = None  # (N, C·t·p·p)
    grids: list[tuple[int, int, int]] = field(default_factory=list)


def token_batches(items: list[Item], max_tokens: int, batch_size: int | None = None) -> list[list[int]]:
    """Item indices, longest first, cut into batches of at most `max_tokens` tokens (an image also counts its
    patches) and, when given, `batch_size` items. Causal attention pads a batch to its longest sequence, so
    items x longest stays within `max_tokens` too: one long text never drags a crowd of short ones along."""
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    cost = [len(it.input_ids) + (0 if it.pixel_values is None else len(it.pixel_values)) for it in items]
    batches: list[list[int]] = []
    used = longest = 0
    for i in sorted(range(len(items)), key=lambda i: -cost[i]):
        n = len(items[i].input_ids)
        if (not batches or used + cost[i] > max_tokens or len(batches[-1]) == batch_size
                or (len(batches[-1]) + 1) * max(longest, n) > max_tokens):
            batches.append([])
            used = longest = 0
        batches[-1].append(i)
        used, longest = used + cost[i], max(longest, n)
    return batches


class Processor:
    def __init__(self, tokenizer: Tokenizer, config: JinaV4Config, image_cfg: PreprocessorConfig,
                 tokenizer_cfg: TokenizerConfig):
        self.tokenizer, self.config, self.image_cfg = tokenizer, config, image_cfg
        self.pad_token_id = self._token_id(tokenizer_cfg.pad_token, "tokenizer_config.json: key 'pad_token'")
        for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            token = {"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>",
                     "vision_end_token_id": "<|vision_end|>"}[key]
            if self._token_id(token, "tokenizer.json") != getattr(config, key):
                raise ConfigError(f"config.json: key '{key}' is {getattr(config, key)}, but tokenizer.json "
                                  f"maps {token} to {tokenizer.token_to_id(token)}")
        self.image_prompt = self.tokenize([IMAGE_PROMPT], MAX_TEXT_TOKENS)[0]

    @classmethod
    def from_dir(cls, path: Path, config: JinaV4Config) -> "Processor":
        from .config import read_json

        try:
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise ConfigError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
        return cls(tokenizer, config, PreprocessorConfig.from_dict(read_json(path / "preprocessor_config.json")),
                   TokenizerConfig.from_dict(read_json(path / "tokenizer_config.json")))

    def _token_id(self, token: str, where: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ConfigError(f"{where}: token {token!r} is not in the vocabulary")
        return i

    def tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        return [e.ids for e in self.encode(texts, max_length)]

    def encode(self, texts: list[str], max_length: int):
        """tokenizers Encodings (ids, character offsets), truncated on the right at min(max_length, 32768)."""
        if not (isinstance(max_length, int) and max_length > 0):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.tokenizer.enable_truncation(min(max_length, MAX_TEXT_TOKENS))
        return self.tokenizer.encode_batch(texts, add_special_tokens=True)

    def image_item(self, image: ImageInput, max_pixels: int | None = None) -> Item:
        pixels, grid = image_patches(load_image(image), self.image_cfg, max_pixels)
        pad, n = self.config.image_token_id, grid[0] * grid[1] * grid[2] // self.image_cfg.merge_size**2
        i = self.image_prompt.index(pad)
        ids = self.image_prompt[:i] + [pad] * n + self.image_prompt[i + 1:]
        return Item(ids, pixels, grid)

    def collate(self, items: list[Item]) -> Batch:
        cfg, merge = self.config, self.image_cfg.merge_size
        positions, pool, image = [], [], []
        for it in items:
            ids = torch.tensor(it.input_ids)
            if it.grid is None:  # text: 1-D positions, pool every token
                positions.append(torch.arange(len(ids)).expand(3, -1))
                pool.append(torch.ones(len(ids), dtype=torch.bool))
                image.append(torch.zeros(len(ids), dtype=torch.bool))
            else:  # image: 3-D positions, pool vision_start .. vision_end inclusive
                positions.append(rope_index(it.input_ids, [it.grid], cfg.image_token_id, merge))
                start = it.input_ids.index(cfg.vision_start_token_id)
                end = it.input_ids.index(cfg.vision_end_token_id, start)
                span = torch.arange(len(ids))
                pool.append((span >= start) & (span <= end))
                image.append(ids == cfg.image_token_id)
        pixels = [it.pixel_values for it in items if it.grid is not None]
        return Batch(
            input_ids=torch.tensor([t for it in items for t in it.input_ids]),
            cu_seqlens=cumulative([len(it.input_ids) for it in items]),
            position_ids=torch.cat(positions, dim=1),
            pool_mask=torch.cat(pool),
            image_mask=torch.cat(image),
            pixel_values=torch.cat(pixels) if pixels else None,
            grids=[it.grid for it in items if it.grid is not None],
        )

    def pad(self, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, L) input_ids and attention_mask, as the reference processor returns them."""
        L = max(len(it.input_ids) for it in items)
        ids = torch.full((len(items), L), self.pad_token_id)
        mask = torch.zeros(len(items), L, dtype=torch.long)
        for b, it in enumerate(items):
            ids[b, : len(it.input_ids)] = torch.tensor(it.input_ids)
            mask[b, : len(it.input_ids)] = 1
        return ids, mask


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


def describe(x: Any, width: int = 40) -> str:
    """A short preview of an input for error messages."""
    s = repr(x) if not isinstance(x, Image.Image) else f"<PIL image {x.mode} {x.width}x{x.height}>"
    return s if len(s) <= width else s[: width - 3] + "..."
