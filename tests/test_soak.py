"""A soak of `jina-v4 serve` (a subprocess on 127.0.0.1, --deterministic): 32 clients in rounds of mixed traffic
(short and long texts, PNG and JPEG images, image multi-vectors, Jina's and OpenAI's formats, invalid requests,
clients that hang up mid-request) while faults are injected into the model calls that hold a "poison" input.

It shows: every valid answer equals the offline API's bit for bit (model.encode, deterministic=True, on the same
checkpoint); every poisoned request gets a JSON 500 that names nothing of the server, every invalid one its status;
no request hangs (each is answered within a wide deadline); the worker never dies; RSS stays flat once warm, and
the budget is back to zero at the end.

The short form (a warm-up and 3 rounds of 32 x 3 requests) runs with the rest of the suite; the long form
(JINA_V4_SOAK=long, marker `soak`: 40 rounds) runs only when asked for."""

import base64
import io
import json
import os
import random
import socket
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from test_serve import call, floats, offline, png
from test_serve_load import launch, rss_mb

pytestmark = pytest.mark.slow

CKPT = "gqa4-single"
CLIENTS, PER_ROUND = 32, 3
LONG = os.environ.get("JINA_V4_SOAK") == "long"
HANG = 120  # seconds: every request is answered within this, or the test fails
INTERNAL = "internal error; the server's log has the details"

# The server with a fault injected: pipeline.encode, as the worker calls it, raises on any call whose items hold
# the "poison" text, a RuntimeError naming a path and a heap address and a BaseException in turn.
LAUNCH = """
import sys
import jina_v4.apps.serve as serve

real, poison, count = serve.encode, [], [0]


class Fault(BaseException):
    pass


def faulty(model, items, *args, **kwargs):
    if not poison:
        poison.append(model.prepare(["poison"], "text-matching")[0].input_ids)
    if any(it.input_ids == poison[0] for it in items):
        count[0] += 1
        if count[0] % 2:
            raise RuntimeError(f"injected at <io.BytesIO object at 0x7f3a2b1c4d50> in {serve.__file__}")
        raise Fault("injected")
    return real(model, items, *args, **kwargs)


serve.encode = faulty
from jina_v4.apps.cli import main

sys.exit(main(sys.argv[1:]))
"""


def jpeg(w, h, seed):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def b64(data):
    return base64.b64encode(data).decode()


VALID = [
    {"task": "retrieval.query", "input": ["what is late interaction?"]},
    {"task": "retrieval.passage", "input": ["a long passage: " + "the tide " * 80, "short"], "dimensions": 16},
    {"task": "retrieval.passage", "input": ["a longer one: " + "word " * 150]},
    {"task": "text-matching", "input": ["a pair", "of texts"], "return_multivector": True},
    {"task": "retrieval.passage", "input": ["a caption", {"image": b64(png(64, 48, 7))}]},
    {"task": "retrieval.passage", "input": [{"image": b64(jpeg(80, 60, 8))}], "return_multivector": True},
    {"task": "code.query", "input": ["sort a list in python"], "embedding_type": "base64"},
    {"input": ["openai style", "two texts"], "encoding_format": "base64"},
    {"input": ["openai floats"], "encoding_format": "float", "model": "jina-embeddings-v4"},
]
POISON = [
    {"task": "text-matching", "input": ["poison"]},
    {"task": "text-matching", "input": ["a text beside it", "poison"]},
]
INVALID = [  # (raw body, status, Content-Type)
    (b'{"input": ["unterminated', 400, "application/json"),
    (json.dumps({"input": "x", "task": "summarize"}).encode(), 400, "application/json"),
    (json.dumps({"input": ["x"] * 17}).encode(), 413, "application/json"),
    (json.dumps({"input": [{"image": "/etc/passwd"}]}).encode(), 400, "application/json"),
    (json.dumps({"input": [{"image": "aGVsbG8="}]}).encode(), 400, "application/json"),
    (json.dumps({"input": ["a", ""]}).encode(), 400, "application/json"),
    (json.dumps({"input": "a"}).encode(), 415, "text/plain"),
]
KINDS = ["valid"] * 10 + ["poison", "invalid", "invalid", "hang up"]


def start(ckpt, log, *args):
    """The server with its fault injected, on a free port; -> (process, base URL)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # set: no re-exec, the patch holds
    cmd = [sys.executable, "-c", LAUNCH, "serve", "--model", str(ckpt), "--port", "0", "--log-level", "error"]
    return launch([*cmd, *map(str, args)], log, env)


def decode(body, out):
    if body.get("embedding_type") == "base64" or body.get("encoding_format") == "base64":
        return [torch.frombuffer(bytearray(base64.b64decode(d["embedding"])), dtype=torch.float32) for d in out["data"]]
    return floats(out, "embeddings" if body.get("return_multivector") else "embedding")


def hang_up(url, body, rng):
    """Send a request and close the connection before the answer (after 0 to 50 ms)."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=HANG) as c:
        head = "POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        c.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(rng.random() * 0.05)


def round_of(url, expected, seed):
    """CLIENTS threads, PER_ROUND requests each, kinds drawn by a seeded generator; -> (failures, counts)."""
    failures, counts, lock = [], {k: 0 for k in KINDS}, threading.Lock()

    def client(c):
        rng = random.Random(seed * 1000 + c)
        for _ in range(PER_ROUND):
            kind = rng.choice(KINDS)
            try:
                if kind == "valid":
                    r = rng.randrange(len(VALID))
                    status, out = call(url + "/v1/embeddings", VALID[r], timeout=HANG)
                    got = decode(VALID[r], out) if status == 200 else []
                    ok = status == 200 and len(got) == len(expected[r])
                    ok = ok and all(g.shape == e.shape and torch.equal(g, e) for g, e in zip(got, expected[r]))
                    what = (kind, r, status)
                elif kind == "poison":
                    body = rng.choice(POISON)
                    status, out = call(url + "/v1/embeddings", body, timeout=HANG)
                    ok, what = status == 500 and out["error"]["message"] == INTERNAL, (kind, status, out)
                elif kind == "invalid":
                    raw, want, kind_ = rng.choice(INVALID)
                    status, out = call(url + "/v1/embeddings", raw=raw, timeout=HANG, headers={"Content-Type": kind_})
                    ok, what = status == want and "message" in out["error"], (kind, raw[:40], status)
                else:
                    hang_up(url, VALID[rng.choice([1, 2, 5])], rng)
                    ok, what = True, None
            except Exception as e:  # a timeout, a dropped connection: a failure too
                ok, what = False, (kind, repr(e))
            with lock:
                counts[kind] += 1
                if not ok:
                    failures.append(what)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG * PER_ROUND + 30)
        assert not t.is_alive(), "a client hung"
    return failures, counts


@pytest.fixture(scope="module")
def expected(models):
    model = models(CKPT)
    return [offline(model, b, deterministic=True) for b in VALID]


def soak(checkpoints, expected, tmp_path, rounds):
    args = ("--deterministic", "--max-items", 16, "--max-batch-tokens", 512, "--graceful-timeout", 5)
    proc, url = start(checkpoints[CKPT], tmp_path / "soak.log", *args)
    try:
        t0 = time.perf_counter()
        failures, _ = round_of(url, expected, seed=0)  # warm-up
        assert not failures, failures[:5]
        rss, totals = [rss_mb(proc.pid)], {}
        for r in range(1, rounds + 1):
            failures, counts = round_of(url, expected, seed=r)
            assert not failures, failures[:5]
            status, health = call(url + "/health")
            assert status == 200 and health["status"] == "ok" and health["worker"]["state"] != "dead", health
            rss.append(rss_mb(proc.pid))
            totals = {k: totals.get(k, 0) + n for k, n in counts.items()}
        deadline = time.monotonic() + HANG  # the hung-up clients' requests end too, and give the budget back
        while (health := call(url + "/health")[1])["in_flight"] or health["pending_tokens"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert health["pending_pixels"] == 0 and health["worker"] == {"state": "idle"}, health
        took = time.perf_counter() - t0
        print(
            f"\nsoak: {rounds} rounds after a warm-up, {CLIENTS} clients x {PER_ROUND}: {totals} in {took:.1f} s; "
            f"{health['failed']} requests failed by injected faults, {health['dropped']} dropped (clients gone); "
            f"RSS after warm-up and each round: {', '.join(f'{m:.0f}' for m in rss)} MB"
        )
        growth = max(rss[2:]) - rss[1]
        assert growth < 40, f"RSS grew by {growth:.0f} MB after the first round"
        assert totals["poison"] > 0 and health["failed"] >= totals["poison"]
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    log = (tmp_path / "soak.log").read_text()
    assert "the model worker stopped" not in log


def test_soak(checkpoints, expected, tmp_path):
    soak(checkpoints, expected, tmp_path, rounds=3)


@pytest.mark.soak
@pytest.mark.skipif(not LONG, reason="the long soak runs with JINA_V4_SOAK=long")
def test_soak_long(checkpoints, expected, tmp_path):
    soak(checkpoints, expected, tmp_path, rounds=40)
