"""The server's model worker: it cannot die of what it is given, says when it has stopped, shares the model fairly
(step by step, the least served job first), drops the requests whose clients hung up, and stops a request that has
used its model time between steps.

The worker is made busy with a gate inside its model call (the test decides when the call goes on), never with a
race against the clock; a bound on each wait is there against a hang only."""

import json
import socket
import threading
import time

import pytest
import torch

import jina_v4.apps.serve as serve
from jina_v4.apps.http_formats import Limits
from jina_v4.apps.serve import WORKER_DEAD, create_app

from test_serve import CKPT, Server, b64, call, floats, loopback_only, offline, png  # noqa: F401 (an autouse guard)

HANG = 60  # seconds: the bound on waiting for an event, against a hang only
INTERNAL = "internal error; the server's log has the details"


@pytest.fixture(scope="module")
def model(models):
    return models(CKPT)


class Gate:
    """Wraps the worker's model call: records the (job, item indices) of every step, and holds every call until
    `release` is set (set it at once with hold=False)."""

    def __init__(self, worker, hold: bool = True):
        self.worker, self.steps, self.entered, self.release = worker, [], threading.Event(), threading.Event()
        self.real = worker.encode
        worker.encode = self
        if not hold:
            self.release.set()

    def __call__(self, step):
        self.steps.append([(job, list(index)) for job, index in step])
        self.entered.set()
        assert self.release.wait(HANG)
        return self.real(step)

    def jobs(self, i: int) -> list:
        return [job for job, _ in self.steps[i]]


def background(server, bodies):
    """Each body sent from its own thread; -> (threads, results as (status, JSON), finish order)."""
    results, order = [None] * len(bodies), []

    def send(i):
        results[i] = call(server.url + "/v1/embeddings", bodies[i], timeout=HANG)
        order.append(i)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, results, order


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"waited {HANG} s for {what}"
        time.sleep(0.002)


def queued(worker, n: int) -> None:
    wait_for(lambda: len(worker.pending) >= n, f"{n} queued requests")


def raw_request(server, body) -> socket.socket:
    """A request sent on a socket that the test closes when it likes (a client that hangs up)."""
    data = json.dumps(body).encode()
    c = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=HANG)
    head = "POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    c.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return c


def test_three_queued_requests_do_not_kill_the_worker(model, batch_tol):
    """Queued behind a busy worker: a text, an image with other dimensions, another image. Taking the last for the
    text's call compared jobs field by field (dataclass __eq__) down to the images' tensors, and the worker thread
    died: every later request hung while /health said "ok". Jobs are compared by identity now."""
    s = Server(create_app(model, CKPT, Limits()))
    try:
        gate = Gate(s.app.state.worker)
        first, results_first, _ = background(s, [{"input": ["a long text " * 50]}])
        assert gate.entered.wait(HANG)
        health = call(s.url + "/health")[1]
        assert health["worker"]["state"] == "busy" and health["worker"]["requests"] == 1, health
        assert health["worker"]["inputs"] == 1 and health["worker"]["seconds"] >= 0
        bodies = [
            {"task": "retrieval.passage", "input": ["a text"]},
            {"task": "retrieval.passage", "input": [{"image": b64(png(64, 48, 1))}], "dimensions": 8},
            {"task": "retrieval.passage", "input": [{"image": b64(png(64, 48, 2))}]},
        ]
        threads, results, _ = background(s, bodies)
        queued(s.app.state.worker, 3)
        gate.release.set()
        for t in first + threads:
            t.join(HANG)
        assert results_first[0][0] == 200
        for body, (status, out) in zip(bodies, results):
            assert status == 200, out
            want = offline(model, body)
            assert torch.allclose(torch.stack(floats(out)), want, atol=batch_tol(CKPT), rtol=0)
        status, health = call(s.url + "/health")
        assert status == 200 and health["status"] == "ok" and health["worker"] == {"state": "idle"}, health
        assert call(s.url + "/v1/embeddings", {"input": ["after"]})[0] == 200
    finally:
        s.stop()


class Fault(BaseException):
    """Not an Exception: what a KeyboardInterrupt or SystemExit inside the model call would be."""


def test_a_fault_in_a_model_call_fails_its_request_and_the_worker_goes_on(model, monkeypatch, batch_tol):
    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_type.__name__))
    faults = [RuntimeError(f"at <_io.BytesIO object at 0x7f3a2b1c4d50> in {__file__}"), Fault("in the thread")]
    real = serve.encode

    def faulty(*args, **kwargs):
        if faults:
            raise faults.pop(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve, "encode", faulty)
    s = Server(create_app(model, CKPT, Limits()))
    try:
        for _ in range(2):
            status, out = call(s.url + "/v1/embeddings", {"input": ["a"]})
            assert status == 500 and out["error"]["message"] == INTERNAL, out
            assert "0x" not in json.dumps(out) and __file__ not in json.dumps(out)
        body = {"input": ["the next request"]}
        status, out = call(s.url + "/v1/embeddings", body)
        assert status == 200 and torch.allclose(torch.stack(floats(out)), offline(model, body), atol=batch_tol(CKPT))
        worker = s.app.state.worker
        assert worker.thread.is_alive() and worker.failed == 2 and crashed == []
        assert call(s.url + "/health")[1]["worker"] == {"state": "idle"}
    finally:
        s.stop()


def test_a_packed_step_that_fails_fails_only_the_bad_request(model, monkeypatch):
    """Three requests share a step; the model fails on one of them: the step is rerun request by request, and only
    that one gets the 500."""
    real = serve.encode

    def faulty(model_, items, *args, **kwargs):
        if any(it.input_ids == bad for it in items):
            raise Fault("a bad item")
        return real(model_, items, *args, **kwargs)

    bad = model.prepare(["poison"], "text-matching")[0].input_ids
    monkeypatch.setattr(serve, "encode", faulty)
    s = Server(create_app(model, CKPT, Limits()))
    try:
        gate = Gate(s.app.state.worker)
        first, _, _ = background(s, [{"input": ["holds the model"]}])
        assert gate.entered.wait(HANG)
        threads, results, _ = background(s, [{"input": ["good one"]}, {"input": ["poison"]}, {"input": ["good two"]}])
        queued(s.app.state.worker, 3)
        gate.release.set()
        for t in first + threads:
            t.join(HANG)
        assert [r[0] for r in results] == [200, 500, 200], results
        assert len(gate.steps[1]) == 3 and [len(step) for step in gate.steps[2:]] == [1, 1, 1]
    finally:
        s.stop()


def test_a_dead_worker_says_so_and_refuses_at_once(model, monkeypatch):
    """A fault in the worker's own code ends its thread: the request queued then gets a 503 at once, /health
    answers 503 "dead", and a new request is refused at once (it would otherwise wait forever)."""
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    s = Server(create_app(model, CKPT, Limits()))
    worker = s.app.state.worker
    try:
        gate = Gate(worker)
        first, results_first, _ = background(s, [{"input": ["in the model"]}])
        assert gate.entered.wait(HANG)
        threads, results, _ = background(s, [{"input": ["queued"]}])
        queued(worker, 1)

        def broken():
            raise RuntimeError("a fault in the worker's own code")

        worker.take = broken  # the worker's next look at its queue fails
        gate.release.set()
        for t in first + threads:
            t.join(HANG)
        assert results_first[0][0] == 200
        assert results[0] == (503, results[0][1]) and results[0][1]["error"]["message"] == WORKER_DEAD
        status, health = call(s.url + "/health")
        assert status == 503 and health["status"] == "dead" and health["worker"]["state"] == "dead", health
        status, out = call(s.url + "/v1/embeddings", {"input": ["new"]}, timeout=HANG)
        assert status == 503 and out["error"]["message"] == WORKER_DEAD
        assert not worker.thread.is_alive()
    finally:
        s.stop()


def long_and_short(model):
    long = {"task": "retrieval.passage", "input": [f"passage {i}: " + "many words here " * 2 for i in range(8)]}
    short = {"task": "retrieval.query", "input": ["a short query"]}
    sizes = [len(it.input_ids) for it in model.prepare(long["input"], "retrieval", "passage")]
    return long, short, sizes


def test_a_short_request_waits_one_step_not_the_long_one(model):
    """--max-batch-tokens 100 cuts the long request (8 texts of about 40 tokens) into 4 steps of 2 texts. A short
    request that arrives while the long one's first step runs has the very next step, and is answered before the
    long one; both answers are the offline API's, bit for bit (--deterministic: the steps do not change them)."""
    long, short, sizes = long_and_short(model)
    assert 2 * max(sizes) <= 100 < 3 * min(sizes), sizes  # two texts a step
    s = Server(create_app(model, CKPT, Limits(), deterministic=True, max_batch_tokens=100))
    try:
        gate = Gate(s.app.state.worker)
        first, results_long, order = background(s, [long])
        assert gate.entered.wait(HANG)
        threads, results_short, _ = background(s, [short])
        queued(s.app.state.worker, 2)  # the long one's 3 steps to go and the short one
        t0 = time.perf_counter()
        gate.release.set()
        for t in threads:
            t.join(HANG)
        waited = time.perf_counter() - t0
        for t in first:
            t.join(HANG)
        long_job, short_job = gate.jobs(0)[0], gate.jobs(1)[0]
        assert gate.jobs(1) == [short_job] and short_job is not long_job  # the short one has step 2 to itself
        assert [len(step) for step in gate.steps] == [1, 1, 1, 1, 1]  # (the long one under way joins no newer job)
        assert sum(len(index) for job, index in sum(gate.steps, []) if job is long_job) == 8
        assert results_short[0][0] == 200 and results_long[0][0] == 200
        assert torch.equal(torch.stack(floats(results_short[0][1])), offline(model, short, deterministic=True))
        assert torch.equal(torch.stack(floats(results_long[0][1])), offline(model, long, deterministic=True))
        print(f"the short request waited {waited * 1000:.0f} ms after the long one's first step")
    finally:
        s.stop()


def test_a_client_that_hangs_up_is_dropped(model):
    """A queued request whose client hangs up never reaches the model; a running one whose client hangs up is
    dropped before its next step."""
    long, short, _ = long_and_short(model)
    s = Server(create_app(model, CKPT, Limits(), max_batch_tokens=100))
    worker = s.app.state.worker
    try:
        gate = Gate(worker)
        running = raw_request(s, long)
        assert gate.entered.wait(HANG)
        waiting = raw_request(s, short)
        queued(worker, 2)
        jobs = list(worker.pending)
        running.close()
        waiting.close()
        wait_for(lambda: all(job.gone for job in jobs), "the server to see both clients leave")
        gate.release.set()
        wait_for(lambda: worker.dropped == 2 and not worker.step, "the worker to drop both")
        assert len(gate.steps) == 1  # the long one's first step only
        assert call(s.url + "/v1/embeddings", short)[0] == 200 and len(gate.steps) == 2
        assert worker.requests == 1  # the last request only: the others were never answered
    finally:
        s.stop()


def test_a_request_is_stopped_between_steps_past_its_model_time(model):
    """--max-request-seconds: a request that has used its model time with steps to go gets a 504 and no further
    step; one that finishes in its step is answered. (A limit of 1 ns: any step uses it up.)"""
    long, short, _ = long_and_short(model)
    s = Server(create_app(model, CKPT, Limits(), max_batch_tokens=100, max_request_seconds=1e-9))
    try:
        gate = Gate(s.app.state.worker, hold=False)
        status, out = call(s.url + "/v1/embeddings", long)
        assert status == 504 and "--max-request-seconds" in out["error"]["message"], out
        assert "6 of its inputs still to encode" in out["error"]["message"] and len(gate.steps) == 1
        assert call(s.url + "/v1/embeddings", short)[0] == 200
    finally:
        s.stop()
