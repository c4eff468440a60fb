"""`jina-v4 serve` as a subprocess on 127.0.0.1, under load: 16 concurrent clients x 50 requests, valid and invalid
mixed; every valid answer equals the offline API's, every invalid one is refused with its status, the server
stays up and its memory flat; throughput with dynamic batching against one request at a time; SIGTERM answers
the requests in flight and exits 0."""

import base64
import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest
import torch

from test_cli import SCRIPT
from test_serve import call, floats, offline, png

pytestmark = pytest.mark.slow

CKPT = "gqa4-single"
CLIENTS, PER_CLIENT = 16, 50
SPEED_RUNS = 25  # requests per client when timing throughput: text requests only, each server the same load


def start(ckpt, log, *args):
    """The console script serving `ckpt` on a free port; -> (process, base URL)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [SCRIPT, "serve", "--model", str(ckpt), "--port", "0", "--log-level", "warning", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = re.search(r"on (http://127\.0\.0\.1:\d+) ", open(log).read())
        if found and call(found[1] + "/health", timeout=10)[0] == 200:
            return proc, found[1]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the server did not start: {open(log).read()}")


def rss_mb(pid):
    return int(re.search(r"VmRSS:\s+(\d+) kB", open(f"/proc/{pid}/status").read())[1]) / 1024


VALID = [
    {"task": "retrieval.query", "input": ["what is late interaction?"]},
    {"task": "retrieval.passage", "input": ["a passage about the coast", "another passage " * 20], "dimensions": 16},
    {"task": "text-matching", "input": ["a pair", "of texts", "to match"], "return_multivector": True},
    {"task": "code.query", "input": ["sort a list in python"], "embedding_type": "base64"},
    {"task": "code.passage", "input": ["def f(xs): return sorted(xs)", {"text": "print(1)"}]},
    {"task": "retrieval.passage", "input": ["a caption", {"image": base64.b64encode(png(64, 48, 7)).decode()}]},
    {"input": ["openai style"] * 4, "encoding_format": "base64"},
]
INVALID = [  # (raw body, status)
    (b'{"input": ["unterminated', 400),
    (json.dumps({"input": "x", "task": "summarize"}).encode(), 400),
    (json.dumps({"input": ["x"] * 17}).encode(), 413),
    (json.dumps({"input": [{"image": "/etc/passwd"}]}).encode(), 400),
    (json.dumps({"input": [[1, 2, 10**9]]}).encode(), 400),
    (json.dumps({"input": ["x" * 300_000]}).encode(), 413),
]


def decode(body, out):
    """The answer's vectors as float32 tensors, whatever encoding the request asked for."""
    if body.get("embedding_type") == "base64" or body.get("encoding_format") == "base64":
        return [torch.frombuffer(bytearray(base64.b64decode(d["embedding"])), dtype=torch.float32) for d in out["data"]]
    return floats(out, "embeddings" if body.get("return_multivector") else "embedding")


def run_load(url, expected, requests, clients, per_client, rss=None, tol=0.0):
    """`clients` threads, each sending `per_client` requests drawn in turn from `requests` (indices into VALID,
    or negative: -1 - index into INVALID). With `rss`, every client waits halfway so that RSS is read there.
    Returns (seconds, failures)."""
    failures, halfway = [], threading.Barrier(clients + 1) if rss is not None else None

    def client(c):
        for j in range(per_client):
            if halfway is not None and j == per_client // 2:
                halfway.wait()
                halfway.wait()
            r = requests[(c * 7 + j) % len(requests)]
            try:
                if r >= 0:
                    status, out = call(url + "/v1/embeddings", VALID[r], timeout=120)
                    got = decode(VALID[r], out) if status == 200 else []
                    ok = status == 200 and [d["index"] for d in out["data"]] == list(range(len(expected[r])))
                    ok = ok and all(
                        g.shape == e.shape and torch.allclose(g, e, atol=tol, rtol=0) for g, e in zip(got, expected[r])
                    )
                else:
                    raw, want = INVALID[-1 - r]
                    status, out = call(url + "/v1/embeddings", raw=raw, timeout=120)
                    ok = status == want and "message" in out["error"]
            except Exception as e:  # a dropped connection is a failure too
                ok, status = False, repr(e)
            if not ok:
                failures.append((r, status))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start_time = time.perf_counter()
    for t in threads:
        t.start()
    if halfway is not None:
        halfway.wait()
        rss.append(rss_mb(rss.pid))
        halfway.wait()
    for t in threads:
        t.join()
    return time.perf_counter() - start_time, failures


class RSS(list):
    def __init__(self, pid):
        super().__init__()
        self.pid = pid


@pytest.fixture(scope="module")
def expected(models):
    model = models(CKPT)
    return [offline(model, b) for b in VALID]


def test_load_and_throughput(checkpoints, expected, batch_tol, tmp_path):
    """16 clients x 50 requests, 1 in 3 invalid; then the valid text requests alone, batched and one at a time."""
    mix = [0, 1, -1, 2, 3, -2, 4, 5, -3, 6, 0, -4, 1, 2, -5, 3, 4, -6]
    tol = batch_tol(CKPT)
    proc, url = start(checkpoints[CKPT], tmp_path / "a.log", "--max-items", 16, "--max-body-bytes", 200_000)
    try:
        rss = RSS(proc.pid)
        run_load(url, expected, [0, 1, 2, 3, 4, 5, 6], CLIENTS, 2, tol=tol)  # warm-up: every kind of request once
        rss.append(rss_mb(proc.pid))
        seconds, failures = run_load(url, expected, mix, CLIENTS, PER_CLIENT, rss, tol=tol)
        rss.append(rss_mb(proc.pid))
        assert not failures, failures[:10]
        assert proc.poll() is None and call(url + "/health")[1]["status"] == "ok"
        growth = rss[2] - rss[1]
        print(
            f"\nRSS after warm-up {rss[0]:.0f} MB, halfway {rss[1]:.0f} MB, end {rss[2]:.0f} MB; "
            f"{CLIENTS * PER_CLIENT} mixed requests in {seconds:.1f} s"
        )
        assert growth < 40, f"RSS grew by {growth:.0f} MB in the second half"
        texts = [i for i, b in enumerate(VALID) if "image" not in json.dumps(b)]
        before = call(url + "/health")[1]
        batched, failures = run_load(url, expected, texts, CLIENTS, SPEED_RUNS, tol=tol)
        health = call(url + "/health")[1]
        calls = health["model_calls"] - before["model_calls"]
        assert not failures and calls < health["requests"] - before["requests"]
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    proc, url = start(checkpoints[CKPT], tmp_path / "b.log", "--max-batch-requests", 1)
    try:
        single, failures = run_load(url, expected, texts, CLIENTS, SPEED_RUNS, tol=tol)
        health = call(url + "/health")[1]
        assert not failures and health["model_calls"] == health["requests"] == CLIENTS * SPEED_RUNS
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    n = CLIENTS * SPEED_RUNS
    print(
        f"{n} text requests, {CLIENTS} clients: dynamic batching {n / batched:.0f} requests/s ({batched:.1f} s, "
        f"{n / calls:.1f} requests per model call), one request at a time {n / single:.0f} requests/s "
        f"({single:.1f} s)"
    )


def test_sigterm_answers_the_requests_in_flight(checkpoints, models, batch_tol, tmp_path):
    proc, url = start(checkpoints[CKPT], tmp_path / "c.log", "--max-batch-requests", 1)
    bodies = [
        {"task": "retrieval.passage", "input": [f"document {i}: " + "a long passage " * 60] * 6} for i in range(4)
    ]
    results = [None] * len(bodies)

    def send(i):
        results[i] = call(url + "/v1/embeddings", bodies[i], timeout=120)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    try:
        for t in threads:
            t.start()
        deadline, health = time.time() + 60, {"received": 0}
        while health["received"] < len(bodies):
            assert time.time() < deadline
            time.sleep(0.01)
            health = call(url + "/health")[1]
        assert health["requests"] <= len(bodies) - 2, "requests should still be in flight (one runs at a time)"
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    model = models(CKPT)
    for body, (status, out) in zip(bodies, results):
        assert status == 200
        assert torch.allclose(torch.stack(floats(out)), offline(model, body), atol=batch_tol(CKPT), rtol=0)
    with pytest.raises(OSError):  # the port is closed
        call(url + "/health", timeout=5)
