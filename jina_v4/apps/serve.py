"""`jina-v4 serve`: the embeddings HTTP API on starlette + uvicorn.

`POST /v1/embeddings` (Jina's and OpenAI's request formats, http_formats.py), `GET /health`, `GET /v1/models`.
Dynamic batching: one worker thread owns the model (it is not re-entrant) and runs it in steps of
--max-batch-tokens, the least served request first; the requests waiting for it are packed into shared calls
(same `return_multivector` and `dimensions`; tasks may differ, each item carries its own), and the results are
split back per request. starlette and uvicorn are imported only when the server starts, so the rest of the CLI
runs without the `serve` extra.

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
import itertools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.heads import head_for
from ..model.processing import token_batches
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
WORKER_DEAD = "the model worker has stopped (the server's log says why); the server needs a restart"
LARGE_BODY = 2**20  # bodies above this parse and prepare in the "large" lane
STREAM = 2**20  # an answer is sent in pieces of about this many bytes, each encoded in one thread call
RETRY_AFTER = 1  # seconds, in the Retry-After of a 503 for a full budget or queue


@dataclass(eq=False)  # compared by identity: a generated __eq__ would compare Items field by field, tensors too
class Job:
    """One request's work for the model worker: its Items (or (item, chunk groups) for late chunking), the settings
    that decide whom it may share a model call with, and its cost (tokens + image patches). The worker cuts it into
    steps of at most --max-batch-tokens and keeps its progress here."""

    work: Any  # a list of Items, or (item, chunk groups) for late chunking
    key: tuple  # (multivector, dimensions): only jobs with equal keys share an encode call
    cost: int  # tokens + image patches
    future: Future = field(default_factory=Future)
    gone: bool = False  # its client hung up: the worker drops it before its next step
    steps: list = field(default_factory=list)  # item indices of each step still to run, longest items first
    vectors: list = field(default_factory=list)  # the results so far, in input order
    served: int = 0  # tokens + patches computed so far: who goes next is decided by it
    seconds: float = 0.0  # model time used (a shared step's time split by cost), bounded by --max-request-seconds
    started: bool = False  # its future is marked running: a cancel no longer reaches it, `gone` does
    order: int = 0  # arrival


class Worker:
    """The one thread that calls the model, in steps of at most `max_tokens` (tokens + patches). A job is cut into
    steps as it arrives (processing.token_batches: longest items first, as the offline API batches them). Each step
    takes the next step of the waiting job that has been served least so far (earliest arrival on a tie), then the
    next steps of other jobs with the same key, served no more than it, while the total stays within `max_tokens`
    and the jobs within `max_requests`, and runs one `pipeline.encode` over their items. So a request that arrives
    while a long one runs waits for the step in the model and then its own step (which holds only requests as new
    as it), not for the long one's whole run; a late-chunking job is one step, alone.

    A job whose client hung up is dropped before its next step; one that has used `max_seconds` of model time is
    failed with a 504 between steps. Whatever a model call raises (any BaseException) fails only the requests of
    that step (a packed step is rerun job by job, so a bad job fails only itself) and the worker goes on. If the
    thread itself ever ends, `dead` says why: every waiting job and every new one gets a 503 at once."""

    def __init__(
        self,
        model,
        deterministic: bool = False,
        max_requests: int = 64,
        max_tokens: int | None = None,
        max_queued: int = 1024,
        max_seconds: float | None = None,
    ):
        self.model, self.deterministic, self.max_requests = model, deterministic, max_requests
        self.dims = model.config.matryoshka_dims
        self.max_tokens, self.max_queued = max_tokens or model.max_batch_tokens, max_queued
        self.max_seconds = max_seconds
        self.pending: list[Job] = []  # jobs with steps still to take, in arrival order
        self.step: list[tuple[Job, list[int]]] = []  # in the model now
        self.since, self.step_tokens = 0.0, 0  # when the step in the model began (time.monotonic), its cost
        self.cond = threading.Condition()
        self.closed = self.aborted = False
        self.dead: str | None = None  # why the thread ended
        self.arrivals = itertools.count()
        self.calls = self.requests = self.dropped = self.failed = 0  # model calls; requests answered, dropped, failed
        self.thread = threading.Thread(target=self.loop, name="jina-v4-model", daemon=True)
        self.thread.start()

    def check(self) -> None:
        """A 503 at once when the worker has stopped: a request is refused before it costs anything."""
        if self.dead is not None:
            raise RequestError(503, WORKER_DEAD)

    def submit(self, job: Job) -> Future:
        with self.cond:
            self.check()
            if self.closed or self.aborted:
                raise RequestError(503, SHUTTING_DOWN)
            if len(self.pending) >= self.max_queued:
                raise RequestError(
                    503,
                    f"{len(self.pending)} requests are waiting already (--max-queued); retry later",
                    headers={"Retry-After": str(RETRY_AFTER)},
                )
            job.order = next(self.arrivals)
            if isinstance(job.work, list):
                job.steps, job.vectors = token_batches(job.work, self.max_tokens), [None] * len(job.work)
            else:
                job.steps = [[0]]
            if job.steps:
                self.pending.append(job)
                self.cond.notify()
            else:
                job.future.set_result([])
        return job.future

    def step_cost(self, job: Job, index: list[int]) -> int:
        return sum(job.work[i].cost for i in index) if isinstance(job.work, list) else job.cost

    def take(self) -> list[tuple[Job, list[int]]]:
        """The next step: (job, item indices) pairs; [] when closed and nothing waits."""
        with self.cond:
            while True:
                for job in self.pending:
                    if job.gone or (not job.started and job.future.cancelled()):
                        job.steps = []
                        self.dropped += 1
                self.pending = [job for job in self.pending if job.steps]
                if self.pending or self.closed:
                    break
                self.cond.wait()
            step, used = [], 0
            for job in sorted(self.pending, key=lambda j: (j.served, j.order)):
                if len(step) == self.max_requests or (step and not isinstance(step[0][0].work, list)):
                    break
                cost = self.step_cost(job, job.steps[0])
                if step and not (isinstance(job.work, list) and job.key == step[0][0].key):
                    continue
                if step and job.served > step[0][0].served:  # a job under way never joins newer ones: its steps fill
                    continue  # a call alone, and would double their wait
                if step and used + cost > self.max_tokens:
                    continue
                if not job.started:
                    if not job.future.set_running_or_notify_cancel():  # its request is gone
                        job.steps = []
                        self.dropped += 1
                        continue
                    job.started = True
                step.append((job, job.steps.pop(0)))
                used += cost
            self.pending = [job for job in self.pending if job.steps]
            self.step, self.since, self.step_tokens = step, time.monotonic(), used
            return step

    def loop(self) -> None:
        try:
            while True:
                step = self.take()
                if not step:
                    if self.closed:
                        return
                    continue  # every job it looked at had been cancelled
                self.run(step)
                with self.cond:
                    self.step = []
        except BaseException as e:  # a fault of the worker's own: say so, and fail what waits instead of hanging
            log.critical("the model worker stopped", exc_info=True)
            with self.cond:
                self.dead = type(e).__name__
                jobs, self.pending, self.step = self.pending + [job for job, _ in self.step], [], []
            for job in jobs:
                settle(job, error=RequestError(503, WORKER_DEAD))

    def run(self, step: list[tuple[Job, list[int]]]) -> None:
        start = time.monotonic()
        try:
            results = self.encode(step)
        except BaseException as e:  # the model's failure fails its requests, never the worker
            if len(step) > 1:  # one job's failure never fails its step-mates
                for part in step:
                    self.run([part])
                return
            if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit, ...: never raised into the event loop
                log.error("a model call raised %s", type(e).__name__, exc_info=True)
                e = RuntimeError(f"the model call raised {type(e).__name__}")
            self.finish(step[0][0], error=e)
            return
        elapsed, costs = time.monotonic() - start, [self.step_cost(job, index) for job, index in step]
        for (job, index), cost, vectors in zip(step, costs, results):
            job.served += cost
            job.seconds += elapsed * cost / max(1, sum(costs))
            if isinstance(job.work, list):
                for i, v in zip(index, vectors):
                    job.vectors[i] = v
            else:
                job.vectors = vectors
            if not job.steps:
                self.finish(job, job.vectors)
            elif self.max_seconds is not None and job.seconds >= self.max_seconds:
                self.finish(
                    job,
                    error=RequestError(
                        504,
                        f"the request used its {self.max_seconds:g} s of model time with "
                        f"{sum(len(s) for s in job.steps)} of its inputs still to encode (--max-request-seconds); "
                        "send fewer or shorter inputs",
                    ),
                )

    def finish(self, job: Job, result: Any = None, error: BaseException | None = None) -> None:
        with self.cond:
            job.steps = []
            if job in self.pending:
                self.pending.remove(job)  # by identity (eq=False)
        if settle(job, result, error):
            if error is None:
                self.requests += 1
            else:
                self.failed += 1
        job.work = job.vectors = None  # the items' memory goes with the answer, not with the request's end

    def encode(self, step: list[tuple[Job, list[int]]]) -> list[list]:
        from .chunking import ChunkPooling

        self.calls += 1
        first = step[0][0]
        multivector, dimensions = first.key
        if isinstance(first.work, list):
            items = [job.work[i] for job, index in step for i in index]
            head = head_for(multivector, dimensions, self.dims)
        else:
            items, head = [first.work[0]], ChunkPooling(first.work[1], dimensions)
        with torch.inference_mode():
            out = encode(self.model, items, head, deterministic=self.deterministic)
        vecs = [v.cpu().numpy() for v in (out if isinstance(first.work, list) else out[0])]
        results, start = [], 0
        for _, index in step:
            n = len(index) if isinstance(first.work, list) else len(vecs)
            results.append(vecs[start : start + n])
            start += n
        return results

    def status(self) -> dict:
        """For /health: idle, busy (for how long, holding what) or dead."""
        with self.cond:
            if self.dead is not None:
                return {"state": "dead", "error": self.dead}
            if not self.step:
                return {"state": "idle"}
            return {
                "state": "busy",
                "seconds": round(time.monotonic() - self.since, 3),
                "requests": len(self.step),
                "inputs": sum(len(index) for _, index in self.step),
                "tokens": self.step_tokens,
            }

    def abort(self) -> None:
        """The graceful time is running out: every job not answered yet, queued or in the model, gets a 503 now; the
        step in the model runs to its end and its results are dropped."""
        with self.cond:
            self.aborted = True
            jobs, self.pending = self.pending + [job for job, _ in self.step], []
            for job in jobs:
                job.steps = []
        for job in jobs:
            settle(job, error=RequestError(503, SHUTTING_DOWN))

    def close(self, timeout: float | None = None) -> None:
        """Answer what is queued, then stop; wait for that at most `timeout` seconds (the thread is a daemon: a
        model call still running then never holds the process)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout)


def settle(job: Job, result: Any = None, error: BaseException | None = None) -> bool:
    """Give a job's future its result or error; False if it had one already (aborted) or was cancelled."""
    try:
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)
    except InvalidStateError:
        return False
    return True


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
    max_request_seconds: float | None = 60.0,
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
    worker = Worker(model, deterministic, max_batch_requests, max_batch_tokens, max_queued, max_request_seconds)
    budget = Budget(max_pending_tokens, max_pending_pixels)
    fetcher = Fetcher(limits.max_body_bytes, limits.url_timeout, limits.allow_private_urls, limits.max_redirects)
    # Threads that parse, prepare and answer: each lane bounds its own memory, and small requests never wait
    # behind large bodies or slow image URLs.
    lanes = {
        "small": anyio.CapacityLimiter(prepare_threads),
        "large": anyio.CapacityLimiter(max(1, prepare_threads // 2)),
        "urls": anyio.CapacityLimiter(prepare_threads),
    }
    state = {"received": 0, "in_flight": 0, "draining": False, "graceful": None}
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
            worker.check()
            if state["draining"]:  # a request that came before still goes to the worker, until the abort
                raise RequestError(503, SHUTTING_DOWN)
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
            job = Job(work, (req.multivector, req.dimensions), cost)
            del work
            vectors = await outcome(request, job)
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

    async def outcome(request, job: Job) -> list:
        """The job's vectors. starlette does not cancel a handler whose client hangs up, so the handler watches for
        the disconnect while it waits: the job is marked gone and the worker drops it before its next step."""
        waiting = asyncio.wrap_future(worker.submit(job))
        hangup = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait((waiting, hangup), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if hangup.done() and not hangup.cancelled():
                hangup.exception()  # retrieved: a receive() that failed counts as the client gone, logged by no one
            answered = waiting.done()
            if not answered:  # the client left, or uvicorn cancelled the handler
                job.gone = True
                waiting.cancel()
        if not answered:
            raise RequestError(499, "the client closed the connection")  # no one reads it
        return waiting.result()

    async def disconnected(request) -> None:
        # the body is read: the next message is uvicorn's http.disconnect, when the client closes the connection
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.1)

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
        work = worker.status()
        return JSONResponse(
            {
                "status": "dead" if work["state"] == "dead" else "draining" if state["draining"] else "ok",
                "model": names[-1],
                "worker": work,
                **{k: state[k] for k in ("received", "in_flight")},
                "queued": len(worker.pending),
                "model_calls": worker.calls,
                "requests": worker.requests,
                "dropped": worker.dropped,
                "failed": worker.failed,
                "pending_tokens": budget.used["tokens"],
                "pending_pixels": budget.used["pixels"],
            },
            503 if work["state"] == "dead" else 200,
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
        """The server stops accepting: new requests get a 503, URL fetches end, the queue runs on; a second before
        the graceful time ends, every job not answered yet, queued or in the model, gets a JSON 503 (uvicorn then
        cancels whatever handler is left, which answers a JSON 503 too)."""
        state["draining"], state["graceful"] = True, graceful_timeout
        fetcher.close()
        if graceful_timeout is not None:
            timer = threading.Timer(graceful_timeout - min(1.0, graceful_timeout / 2), worker.abort)
            timer.daemon = True
            timer.start()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # after a graceful time every job has its answer: a model call still running ends with the process, since
        # the worker's thread is a daemon (without one, the queue runs to its end first)
        await anyio.to_thread.run_sync(worker.close, 1.0 if state["graceful"] is not None else None)

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
    from uvicorn.protocols.http.flow_control import CLOSE_HEADER
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

        def shutdown(self) -> None:
            # uvicorn closes a connection after the answer in flight at shutdown without saying so in the answer, and
            # a kept-alive client then sends its next request into a closed socket: "Connection: close" tells it
            # (uvicorn adds the header to the answer when the request's headers hold it).
            cycle = self.cycle
            if cycle is not None and not cycle.response_started and CLOSE_HEADER not in cycle.scope["headers"]:
                cycle.scope["headers"].append(CLOSE_HEADER)
            super().shutdown()

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.state.drain(graceful_timeout)
            await super().shutdown(sockets)
            # past the graceful time uvicorn cancels the handlers left and goes on: let their JSON 503s go out and
            # their connections close before the event loop ends (a bounded wait: each answers at once)
            deadline = time.monotonic() + 2.0
            while (self.server_state.tasks or self.server_state.connections) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

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
        "--max-request-seconds",
        type=seconds,
        default=60.0,
        help="model time one request may use; beyond, it is stopped between batches with a 504 (default 60)",
    )
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
        max_request_seconds=args.max_request_seconds,
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
    # The server has finished. Threads still busy must not keep the process past its graceful time: the model
    # worker inside a long call is a daemon, but anyio's threads (parsing, preparing, answering requests no one
    # waits for now) are not, and Python would wait for them at exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
