"""The two request formats of `POST /v1/embeddings` for `jina-v4 serve`, and their answers.

Jina's: `input` as strings or {"text"} / {"image"} objects, `task`, `dimensions`, `embedding_type`,
`return_multivector`, `late_chunking`, `truncate`, `normalized`. OpenAI's: `input` as a string, strings or token ids,
`encoding_format`, `dimensions`, `user`. A body is OpenAI's when it names `encoding_format` or sends token ids.
Every refusal is a `RequestError`: an HTTP status and a message naming the input index, with nothing of the
server's own in it (no path, no heap address, no traceback). Images are decoded here (a data URI, bare base64, or
an http(s) URL when allowed, fetched by url_fetch.py) and reach the model as PIL images, so a request never makes
the server read its own disk. What a request holds (decoded pixels, tokens) is reserved from the server's budget
as it is known, through `reserve`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ALIAS = "jina-embeddings-v4"  # the hosted model's name; accepted besides the served checkpoint's own


def http_tasks(tasks: dict) -> dict[str, tuple[str, str]]:
    """A checkpoint's tasks (config.Task) under their names in Jina's API -> (task, prompt name): a symmetric task
    by its name ("text-matching"), the others by name and side ("retrieval.query", "retrieval.passage")."""
    out = {}
    for name, task in tasks.items():
        if task.symmetric:
            out[name] = (name, "query")
        else:
            out.update({f"{name}.{side}": (name, side) for side in ("query", "passage")})
    return out


JINA_FIELDS = [
    "model",
    "input",
    "task",
    "dimensions",
    "embedding_type",
    "return_multivector",
    "late_chunking",
    "truncate",
    "normalized",
]
OPENAI_FIELDS = ["model", "input", "encoding_format", "dimensions", "user", "task"]
EMBEDDING_TYPES = ["float", "base64", "binary", "ubinary"]
ENCODING_FORMATS = ["float", "base64"]
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]  # never PIL's EPS (Ghostscript) or other plugins
MAGIC = (b"\x89PNG", b"\xff\xd8", b"RIFF", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")  # how those files begin
CHUNK_JOIN = " "  # late chunking: the document is the input texts joined by one space


class RequestError(Exception):
    def __init__(self, status: int, message: str, index: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.index, self.headers = status, index, headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "code": self.status, "index": self.index}}


SERVER_PATHS = sorted({sys.prefix, sys.base_prefix, str(Path.home()), str(Path.cwd())} - {"/"}, key=len)[::-1]


def scrub(message: str) -> str:
    """Text the server produced (a library's exception message) as a client may read it: heap addresses and the
    server's own directories taken out. Only such text: a client's own values are quoted as given (`preview`),
    never rewritten, so that a client cannot probe the server's paths by sending guesses."""
    message = re.sub(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", r"<\1>", message)
    message = re.sub(r"\b0x[0-9a-fA-F]{8,}\b", "0x...", message)
    for path in SERVER_PATHS:
        message = message.replace(path, "<server path>")
    return message


PREVIEW = 60  # characters of a client's value that an error message quotes


def preview(value: Any) -> str:
    """A client's value as an error message quotes it: its JSON, cut to PREVIEW characters with its length."""
    if isinstance(value, str) and len(value) > PREVIEW:
        return f'{json.dumps(value[:PREVIEW])[:-1]}..." ({len(value):,} characters)'
    text = json.dumps(value)
    return text if len(text) <= PREVIEW else f"{text[:PREVIEW]}... ({len(text):,} characters of JSON)"


@dataclass
class Limits:
    max_items: int = 2048  # inputs per request
    max_tokens: int = 131072  # tokens per request, all inputs together (an image counts its tokens)
    max_length: int = 32768  # tokens per input: cut there, or refused with truncate=false
    max_body_bytes: int = 32 * 2**20  # request body; also the cap on one downloaded image
    max_image_pixels: int = 40_000_000  # width x height, read from the header before decoding
    allow_urls: bool = False
    url_timeout: float = 10.0  # seconds for one image URL, all of it (DNS, connect, redirects, body)
    url_request_timeout: float = 30.0  # seconds for all the image URLs of one request
    allow_private_urls: bool = False  # fetch loopback, private, link-local, ... addresses too (url_fetch.refusal)
    max_redirects: int = 3
    body_timeout: float = 60.0  # seconds for a request's body to arrive
    max_answer_bytes: int = 128 * 2**20  # the answer's JSON, estimated from the tokens before the model runs


@dataclass
class Request:
    model: str
    inputs: list  # str | {"text": str} | {"image": str} | list[int] (token ids)
    task: str  # a key of http_tasks(model.tasks)
    dimensions: int | None
    types: list[str]  # encodings of each embedding
    keyed: bool  # types given as a list: `embedding` is an object keyed by type
    multivector: bool
    late_chunking: bool
    truncate: bool


STRUCTURE = (b"[", b"{", b",", b":")  # in JSON every value and key but the first follows one of these


def values_needed(limits: Limits) -> int:
    """The most JSON values and keys a request within the limits can hold: an input is at most 3 (an object, its
    key, its string), token ids at most --max-tokens in all, and 64 for the other fields."""
    return 3 * limits.max_items + limits.max_tokens + 64


def json_values(body: bytes, most: int) -> int:
    """A count of the values and keys that json.loads(body) creates: over `most` only when they are more than
    `most`, otherwise at least as many; found by a few passes of C over the bytes (no call holds the GIL for more
    than tens of ms on 32 MiB). Each value or key but the first follows `[`, `{`, `,` or `:`; counted in the
    whole body, strings included, that is an upper bound. Past `most`, the strings are taken out: escaped
    backslashes and escaped quotes are removed (left to right, as JSON reads escapes), the quotes left delimit
    the strings; more strings than `most` is an answer, else the characters between the strings are counted
    again, less the empty lists and objects written `[]` and `{}` (exact for JSON as json.dumps writes it). An
    invalid body: json.loads stops at its first error, and before it these steps read the bytes as it does."""
    quick = 1 + sum(body.count(c) for c in STRUCTURE)
    if quick <= most:
        return quick
    bare = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = bare.count(b'"') // 2
    if strings > most:
        return strings
    outside = b'""'.join(bare.split(b'"')[0::2])  # each string as ""
    return 1 + sum(outside.count(c) for c in STRUCTURE) - outside.count(b"[]") - outside.count(b"{}")


def read_json(body: bytes, limits: Limits) -> Any:
    """The body's JSON, refused before json.loads when it holds more values than a request within the limits can
    hold (json.loads holds the GIL throughout: 8 M empty lists took 10 s and more, with the cyclic GC running over
    them again and again, while the event loop waited)."""
    most = values_needed(limits)
    n = json_values(body, most)
    if n > most:
        raise RequestError(
            413,
            f"the body holds over {most:,} JSON values ({n:,} found before parsing), more than a request within "
            f"--max-items ({limits.max_items}) and --max-tokens ({limits.max_tokens}) can hold",
        )
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"the body is not valid JSON ({type(e).__name__}: {scrub(str(e))[:200]})") from None


def valid(value: Any, choices: list, what: str) -> Any:
    if type(value) not in {type(c) for c in choices} or value not in choices:  # True is not 1, 8.0 is not 8
        raise RequestError(400, f"{what}: {preview(value)} is not valid; valid values are {json.dumps(choices)}")
    return value


def parse(
    body: Any,
    names: list[str],
    dims: tuple[int, ...],
    default_task: str,
    limits: Limits,
    tasks: dict[str, tuple[str, str]],
) -> Request:
    """A decoded JSON body -> a checked Request (fields, values, item count); inputs are read later by `prepare`."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    x = body.get("input")
    if isinstance(x, list) and x and all(type(v) is int for v in x):
        x = [x]  # one token-id sequence
    inputs = [x] if isinstance(x, str) else x
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(
            400, 'input: give a string or a non-empty list of strings, {"text"} / {"image"} objects, or token-id lists'
        )
    tokens = [isinstance(v, list) for v in inputs]
    openai = "encoding_format" in body or any(tokens)
    fields = OPENAI_FIELDS if openai else JINA_FIELDS
    unknown = [k for k in body if k not in fields]
    if unknown:
        named = ", ".join(preview(k) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" * (len(unknown) > 5))
        raise RequestError(
            400,
            f"unknown field(s) {named} for the {'OpenAI' if openai else 'Jina'} format; valid fields are {fields}",
        )
    if len(inputs) > limits.max_items:
        raise RequestError(413, f"input holds {len(inputs)} items, over the limit of {limits.max_items} (--max-items)")
    if any(tokens) and not all(tokens):
        i = tokens.index(not tokens[0])
        raise RequestError(400, f"input[{i}]: token-id lists and other inputs cannot share a request", i)
    for i, v in enumerate(inputs):
        if isinstance(v, dict) and not openai:
            if len(v) != 1 or next(iter(v)) not in ("text", "image") or not isinstance(next(iter(v.values())), str):
                raise RequestError(
                    400,
                    f'input[{i}]: an object must be {{"text": string}} or {{"image": string}}, got {preview(v)}',
                    i,
                )
        elif not isinstance(v, (str, list)):
            kinds = "strings or token-id lists" if openai else 'strings or {"text"} / {"image"} objects'
            raise RequestError(400, f"input[{i}] is {type(v).__name__}; input takes {kinds}", i)
        if v == "" or v == {"text": ""}:  # the prompt alone would be embedded; OpenAI's API refuses these too
            raise RequestError(400, f"input[{i}] is an empty text; send at least one character", i)
    model = valid(body.get("model", names[0]), names, "model")
    task = valid(body.get("task", default_task), list(tasks), "task")
    dimensions = body.get("dimensions")
    if dimensions is not None:
        valid(dimensions, list(dims), "dimensions")
    flags = [
        valid(body.get(k, k == "truncate"), [True, False], k)
        for k in ("return_multivector", "late_chunking", "truncate")
    ]
    valid(body.get("normalized", True), [True], "normalized")  # embeddings are always unit length
    if openai:
        types, keyed = [valid(body.get("encoding_format", "float"), ENCODING_FORMATS, "encoding_format")], False
    else:
        t = body.get("embedding_type", "float")
        keyed = isinstance(t, list)
        types = list(dict.fromkeys(valid(k, EMBEDDING_TYPES, "embedding_type") for k in (t if keyed else [t])))
        if not types:
            raise RequestError(400, f"embedding_type: an empty list; valid values are {json.dumps(EMBEDDING_TYPES)}")
    request = Request(model, inputs, task, dimensions, types, keyed, *flags)
    if request.multivector and dimensions is not None:
        raise RequestError(400, "dimensions applies to single vectors; multi-vectors are always 128-d per token")
    if request.late_chunking:
        if request.multivector:
            raise RequestError(400, "late_chunking gives single vectors: drop return_multivector")
        for i, v in enumerate(inputs):
            if not (isinstance(v, str) or (isinstance(v, dict) and "text" in v)):
                raise RequestError(400, f"input[{i}]: late_chunking takes texts only (chunks of one document)", i)
    return request


def has_urls(request: Request) -> bool:
    return any(
        isinstance(v, dict) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", v.get("image", "")) for v in request.inputs
    )


def no_budget(**costs: int) -> None:
    pass


def prepare(
    request: Request,
    model,
    limits: Limits,
    tasks: dict[str, tuple[str, str]],
    fetch: Callable[[str], bytes] | None = None,
    reserve: Callable[..., None] = no_budget,
) -> tuple[Any, int]:
    """Request -> (work, tokens): a list of `Item`s for the model worker, or for late chunking (item, chunk
    groups) for one `ChunkPooling` head. Runs outside the event loop. fetch(url) -> bytes reads image URLs
    (url_fetch.Fetcher, None: refused); reserve(pixels=, tokens=) takes what the request holds from the server's
    budget, or raises the 503 (or 413) to answer."""
    from ..model.processing import Item

    task, prompt = tasks[request.task]
    n, x = limits.max_length, request.inputs
    if request.late_chunking:
        texts = [v if isinstance(v, str) else v["text"] for v in x]
        work, tokens = chunk_work(texts, task, prompt, request.truncate, model, limits)
        reserve(tokens=tokens)
        return work, tokens
    if isinstance(x[0], list):  # token ids are embedded as given: no prompt prefix, no tokenizer
        vocab, pad = model.config.text_config.vocab_size, model.config.image_token_id
        for i, ids in enumerate(x):
            if not ids:
                raise RequestError(400, f"input[{i}]: an empty token-id list", i)
            bad = [t for t in ids if type(t) is not int or not 0 <= t < vocab or t == pad]
            if bad:
                why = f"{preview(bad[0])} is not a token id in [0, {vocab}), or is the image placeholder"
                raise RequestError(400, f"input[{i}]: {why}", i)
        items = [Item(list(ids[:n]), task, dropped=max(0, len(ids) - n)) for ids in x]
    else:
        values = [
            {"image": decode_image(v["image"], i, limits, fetch, reserve)}
            if isinstance(v, dict) and "image" in v
            else {"text": v if isinstance(v, str) else v["text"]}
            for i, v in enumerate(x)
        ]
        items = model.prepare(values, task, prompt, n, errors="return", name="input")
    for i, item in enumerate(items):
        if isinstance(item, Exception):
            raise RequestError(400, str(item), i)
        if item.dropped and not request.truncate:
            count = f"over {n + item.dropped}" if item.cut else str(len(item.input_ids) + item.dropped)
            raise RequestError(400, f"input[{i}]: {count} tokens, over max_length={n} (truncate is false)", i)
    tokens = check_tokens(sum(len(it.input_ids) for it in items), limits)
    patch = model.processor.image_cfg.patch_size
    reserve(tokens=tokens, pixels=sum(len(it.pixel_values) for it in items if it.pixel_values is not None) * patch**2)
    return items, tokens


def chunk_work(texts: list[str], task: str, prompt: str, truncate: bool, model, limits: Limits) -> tuple[tuple, int]:
    """Late chunking: the texts joined by CHUNK_JOIN are one document, each text a chunk whose span is where it
    stands in the document. Every chunk must keep a token (by `encode_chunks`' rule: a token's first
    non-whitespace character places it)."""
    from ..model.processing import checked_text
    from .chunking import EmptyChunk, check_chunks, chunk_item

    spans, start, n = [], 0, limits.max_length
    for i, t in enumerate(texts):
        try:
            if not checked_text(t, f"input[{i}]"):
                raise ValueError(f"input[{i}]: an empty chunk")
        except ValueError as e:
            raise RequestError(400, str(e), i) from None
        spans.append((start, start + len(t)))
        start += len(t) + len(CHUNK_JOIN)
    item, _, groups = chunk_item(model, CHUNK_JOIN.join(texts), spans, task, prompt, n)
    if item.dropped and not truncate:
        count = f"over {n + item.dropped}" if item.cut else str(len(item.input_ids) + item.dropped)
        raise RequestError(400, f"the joined document is {count} tokens, over max_length={n} (truncate is false)")
    try:
        check_chunks(spans, groups, n)
    except EmptyChunk as e:
        raise RequestError(
            400, f"input[{e.chunk}]: no token of its own (whitespace, or cut at max_length={n})", e.chunk
        ) from None
    return (item, groups), check_tokens(len(item.input_ids), limits)


def check_tokens(tokens: int, limits: Limits) -> int:
    if tokens > limits.max_tokens:
        raise RequestError(
            413, f"the request holds {tokens} tokens, over the limit of {limits.max_tokens} (--max-tokens)"
        )
    return tokens


def decode_image(
    value: str, i: int, limits: Limits, fetch: Callable[[str], bytes] | None, reserve: Callable[..., None]
) -> Image.Image:
    """An http(s) URL (with --allow-urls), a data URI or bare base64 -> an RGB PIL image; anything else is refused,
    a file path above all: a request never reads the server's disk."""
    from .url_fetch import FetchError

    where = f"input[{i}]"
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if scheme:
        if scheme[1].lower() not in ("http", "https"):
            raise RequestError(
                400,
                f"{where}: {scheme[1][:20]}{'...' * (len(scheme[1]) > 20)}:// URLs are refused; send an http(s) URL, "
                "a data URI or base64",
                i,
            )
        if fetch is None:
            raise RequestError(
                400,
                f"{where}: image URLs are refused (the server runs without --allow-urls); send "
                "the image as a data URI or base64",
                i,
            )
        try:
            data = fetch(value)
        except FetchError as e:
            raise RequestError(e.status, f"{where}: the image URL {e}", i) from None
        return open_image(data, where, i, limits, reserve)
    if value.startswith("data:") and ";base64," not in value:
        raise RequestError(400, f"{where}: a data URI must read data:<type>;base64,<data>", i)
    payload = re.sub(r"\s+", "", value.partition(",")[2] if value.startswith("data:") else value)
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        data = None
    if data is not None and data.startswith(MAGIC):
        return open_image(data, where, i, limits, reserve)
    # a path: not base64 and path-like, or base64 by accident ("/etc/passwd") but short and rooted like a path
    rooted = re.match(r"(/|~|\.{1,2}[/\\]|[A-Za-z]:[/\\])", value) and len(value) < 4096
    if (data is None and re.search(r"[/\\]|^~|\.[A-Za-z0-9]{2,5}$", value)) or (data is not None and rooted):
        raise RequestError(
            400,
            f"{where}: {value[:60]!r} reads as a file path, and a request never reads the "
            "server's disk; send the image as base64 or a data URI",
            i,
        )
    if data is None:
        raise RequestError(400, f"{where}: the image is neither an http(s) URL, a data URI nor base64", i)
    raise RequestError(400, f"{where}: the base64 decodes to none of the image formats read here ({FORMATS})", i)


FORMATS = "PNG, JPEG, WebP, GIF, BMP, TIFF"


def open_image(data: bytes, where: str, i: int, limits: Limits, reserve: Callable[..., None]) -> Image.Image:
    """Bytes -> an RGB image, its pixels reserved from the budget (from the header, before decoding one)."""
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only (and PIL's bomb guard)
        if img.width * img.height > limits.max_image_pixels:
            raise RequestError(
                400,
                f"{where}: the image is {img.width}x{img.height} = {img.width * img.height:,} "
                f"pixels, over the limit of {limits.max_image_pixels:,} (--max-image-pixels)",
                i,
            )
        reserve(pixels=img.width * img.height)
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except RequestError:
        raise
    except Image.UnidentifiedImageError:
        raise RequestError(400, f"{where}: not a decodable image (none of {FORMATS})", i) from None
    except Exception as e:  # DecompressionBombError, truncated data, ...: their messages hold sizes, not paths
        raise RequestError(400, f"{where}: not a decodable image ({type(e).__name__}: {scrub(str(e))})", i) from None


def encode(v: np.ndarray, kind: str) -> Any:
    """One embedding (D,) or multi-vector (L, D) float32 in one encoding; multi-vectors row by row."""
    if kind == "float":
        return v.tolist()
    if kind == "base64":  # little-endian float32 bytes
        rows = [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in v.reshape(-1, v.shape[-1])]
        return rows[0] if v.ndim == 1 else rows
    bits = np.packbits(v > 0, axis=-1)  # sign bits, the first dimension in the high bit of byte 0
    return (bits if kind == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)).tolist()


FLOAT_CHARS = 25  # the longest JSON of a float32 as a float, with its separator: "-1.2345678901234567e-05, "
PIECE = 16384  # numbers json-encoded in one call by answer_pieces (a few ms of the GIL)


def answer_bytes(request: Request, rows: list[int], dim: int) -> int:
    """An upper bound on the answer's JSON bytes when input i gets rows[i] vectors of `dim` values."""
    row = 0
    for kind in request.types:
        if kind == "float":
            row += FLOAT_CHARS * dim + 4
        elif kind == "base64":
            row += 4 * -(-4 * dim // 3) + 4
        else:
            row += 6 * -(-dim // 8) + 4  # "-128, " at most per byte
    return 256 + len(preview(request.model)) + sum(96 + 16 * len(request.types) + row * n for n in rows)


def check_answer(request: Request, rows: list[int], dim: int, limits: Limits) -> None:
    """Refuses (413) an answer that would be larger than --max-answer-bytes, before the model runs."""
    size = answer_bytes(request, rows, dim)
    if size > limits.max_answer_bytes:
        what = f"{sum(rows):,} {'token vectors' if request.multivector else 'vectors'} of {dim} values"
        raise RequestError(
            413,
            f"the answer would be up to {size:,} bytes ({what}, as {'+'.join(request.types)}), over the limit of "
            f"{limits.max_answer_bytes:,} (--max-answer-bytes); send fewer inputs or tokens"
            + (", or ask for base64" if "float" in request.types else ""),
        )


def answer_pieces(request: Request, vectors: list[np.ndarray], tokens: int, numbers: int = PIECE):
    """The JSON of `answer` as bytes, piece by piece: each piece json-encodes at most `numbers` numbers, so that
    no call holds the GIL for long (one json.dumps of a 344 MB answer held it for 40 s)."""
    key = "embeddings" if request.multivector else "embedding"
    head = {"model": request.model, "object": "list", "usage": {"total_tokens": tokens, "prompt_tokens": tokens}}
    yield json.dumps(head)[:-1].encode() + b', "data": ['
    for i, v in enumerate(vectors):
        yield f'{", " if i else ""}{{"object": "embedding", "index": {i}, "{key}": '.encode()
        for j, kind in enumerate(request.types):
            if request.keyed:
                yield f"{'{' if j == 0 else ', '}{json.dumps(kind)}: ".encode()
            if v.ndim == 1:
                yield json.dumps(encode(v, kind)).encode()
                continue
            step = max(1, numbers // max(1, v.shape[-1]))
            yield b"["
            for start in range(0, len(v), step):
                rows = json.dumps(encode(v[start : start + step], kind))[1:-1]
                yield (", " + rows if start else rows).encode()
            yield b"]"
        yield b"}}" if request.keyed else b"}"
    yield b"]}"


def answer(request: Request, vectors: list[np.ndarray], tokens: int) -> dict:
    key = "embeddings" if request.multivector else "embedding"
    data = []
    for i, v in enumerate(vectors):
        e = {kind: encode(v, kind) for kind in request.types}
        data.append({"object": "embedding", "index": i, key: e if request.keyed else e[request.types[0]]})
    return {
        "model": request.model,
        "object": "list",
        "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
        "data": data,
    }
