"""`jina-v4 serve`: the embeddings HTTP API on starlette + uvicorn.

`POST /v1/embeddings` (Jina's and OpenAI's request formats, http_formats.py), `GET /health`, `GET /v1/models`.
Dynamic batching: one worker thread owns the model (it is not re-entrant); the requests waiting for it are packed
into shared `encode_items` calls (same `return_multivector` and `dimensions`; tasks may differ, each item carries
its own) under a token budget, and the results are split back per request. starlette and uvicorn are imported
only when the server starts, so the rest of the CLI runs without the `serve` extra.

Every cost a request can cause is bounded (NOTES.md, "Serving"): headers and body arrive within their timeouts
and the body within --max-body-bytes; JSON parsing, tokenizing, image decoding and answer encoding run off the
event loop, in three lanes of threads (small bodies, large bodies, requests with image URLs) so that one kind never
waits behind another, and in calls short enough that none holds the GIL for long (a body's JSON values are counted
before it is parsed, an answer is encoded piece by piece and streamed past 1 MiB, and bounded by
--max-answer-bytes before the model runs); image URLs are fetched under url_fetch.py's address policy and
deadlines; the tokens and pixels a request holds, from decoding to its answer, come out of one budget (a 503 with
Retry-After beyond it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.heads import head_for
from ..pipeline import encode
from .common import DEFAULT_MODEL, loaded_model
from .http_formats import (
    ALIAS,
    Limits,
    RequestError,
    answer_pieces,
    check_answer,
    has_urls,
    http_tasks,
    parse,
    prepare,
    preview,
    read_json,
)
from .url_fetch import Fetcher

log = logging.getLogger("jina_v4.serve")
SHUTTING_DOWN = "the server is shutting down; send the request again to a running one"
LARGE_BODY = 2**20  # bodies above this parse and prepare in the "large" lane
STREAM = 2**20  # an answer is sent in pieces of about this many bytes, each encoded in one thread call
RETRY_AFTER = 1  # seconds, in the Retry-After of a 503 for a full budget or queue


@dataclass
class Job:
    work: Any  # a list of Items, or (item, chunk groups) for late chunking
    key: tuple  # (multivector, dimensions): only jobs with equal keys share an encode call
    cost: int  # tokens + image patches
    future: Future = field(default_factory=Future)


class Worker:
    """The one thread that calls the model. It takes the oldest waiting job, adds the later waiting jobs of the
    same key while the total cost stays within `max_tokens` and the count within `max_requests`, runs one
    `pipeline.encode` over all their items and hands each job its own slice. A late-chunking job runs alone.
    A job's future is marked running when taken: a request cancelled before that is dropped, one cancelled after
    still gets its result set (never an InvalidStateError that would end the thread)."""

    def __init__(
        self,
        model,
        deterministic: bool = False,
        max_requests: int = 64,
        max_tokens: int | None = None,
        max_queued: int = 1024,
    ):
        self.model, self.deterministic, self.max_requests = model, deterministic, max_requests
        self.dims = model.config.matryoshka_dims
        self.max_tokens, self.max_queued = max_tokens or model.max_batch_tokens, max_queued
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closed = self.draining = False
        self.calls = self.requests = 0  # model calls made, requests answered
        self.thread = threading.Thread(target=self.loop, name="jina-v4-model", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        with self.cond:
            if self.closed or self.draining:
                raise RequestError(503, SHUTTING_DOWN)
            if len(self.pending) >= self.max_queued:
                raise RequestError(
                    503,
                    f"{len(self.pending)} requests are waiting already (--max-queued); retry later",
                    headers={"Retry-After": str(RETRY_AFTER)},
                )
            self.pending.append(job)
            self.cond.notify()
        return job.future

    def take(self) -> list[Job]:
        with self.cond:
            while True:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if not self.pending:
                    return []
                first = self.pending.popleft()
                if first.future.set_running_or_notify_cancel():  # False: its request is gone
                    break
            group, used = [first], first.cost
            for job in list(self.pending) if isinstance(first.work, list) else []:
                if len(group) == self.max_requests:
                    break
                if isinstance(job.work, list) and job.key == first.key and used + job.cost <= self.max_tokens:
                    self.pending.remove(job)
                    if job.future.set_running_or_notify_cancel():
                        group.append(job)
                        used += job.cost
            return group

    def loop(self) -> None:
        while group := self.take():
            self.run(group)

    def run(self, group: list[Job]) -> None:
        try:
            results = self.encode(group)
        except Exception as e:
            if len(group) > 1:  # one job's failure never fails its batch-mates
                for job in group:
                    self.run([job])
            else:
                group[0].future.set_exception(e)
            return
        self.requests += len(group)
        for job, result in zip(group, results):
            job.future.set_result(result)

    def encode(self, group: list[Job]) -> list[list]:
        from .chunking import ChunkPooling

        self.calls += 1
        multivector, dimensions = group[0].key
        if isinstance(group[0].work, list):
            items, head = [it for job in group for it in job.work], head_for(multivector, dimensions, self.dims)
        else:
            items, head = [group[0].work[0]], ChunkPooling(group[0].work[1], dimensions)
        with torch.inference_mode():
            out = encode(self.model, items, head, deterministic=self.deterministic)
        vecs = [v.cpu().numpy() for v in (out if isinstance(group[0].work, list) else out[0])]
        results, start = [], 0
        for job in group:
            n = len(job.work) if isinstance(job.work, list) else len(vecs)
            results.append(vecs[start : start + n])
            start += n
        return results

    def drain(self) -> None:
        """Shutting down: new jobs are refused; the queued ones still run."""
        with self.cond:
            self.draining = True

    def abort(self) -> None:
        """Answer every queued job that has not started with a 503 (the graceful time is running out)."""
        with self.cond:
            jobs, self.pending = list(self.pending), deque()
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RequestError(503, SHUTTING_DOWN))

    def close(self) -> None:
        """Answer what is queued, then stop."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join()


class Budget:
    """The tokens and decoded pixels that the requests being prepared, queued, encoded and answered hold. A
    request takes its share as it becomes known and gives it back when it is answered: beyond the budget it is
    refused with a 503 and Retry-After (a 413 when it alone could never fit)."""

    FLAGS = {"tokens": "--max-pending-tokens", "pixels": "--max-pending-pixels"}

    def __init__(self, tokens: int, pixels: int):
        self.limit, self.used, self.lock = {"tokens": tokens, "pixels": pixels}, Counter(), threading.Lock()

    def take(self, held: Counter, **costs: int) -> None:
        with self.lock:
            for kind, n in costs.items():
                if held[kind] + n > self.limit[kind]:
                    raise RequestError(
                        413,
                        f"the request holds {held[kind] + n:,} {kind}, over the server's budget of "
                        f"{self.limit[kind]:,} for all requests together ({self.FLAGS[kind]})",
                    )
                if self.used[kind] + n > self.limit[kind]:
                    raise RequestError(
                        503,
                        f"the server holds {self.used[kind]:,} {kind} of other requests, and this one's "
                        f"{held[kind] + n:,} would pass its budget of {self.limit[kind]:,} ({self.FLAGS[kind]}); "
                        f"retry in {RETRY_AFTER} s",
                        headers={"Retry-After": str(RETRY_AFTER)},
                    )
            for kind, n in costs.items():
                self.used[kind] += n
                held[kind] += n

    def give(self, held: Counter) -> None:
        with self.lock:
            self.used.subtract(held)
        held.clear()


def gather(pieces, size: int = STREAM) -> bytes:
    """The next pieces of an answer, joined up to about `size` bytes; b"" once none is left."""
    out, n = [], 0
    for piece in pieces:
        out.append(piece)
        n += len(piece)
        if n >= size:
            break
    return b"".join(out)


def without_query(path: str) -> str:
    """A request's path as the access log shows it: a query string may hold a secret (?api_key=...)."""
    return path.partition("?")[0] + ("?<query not logged>" if "?" in path else "")


class AccessLog(logging.LoggerAdapter):
    """uvicorn's access log, the query string of each request taken out of its line."""

    def info(self, msg, *args, **kwargs) -> None:
        if len(args) == 5 and isinstance(args[2], str):  # (client, method, path with query, HTTP version, status)
            args = (*args[:2], without_query(args[2]), *args[3:])
        self.logger.info(msg, *args, **kwargs)


def public_name(model: str) -> str:
    """The name the server answers to besides ALIAS: a hub id as given, a local checkpoint by its directory's name
    (the server's own paths never reach a client)."""
    path = Path(model).expanduser()
    return path.name if path.is_dir() or model.startswith((".", "/", "~")) else model


def create_app(
    model,
    name: str,
    limits: Limits | None = None,
    api_key: str | None = None,
    task: str = "text-matching",
    deterministic: bool = False,
    max_batch_requests: int = 64,
    max_batch_tokens: int | None = None,
    max_queued: int = 1024,
    prepare_threads: int = 4,
    max_pending_tokens: int = 1_048_576,
    max_pending_pixels: int = 200_000_000,
):
    """The ASGI app serving `model` under `name` (its public form: public_name) and "jina-embeddings-v4"; its
    worker starts now and stops when the app's lifespan ends, after the requests in flight are answered.
    app.state.drain(graceful_timeout) starts a shutdown (make_server's server calls it)."""
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    class Streamed(StreamingResponse):
        """A streamed JSON answer that calls `done` once sent, or once its client is gone."""

        def __init__(self, content, done):
            super().__init__(content, media_type="application/json")
            self.done = done

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.done()

    limits = limits or Limits()
    names = list(dict.fromkeys([ALIAS, public_name(name)]))
    # Deterministic: requests are packed as usual, and each answer is the offline API's on the same inputs
    # bit for bit, whatever shared its model call (execution.py).
    worker = Worker(model, deterministic, max_batch_requests, max_batch_tokens, max_queued)
    budget = Budget(max_pending_tokens, max_pending_pixels)
    fetcher = Fetcher(limits.max_body_bytes, limits.url_timeout, limits.allow_private_urls, limits.max_redirects)
    # Threads that parse, prepare and answer: each lane bounds its own memory, and small requests never wait
    # behind large bodies or slow image URLs.
    lanes = {
        "small": anyio.CapacityLimiter(prepare_threads),
        "large": anyio.CapacityLimiter(max(1, prepare_threads // 2)),
        "urls": anyio.CapacityLimiter(prepare_threads),
    }
    state = {"received": 0, "in_flight": 0, "draining": False}
    tasks = http_tasks(model.tasks)
    if task not in tasks:
        raise ValueError(f"task={task!r}: the checkpoint's tasks are {list(tasks)}")
    for kind, least in (("tokens", limits.max_tokens), ("pixels", limits.max_image_pixels)):
        if budget.limit[kind] < least:
            raise ValueError(f"{Budget.FLAGS[kind]} {budget.limit[kind]:,} is below one request's {least:,}")
    key = api_key.encode() if api_key else None
    dims = {True: model.config.multi_vector_projector_dim, False: model.config.text_config.hidden_size}

    def refuse(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    def check_key(request) -> None:
        """The key of 'Authorization: Bearer <key>', the scheme in any case (RFC 7235), compared in constant time."""
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if not (hmac.compare_digest(given.lstrip(" ").encode(), key) and scheme.lower() == "bearer"):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    def check_type(request) -> None:
        given = request.headers.get("content-type")
        media = (given or "application/json").split(";")[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise RequestError(415, f"Content-Type {given[:60]!r}: send the body as JSON (application/json)")
        coding = request.headers.get("content-encoding", "identity")
        if coding.strip().lower() not in ("identity", ""):
            raise RequestError(
                415, f"Content-Encoding {coding[:60]!r}: the server reads bodies as sent; send it uncompressed"
            )

    async def read_body(request) -> bytes:
        """The body, kept up to the limit, within --body-timeout. A body over the limit is read to its end (up to
        8x the limit) and dropped, so that the client, still sending, gets the 413 instead of a reset."""
        declared, cap = request.headers.get("content-length", ""), limits.max_body_bytes
        body, size = bytearray(), int(declared) if declared.isdigit() else 0
        try:
            with anyio.fail_after(limits.body_timeout):
                if size <= 8 * cap:
                    size = 0
                    async for chunk in request.stream():
                        size += len(chunk)
                        body += chunk if size <= cap else b""
                        if size > 8 * cap:
                            break
        except TimeoutError:
            raise RequestError(
                408, f"the body took over {limits.body_timeout:g} s to arrive (--body-timeout)"
            ) from None
        if size > cap:
            raise RequestError(413, f"the body is {size} bytes, over the limit of {cap} (--max-body-bytes)")
        return bytes(body)

    def read_request(body: bytes):  # in a thread: a large body takes a fraction of a second to parse
        return parse(read_json(body, limits), names, model.config.matryoshka_dims, task, limits, tasks)

    async def embeddings(request):
        state["received"] += 1
        state["in_flight"] += 1
        held = Counter()
        try:
            check_key(request)
            check_type(request)
            body = await read_body(request)
            lane = lanes["large" if len(body) > LARGE_BODY else "small"]
            req = await anyio.to_thread.run_sync(read_request, body, limiter=lane)
            del body
            deadline = time.monotonic() + limits.url_request_timeout  # all the request's URLs together
            fetch = (lambda url: fetcher.fetch(url, deadline)) if limits.allow_urls else None
            lane = lanes["urls"] if fetch and has_urls(req) else lane

            def reserve(**costs: int) -> None:
                budget.take(held, **costs)

            work, tokens = await anyio.to_thread.run_sync(
                prepare, req, model, limits, tasks, fetch, reserve, limiter=lane
            )
            rows = [len(it.input_ids) if req.multivector else 1 for it in work] if isinstance(work, list) else None
            check_answer(req, rows or [1] * len(req.inputs), req.dimensions or dims[req.multivector], limits)
            cost = sum(it.cost for it in work) if isinstance(work, list) else tokens
            vectors = await asyncio.wrap_future(worker.submit(Job(work, (req.multivector, req.dimensions), cost)))
            del work
            return await respond(answer_pieces(req, vectors, tokens), lane, held)
        except RequestError as e:
            return refuse(e)
        except asyncio.CancelledError:
            if not state["draining"]:
                raise
            return refuse(RequestError(503, SHUTTING_DOWN))  # the graceful time ran out: JSON, not uvicorn's 500
        except Exception:  # a bug or a model failure: logged with its traceback, the client told no more
            log.exception("request failed")
            return refuse(RequestError(500, "internal error; the server's log has the details"))
        finally:
            budget.give(held)
            state["in_flight"] -= 1

    async def respond(pieces, lane, held: Counter):
        """The answer, encoded STREAM bytes at a time in the request's lane: one of fewer bytes is sent whole, a longer
        one streamed, each STREAM bytes encoded in their own thread call, its budget held until it is sent."""
        first = await anyio.to_thread.run_sync(gather, pieces, limiter=lane)
        if len(first) < STREAM:
            return Response(first, media_type="application/json")
        kept = Counter(held)
        held.clear()  # the stream gives the budget back

        async def rest():
            yield first
            while chunk := await anyio.to_thread.run_sync(gather, pieces, limiter=lane):
                yield chunk

        return Streamed(rest(), lambda: budget.give(kept))

    async def health(request):
        return JSONResponse(
            {
                "status": "draining" if state["draining"] else "ok",
                "model": names[-1],
                **{k: state[k] for k in ("received", "in_flight")},
                "queued": len(worker.pending),
                "model_calls": worker.calls,
                "requests": worker.requests,
                "pending_tokens": budget.used["tokens"],
                "pending_pixels": budget.used["pixels"],
            }
        )

    async def models(request):
        try:
            check_key(request)
        except RequestError as e:
            return refuse(e)
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": n, "object": "model", "created": 0, "owned_by": "jina_v4"} for n in names],
            }
        )

    async def http_error(request, e: HTTPException):  # 404, 405 as JSON too
        return refuse(RequestError(e.status_code, f"{request.method[:20]} {preview(request.url.path)}: {e.detail}"))

    def drain(graceful_timeout: float | None) -> None:
        """The server stops accepting: new requests get a 503, URL fetches end, the queue runs on; queued jobs
        not started a second before the graceful time ends get a JSON 503 (uvicorn then cancels the rest)."""
        state["draining"] = True
        worker.drain()
        fetcher.close()
        if graceful_timeout is not None:
            timer = threading.Timer(graceful_timeout - min(1.0, graceful_timeout / 2), worker.abort)
            timer.daemon = True
            timer.start()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await anyio.to_thread.run_sync(worker.close)

    app = Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/embeddings", embeddings, methods=["POST"]),
            Route("/health", health),
            Route("/v1/models", models),
            Route("/models", models),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.worker, app.state.budget, app.state.fetcher, app.state.drain = worker, budget, fetcher, drain
    return app


def make_server(
    app,
    graceful_timeout: float | None = 30.0,
    header_timeout: float = 10.0,
    keep_alive_timeout: float = 5.0,
    log_level: str = "info",
):
    """A uvicorn server for `app`: a request's headers must arrive within header_timeout (uvicorn has no such
    limit: a client could hold a connection forever sending a byte at a time), an idle kept-alive connection
    closes after keep_alive_timeout, and a shutdown first calls app.state.drain."""
    import h11
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        headers_timer = None  # from a connection's start, or the next request's first byte, to its headers' end

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.access_logger = AccessLog(self.access_logger, {})

        def send_400_response(self, msg: str) -> None:
            """A request h11 cannot read (a malformed request line or header, a bad Content-Length): the JSON
            error of every other refusal instead of uvicorn's plain text, then the connection closes."""
            error = RequestError(400, "the request is not valid HTTP/1.1 (its request line, a header or its framing)")
            body = json.dumps(error.body()).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body)):
                self.transport.write(self.conn.send(event))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            if self.headers_timer is None and (before is None or before.response_complete):
                self.arm()
            super().data_received(data)
            if self.cycle is not before:  # a request's headers are in
                self.disarm()

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

        def arm(self) -> None:
            self.headers_timer = self.loop.call_later(header_timeout, self.headers_too_slow)

        def disarm(self) -> None:
            if self.headers_timer is not None:
                self.headers_timer.cancel()
                self.headers_timer = None

        def headers_too_slow(self) -> None:
            self.headers_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.state.drain(graceful_timeout)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        log_level=log_level,
        http=Protocol,
        timeout_keep_alive=keep_alive_timeout,
        timeout_graceful_shutdown=graceful_timeout,
    )
    return Server(config)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def add_parser(sub, tasks: dict | None = None) -> None:
    """The `serve` subcommand's options (called from cli.parser, with the checkpoint's tasks for the help)."""
    d = Limits()
    names = ", ".join(http_tasks(tasks)) if tasks else "retrieval.query, retrieval.passage, text-matching, ..."
    p = sub.add_parser(
        "serve",
        help="serve POST /v1/embeddings (Jina and OpenAI formats) with dynamic batching (the [serve] extra)",
        description="Serve POST /v1/embeddings (Jina and OpenAI formats) with dynamic batching. Needs the serve "
        "extra (starlette, uvicorn): pip install 'jina_v4[serve]', or pip install -e '.[serve]' in a clone.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub repo id or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this host only)")
    p.add_argument("--port", type=int, default=8080, help="default 8080; 0 picks a free port")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument(
        "--dtype", help="bfloat16, float16 or float32 (default: the checkpoint's; float32 on a CPU without native bf16)"
    )
    p.add_argument("--quiet", action="store_true", help="no line on stderr about the dtype chosen")
    p.add_argument(
        "--task",
        default="text-matching",
        help=f"the task of requests that name none, as requests name them: {names} (default text-matching)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("JINA_V4_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $JINA_V4_API_KEY, which unlike this option other "
        "users cannot read in ps; else no key)",
    )
    p.add_argument("--allow-urls", action="store_true", help="fetch http(s) image URLs (refused by default)")
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="with --allow-urls, also fetch loopback, private, link-local and other non-public addresses",
    )
    p.add_argument("--url-timeout", type=seconds, default=d.url_timeout, help="seconds per image URL, all of it")
    p.add_argument(
        "--url-request-timeout",
        type=seconds,
        default=d.url_request_timeout,
        help=f"seconds for all the image URLs of one request (default {d.url_request_timeout:g})",
    )
    p.add_argument("--max-redirects", type=count, default=d.max_redirects, help="per image URL (default 3)")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="answers equal the offline API's bit for bit, whatever shares their batch",
    )
    for flag, help_ in (
        ("max_items", "inputs per request"),
        ("max_tokens", "tokens per request"),
        ("max_length", "tokens per input (cut, or refused with truncate=false)"),
        ("max_body_bytes", "request body bytes (also the cap on one downloaded image)"),
        ("max_image_pixels", "decoded image width x height"),
        ("max_answer_bytes", "answer JSON bytes, estimated before the model runs (413 beyond)"),
    ):
        p.add_argument(
            "--" + flag.replace("_", "-"),
            type=positive,
            default=getattr(d, flag),
            help=f"{help_} (default {getattr(d, flag)})",
        )
    p.add_argument(
        "--max-pending-tokens",
        type=positive,
        default=1_048_576,
        help="tokens held by all requests from tokenizing to answer; beyond: 503 (default 1048576)",
    )
    p.add_argument(
        "--max-pending-pixels",
        type=positive,
        default=200_000_000,
        help="decoded and resized image pixels held by all requests; beyond: 503 (default 200000000)",
    )
    p.add_argument(
        "--max-batch-requests",
        type=positive,
        default=64,
        help="requests packed into one model call (default 64; 1 turns batching off)",
    )
    p.add_argument("--max-batch-tokens", type=positive, help="token budget of one packed call (default 16384)")
    p.add_argument("--max-queued", type=positive, default=1024, help="waiting requests before 503 (default 1024)")
    p.add_argument(
        "--graceful-timeout",
        type=seconds,
        default=30.0,
        help="seconds to finish the requests in flight on SIGTERM (default 30)",
    )
    p.add_argument("--header-timeout", type=seconds, default=10.0, help="seconds for a request's headers (default 10)")
    p.add_argument("--body-timeout", type=seconds, default=d.body_timeout, help="seconds for its body (default 60)")
    p.add_argument(
        "--keep-alive-timeout", type=seconds, default=5.0, help="seconds an idle connection stays open (default 5)"
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run)


def exposure(host: str, api_key: str | None) -> str | None:
    """The warning for a bound address reachable beyond this machine without an API key, or None."""
    if api_key or ipaddress.ip_address(host.split("%")[0]).is_loopback:
        return None
    return (
        f"listening on {host}, beyond this machine, without an API key: anyone who reaches the port can use the "
        "model (set JINA_V4_API_KEY)"
    )


def run(args) -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise RuntimeError("jina-v4 serve needs starlette and uvicorn: pip install 'jina_v4[serve]'") from None
    argv = sys.argv[1:]
    keyed = [i for i, a in enumerate(argv) if a == "--api-key" or a.startswith("--api-key=")]
    if argv[:1] == ["serve"] and ("OMP_WAIT_POLICY" not in os.environ or keyed):
        # OpenMP reads OMP_WAIT_POLICY as torch loads, which `import jina_v4` has done: start again with it set, so
        # that the model's threads sleep between calls instead of spinning on the cores the HTTP threads need (on
        # 2 cores spinning cut throughput up to 10x; NOTES.md, "Serving"). A key given on the command line moves
        # into the environment on the way, where other users cannot read it (ps shows the command line).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if keyed:
            os.environ["JINA_V4_API_KEY"] = args.api_key
            drop = {i for k in keyed for i in (k, k + 1) if i == k or argv[k] == "--api-key"}
            argv = [a for i, a in enumerate(argv) if i not in drop]
        os.execv(sys.executable, [sys.executable, "-m", "jina_v4", *argv])
    if keyed:
        print("jina-v4 serve: warning: --api-key is visible to other users in ps; set JINA_V4_API_KEY", file=sys.stderr)

    model = loaded_model(args.model, args.device, args.dtype, args.quiet)
    limits = Limits(
        max_items=args.max_items,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        max_body_bytes=args.max_body_bytes,
        max_image_pixels=args.max_image_pixels,
        allow_urls=args.allow_urls,
        url_timeout=args.url_timeout,
        url_request_timeout=args.url_request_timeout,
        allow_private_urls=args.allow_private_urls,
        max_redirects=args.max_redirects,
        body_timeout=args.body_timeout,
        max_answer_bytes=args.max_answer_bytes,
    )
    app = create_app(
        model,
        str(args.model),
        limits,
        args.api_key,
        args.task,
        args.deterministic,
        args.max_batch_requests,
        args.max_batch_tokens,
        args.max_queued,
        max_pending_tokens=args.max_pending_tokens,
        max_pending_pixels=args.max_pending_pixels,
    )
    family = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((args.host, args.port), family=family)
    host, port = sock.getsockname()[:2]
    if warning := exposure(host, args.api_key):
        print(f"jina-v4 serve: warning: {warning}", file=sys.stderr)
    host = f"[{host}]" if ":" in host else host
    print(
        f"jina-v4 serve: {args.model} on http://{host}:{port} (POST /v1/embeddings, GET /health, GET /v1/models)",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again under the handlers found here:
    # these make that a normal exit (status 0) instead of a kill or a KeyboardInterrupt.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = make_server(app, args.graceful_timeout, args.header_timeout, args.keep_alive_timeout, args.log_level)
    server.run(sockets=[sock])
