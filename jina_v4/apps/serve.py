"""`jina-v4 serve`: the embeddings HTTP API on starlette + uvicorn.

`POST /v1/embeddings` (Jina's and OpenAI's request formats, serve_formats.py), `GET /health`, `GET /v1/models`.
Dynamic batching: one worker thread owns the model (it is not re-entrant); the requests waiting for it are packed
into shared `encode_items` calls (same `return_multivector` and `dimensions`; tasks may differ, each item carries
its own) under a token budget, and the results are split back per request. starlette and uvicorn are imported
only when the server starts, so the rest of the CLI runs without the `serve` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.heads import head_for
from ..pipeline import encode
from .common import DEFAULT_MODEL
from .http_formats import ALIAS, Limits, RequestError, answer, http_tasks, parse, prepare

log = logging.getLogger("jina_v4.serve")


@dataclass
class Job:
    work: Any  # a list of Items, or (item, chunk groups) for late chunking
    key: tuple  # (multivector, dimensions): only jobs with equal keys share an encode call
    cost: int  # tokens + image patches
    future: Future = field(default_factory=Future)


class Worker:
    """The one thread that calls the model. It takes the oldest waiting job, adds the later waiting jobs of the
    same key while the total cost stays within `max_tokens` and the count within `max_requests`, runs one
    `pipeline.encode` over all their items and hands each job its own slice. A late-chunking job runs alone."""

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
        self.closed = False
        self.calls = self.requests = 0  # model calls made, requests answered
        self.thread = threading.Thread(target=self.loop, name="jina-v4-model", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        with self.cond:
            if self.closed:
                raise RequestError(503, "the server is shutting down")
            if len(self.pending) >= self.max_queued:
                raise RequestError(503, f"{len(self.pending)} requests are waiting already; retry later")
            self.pending.append(job)
            self.cond.notify()
        return job.future

    def take(self) -> list[Job]:
        with self.cond:
            while not self.pending and not self.closed:
                self.cond.wait()
            if not self.pending:
                return []
            group = [self.pending.popleft()]
            used = group[0].cost
            for job in list(self.pending) if isinstance(group[0].work, list) else []:
                if len(group) == self.max_requests:
                    break
                if isinstance(job.work, list) and job.key == group[0].key and used + job.cost <= self.max_tokens:
                    self.pending.remove(job)
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

    def close(self) -> None:
        """Answer what is queued, then stop."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join()


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
):
    """The ASGI app serving `model` under `name` (and "jina-embeddings-v4"); its worker starts now and stops
    when the app's lifespan ends, after the requests in flight are answered."""
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    limits = limits or Limits()
    names = list(dict.fromkeys([ALIAS, name, Path(name).name]))
    # Deterministic: requests are packed as usual, and each answer is the offline API's on the same inputs
    # bit for bit, whatever shared its model call (execution.py).
    worker = Worker(model, deterministic, max_batch_requests, max_batch_tokens, max_queued)
    limiter = anyio.CapacityLimiter(prepare_threads)  # threads reading inputs and writing answers: bounds memory
    state = {"received": 0, "in_flight": 0}
    tasks = http_tasks(model.tasks)
    if task not in tasks:
        raise ValueError(f"task={task!r}: the checkpoint's tasks are {list(tasks)}")
    key = f"Bearer {api_key}".encode() if api_key else None

    def refuse(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), e.status)

    def check_key(request) -> None:
        if key is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(), key):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    async def read_json(request) -> Any:
        """The body, kept up to the limit. A body over it is read to its end (up to 8x the limit) and dropped,
        so that the client, still sending, gets the 413 instead of a reset connection."""
        declared, cap = request.headers.get("content-length", ""), limits.max_body_bytes
        body, size = bytearray(), int(declared) if declared.isdigit() else 0
        if size <= 8 * cap:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                body += chunk if size <= cap else b""
                if size > 8 * cap:
                    break
        if size > cap:
            raise RequestError(413, f"the body is {size} bytes, over the limit of {cap} (--max-body-bytes)")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:
            raise RequestError(400, f"the body is not valid JSON ({e})") from None

    async def embeddings(request):
        state["received"] += 1
        state["in_flight"] += 1
        try:
            check_key(request)
            req = parse(await read_json(request), names, model.config.matryoshka_dims, task, limits, tasks)
            work, tokens = await anyio.to_thread.run_sync(prepare, req, model, limits, tasks, limiter=limiter)
            cost = sum(it.cost for it in work) if isinstance(work, list) else tokens
            vectors = await asyncio.wrap_future(worker.submit(Job(work, (req.multivector, req.dimensions), cost)))
            body = await anyio.to_thread.run_sync(
                lambda: json.dumps(answer(req, vectors, tokens)).encode(), limiter=limiter
            )
            return Response(body, media_type="application/json")
        except RequestError as e:
            return refuse(e)
        except Exception as e:  # a bug or a model failure: answered, logged, and the server stays up
            log.exception("request failed")
            return refuse(RequestError(500, f"internal error: {type(e).__name__}: {e}"))
        finally:
            state["in_flight"] -= 1

    async def health(request):
        return JSONResponse(
            {
                "status": "ok",
                "model": name,
                **state,
                "queued": len(worker.pending),
                "model_calls": worker.calls,
                "requests": worker.requests,
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
        return refuse(RequestError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

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
    app.state.worker = worker
    return app


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


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
    p.add_argument("--dtype", help="bfloat16, float16 or float32 (default: the checkpoint's)")
    p.add_argument(
        "--task",
        default="text-matching",
        help=f"the task of requests that name none, as requests name them: {names} (default text-matching)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("JINA_V4_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $JINA_V4_API_KEY, else no key)",
    )
    p.add_argument("--allow-urls", action="store_true", help="fetch http(s) image URLs (refused by default)")
    p.add_argument("--url-timeout", type=float, default=d.url_timeout, help="seconds per image download")
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
    ):
        p.add_argument(
            "--" + flag.replace("_", "-"),
            type=positive,
            default=getattr(d, flag),
            help=f"{help_} (default {getattr(d, flag)})",
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
        type=float,
        default=30.0,
        help="seconds to finish the requests in flight on SIGTERM (default 30)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run)


def run(args) -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise RuntimeError("jina-v4 serve needs starlette and uvicorn: pip install 'jina_v4[serve]'") from None
    if "OMP_WAIT_POLICY" not in os.environ and sys.argv[1:2] == ["serve"]:
        # OpenMP reads this as torch loads, which `import jina_v4` has done: start again with it set, so that the
        # model's threads sleep between calls instead of spinning on the cores the HTTP threads need (on 2 cores
        # spinning cut throughput up to 10x; NOTES.md, "Serving").
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "jina_v4", *sys.argv[1:]])
    from ..model import JinaV4

    model = JinaV4.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    limits = Limits(
        args.max_items,
        args.max_tokens,
        args.max_length,
        args.max_body_bytes,
        args.max_image_pixels,
        args.allow_urls,
        args.url_timeout,
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
    )
    family = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((args.host, args.port), family=family)
    host, port = sock.getsockname()[:2]
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
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.graceful_timeout)
    uvicorn.Server(config).run(sockets=[sock])
