"""`jina-v4 serve` as a subprocess on 127.0.0.1, under load: 16 concurrent clients in rounds of requests, valid and
invalid mixed (image URLs from a loopback remote among them); every valid answer equals the offline API's, every
invalid one is refused with its status, the server stays up and its memory flat from round to round once warm;
throughput with dynamic batching against one request at a time; SIGTERM answers the requests in flight and exits
0; an API key given on the command line leaves it."""

import base64
import functools
import http.client
import http.server
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
CLIENTS, PER_ROUND, ROUNDS = 16, 12, 4
SPEED_RUNS = 25  # requests per client when timing throughput: text requests only, each server the same load


def start(ckpt, log, *args):
    """The console script serving `ckpt` on a free port; -> (process, base URL)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [SCRIPT, "serve", "--model", str(ckpt), "--port", "0", "--log-level", "warning"]
    return launch([*cmd, *map(str, args)], log, env)


def launch(cmd, log, env):
    """Start `cmd`, a server printing its URL to `log`, and wait until its /health answers; -> (process, URL)."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
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


PAGE = png(120, 90, 11)
VALID = [
    {"task": "retrieval.query", "input": ["what is late interaction?"]},
    {"task": "retrieval.passage", "input": ["a passage about the coast", "another passage " * 20], "dimensions": 16},
    {"task": "text-matching", "input": ["a pair", "of texts", "to match"], "return_multivector": True},
    {"task": "code.query", "input": ["sort a list in python"], "embedding_type": "base64"},
    {"task": "code.passage", "input": ["def f(xs): return sorted(xs)", {"text": "print(1)"}]},
    {"task": "retrieval.passage", "input": ["a caption", {"image": base64.b64encode(png(64, 48, 7)).decode()}]},
    {"input": ["openai style"] * 4, "encoding_format": "base64"},
    {"task": "retrieval.passage", "input": ["a page", {"image": "REMOTE/page.png"}]},  # fetched from the remote
]
INVALID = [  # (raw body, status, Content-Type)
    (b'{"input": ["unterminated', 400, "application/json"),
    (json.dumps({"input": "x", "task": "summarize"}).encode(), 400, "application/json"),
    (json.dumps({"input": ["x"] * 17}).encode(), 413, "application/json"),
    (json.dumps({"input": [{"image": "/etc/passwd"}]}).encode(), 400, "application/json"),
    (json.dumps({"input": [[1, 2, 10**9]]}).encode(), 400, "application/json"),
    (json.dumps({"input": ["x" * 300_000]}).encode(), 413, "application/json"),
    (json.dumps({"input": [[]]}).encode(), 400, "application/json"),
    (json.dumps({"input": ["a", ""]}).encode(), 400, "application/json"),
    (json.dumps({"input": "a"}).encode(), 415, "text/plain"),
    (json.dumps({"input": [{"image": "REMOTE/missing.png"}]}).encode(), 400, "application/json"),
]


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """The web server the image URLs point at, on 127.0.0.1 (the server runs with --allow-private-urls)."""
    d = tmp_path_factory.mktemp("remote")
    (d / "page.png").write_bytes(PAGE)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(d)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    VALID[-1]["input"][1]["image"] = f"{base}/page.png"
    INVALID[-1] = (INVALID[-1][0].replace(b"REMOTE", base.encode()), *INVALID[-1][1:])
    yield base
    httpd.shutdown()


def decode(body, out):
    """The answer's vectors as float32 tensors, whatever encoding the request asked for."""
    if body.get("embedding_type") == "base64" or body.get("encoding_format") == "base64":
        return [torch.frombuffer(bytearray(base64.b64decode(d["embedding"])), dtype=torch.float32) for d in out["data"]]
    return floats(out, "embeddings" if body.get("return_multivector") else "embedding")


def run_load(url, expected, requests, clients, per_client, tol=0.0, offset=0):
    """`clients` threads, each sending `per_client` requests drawn in turn from `requests` (indices into VALID,
    or negative: -1 - index into INVALID), starting `offset` further. Returns (seconds, failures)."""
    failures = []

    def client(c):
        for j in range(offset, offset + per_client):
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
                    raw, want, kind = INVALID[-1 - r]
                    status, out = call(url + "/v1/embeddings", raw=raw, timeout=120, headers={"Content-Type": kind})
                    ok = status == want and "message" in out["error"]
            except Exception as e:  # a dropped connection is a failure too
                ok, status = False, repr(e)
            if not ok:
                failures.append((r, status))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start_time = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start_time, failures


@pytest.fixture(scope="module")
def expected(models, remote):
    model = models(CKPT)
    page = base64.b64encode(PAGE).decode()
    local = [json.loads(json.dumps(b).replace(f"{remote}/page.png", page)) for b in VALID]  # the URL's bytes
    return [offline(model, b) for b in local]


def test_load_and_throughput(checkpoints, expected, batch_tol, tmp_path, remote):
    """Rounds of 16 clients x 12 requests, 1 in 3 invalid, image URLs among them: RSS flat from round to round
    once warm; then the valid text requests alone, batched and one at a time."""
    mix = [0, 1, -1, 2, 3, -2, 4, 5, -3, 6, 7, -4, 0, 1, -5, 2, 3, -6, 7, 4, -7, 5, 6, -8, 0, 7, -9, 1, -10]
    tol = batch_tol(CKPT)
    proc, url = start(
        checkpoints[CKPT],
        tmp_path / "a.log",
        "--max-items",
        16,
        "--max-body-bytes",
        200_000,
        "--allow-urls",
        "--allow-private-urls",
    )
    try:
        run_load(url, expected, list(range(len(VALID))), CLIENTS, 2, tol=tol)  # warm-up: every kind once
        rss, seconds = [rss_mb(proc.pid)], 0.0
        for r in range(ROUNDS):
            took, failures = run_load(url, expected, mix, CLIENTS, PER_ROUND, tol=tol, offset=r * PER_ROUND)
            rss.append(rss_mb(proc.pid))
            seconds += took
            assert not failures, failures[:10]
        assert proc.poll() is None and call(url + "/health")[1]["status"] == "ok"
        print(
            f"\nRSS after warm-up and after each round: {', '.join(f'{m:.0f}' for m in rss)} MB; "
            f"{ROUNDS * CLIENTS * PER_ROUND} mixed requests in {seconds:.1f} s"
        )
        growth = max(rss[2:]) - rss[1]
        assert growth < 40, f"RSS grew by {growth:.0f} MB after the first round"
        health = call(url + "/health")[1]
        assert health["pending_tokens"] == health["pending_pixels"] == health["in_flight"] == 0
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
        assert status == 200, out
        assert torch.allclose(torch.stack(floats(out)), offline(model, body), atol=batch_tol(CKPT), rtol=0)
    with pytest.raises(OSError):  # the port is closed
        call(url + "/health", timeout=5)


def test_an_api_key_on_the_command_line_leaves_it(checkpoints, tmp_path):
    """`--api-key` is moved into the environment as the server starts again (other users read a command line in
    ps, not another user's environment): the running process's command line no longer holds it."""
    proc, url = start(checkpoints[CKPT], tmp_path / "d.log", "--api-key", "s3cret-in-argv")
    try:
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().split(b"\0")
        environ = open(f"/proc/{proc.pid}/environ", "rb").read().split(b"\0")
        assert cmdline[1:3] == [b"-m", b"jina_v4"] and not any(b"s3cret" in a for a in cmdline), cmdline
        assert b"JINA_V4_API_KEY=s3cret-in-argv" in environ
        assert call(url + "/v1/embeddings", {"input": "a"})[0] == 401
        assert call(url + "/v1/embeddings", {"input": "a"}, key="s3cret-in-argv")[0] == 200
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    log = (tmp_path / "d.log").read_text()
    assert "visible to other users" not in log and "s3cret" not in log
    assert log.splitlines()[0] == "jina-v4: float32 on cpu (the checkpoint's dtype)"  # the dtype line, once
    assert log.count("jina-v4: float32 on cpu") == 1


def wait_busy(url, deadline_s=120):
    """Until /health shows the worker inside a model call; -> that /health."""
    deadline = time.time() + deadline_s
    while True:
        health = call(url + "/health")[1]
        if health["worker"]["state"] == "busy":
            return health
        assert time.time() < deadline, health
        time.sleep(0.01)


def test_sigterm_during_a_long_model_call_exits_within_the_graceful_time(checkpoints, tmp_path):
    """A 32,768-token text is one model step of about 50 s here. SIGTERM with --graceful-timeout 3: its client and a
    kept-alive client queued behind it get a JSON 503 (with "Connection: close", so the kept-alive client opens a
    new connection next time, and is refused, instead of writing into a closed one), and the process exits 0 within
    the graceful time plus 5 s, the model call still running."""
    proc, url = start(checkpoints[CKPT], tmp_path / "e.log", "--graceful-timeout", 3, "--max-length", 32768)
    port = int(url.rsplit(":", 1)[1])
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}

    def post(body):
        kept.request("POST", "/v1/embeddings", json.dumps(body), headers)
        r = kept.getresponse()
        return r.status, r.getheader("connection"), json.loads(r.read())

    try:
        assert post({"input": ["before"]})[:2] == (200, None)  # a kept-alive connection
        long = [None]
        sender = threading.Thread(
            target=lambda: long.__setitem__(0, call(url + "/v1/embeddings", {"input": ["word " * 8000]}, timeout=120))
        )
        sender.start()
        assert wait_busy(url)["worker"]["tokens"] >= 32768
        queued = [None]
        waiter = threading.Thread(target=lambda: queued.__setitem__(0, post({"input": ["queued behind"]})))
        waiter.start()
        deadline = time.time() + 60
        while call(url + "/health")[1]["queued"] < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(3 + 5) == 0
        took = time.monotonic() - t0
        sender.join(30)
        waiter.join(30)
        print(f"SIGTERM -> exit: {took:.1f} s with --graceful-timeout 3 and a model call of about 50 s in flight")
        status, connection, out = queued[0]
        assert status == 503 and connection == "close" and "shutting down" in out["error"]["message"], queued
        assert long[0][0] == 503 and "shutting down" in long[0][1]["error"]["message"], long
        with pytest.raises(ConnectionRefusedError):  # a new connection, to a closed port: no broken pipe
            post({"input": ["after"]})
    finally:
        kept.close()
        if proc.poll() is None:
            proc.kill()


def test_a_short_request_is_not_stuck_behind_a_long_one(checkpoints, tmp_path):
    """--max-batch-tokens 2048: a request of 8 texts of about 2,000 tokens runs in 8 steps; short requests sent while
    it runs are answered within about one step, each, and the first before the long one (it has 7 steps of margin)."""
    proc, url = start(checkpoints[CKPT], tmp_path / "f.log", "--max-batch-tokens", 2048)
    long_body = {"input": [f"text {i} " + "word " * 400 for i in range(8)]}
    try:
        t0 = time.perf_counter()
        call(url + "/v1/embeddings", {"input": ["word " * 400]})
        one_step = time.perf_counter() - t0  # about one step: one text of the long request
        done = {}

        def send_long():
            call(url + "/v1/embeddings", long_body, timeout=120)
            done["long"] = time.perf_counter()

        sender = threading.Thread(target=send_long)
        started = time.perf_counter()
        sender.start()
        wait_busy(url)
        waits = []
        while "long" not in done and len(waits) < 40:
            t = time.perf_counter()
            assert call(url + "/v1/embeddings", {"input": ["a short query"]})[0] == 200
            waits.append(time.perf_counter() - t)
            done.setdefault("short", time.perf_counter())
        sender.join(120)
        assert done["short"] < done["long"], "the first short request should finish before the long one"
        print(
            f"long request {done['long'] - started:.2f} s in 8 steps of about {one_step * 1000:.0f} ms; "
            f"{len(waits)} short requests meanwhile: median {sorted(waits)[len(waits) // 2] * 1000:.0f} ms, "
            f"worst {max(waits) * 1000:.0f} ms"
        )
    finally:
        proc.terminate()
        proc.wait(60)
