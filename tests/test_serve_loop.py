"""`jina-v4 serve` keeps its event loop free: what holds the GIL on a request's path is cut into short calls. The
pre-scan that bounds the JSON values of a body before json.loads (exact against a count of the parsed values),
the answer written piece by piece (equal to the whole answer's JSON), the answer's size refused before the model
runs; then a real server, polled on /health every 50 ms from another connection while it answers a large
multi-vector request, refuses a 24 MB body of empty lists (and gives its memory back) and cuts an 8 MB text."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jina_v4.apps.http_formats import (
    Limits,
    Request,
    RequestError,
    answer,
    answer_bytes,
    answer_pieces,
    json_values,
    read_json,
    values_needed,
)

from test_serve import call, loopback_only  # noqa: F401 (an autouse guard)
from test_serve_limits import CKPT, serving

# ---- the pre-scan: a bound on json.loads' work, found at C speed ---------------------------------------------------


def parsed_values(x) -> int:
    """Values and keys in a parsed JSON document."""
    if isinstance(x, list):
        return 1 + sum(parsed_values(v) for v in x)
    if isinstance(x, dict):
        return 1 + sum(1 + parsed_values(v) for v in x.values())
    return 1


TRICKY = st.text(alphabet='ab,:[]{}"\\/\n é\u2028', max_size=12)
DOCS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TRICKY,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TRICKY, inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(DOCS, st.booleans(), st.integers(-3, 3))
def test_the_pre_scan_says_over_exactly_when_json_loads_would_make_more(doc, ascii_, shift):
    """Strings full of quotes, backslashes and separators: the count is over a bound exactly when the parsed
    values are, never below them when it is not, and exact when it had to look past the strings."""
    body = json.dumps(doc, ensure_ascii=ascii_).encode()
    actual = parsed_values(doc)
    for most in (0, actual + shift, 10**9):
        n = json_values(body, most)
        assert (n > most) == (actual > most) and (n > most or n >= actual), (most, n, actual)
    quotes = body.count(b'"')
    if 1 + sum(body.count(bytes([c])) for c in b"[{,:") > quotes:  # the count goes past the strings
        assert json_values(body, quotes) == actual


def test_the_pre_scan_of_24_mb_is_quick_and_builds_nothing():
    body = b'{"input": [' + b",".join([b"[]"] * 8_000_000) + b"]}"
    limits = Limits()
    start = time.process_time()
    with pytest.raises(RequestError) as e:
        read_json(body, limits)
    assert time.process_time() - start < 2.0  # about 0.05 s; json.loads of it took 10 s and more
    assert e.value.status == 413 and "--max-items (2048)" in str(e.value) and "8,000,00" in str(e.value)
    within = b'{"input": [' + b",".join([b'"a"'] * limits.max_items) + b"]}"
    assert len(read_json(within, limits)["input"]) == limits.max_items
    ids = b'{"input": [[' + b",".join([b"7"] * (limits.max_tokens - 10)) + b"]]}"
    assert json_values(ids, values_needed(limits)) <= values_needed(limits)


def test_a_text_full_of_separators_is_not_mistaken_for_values():
    text = '{"a": [1, 2], "b": "\\"quoted\\" \\\\"}, ' * 200_000  # 1.4 M separators, all inside one string
    body = json.dumps({"input": [text, "b"], "task": "text-matching"}).encode()
    assert json_values(body, 100) == 1 + 2 + 1 + 2 + 1  # the object, 2 keys, the list and its 2 strings, a value
    assert read_json(body, Limits())["input"][0] == text


# ---- the answer, piece by piece ----------------------------------------------------------------------------------


def request(types, multivector=False, keyed=False):
    return Request("jina-embeddings-v4", ["x"], "text-matching", None, types, keyed, multivector, False, True)


@pytest.mark.parametrize(
    "types,keyed,multivector",
    [
        (["float"], False, False),
        (["float"], False, True),
        (["base64"], False, True),
        (["ubinary"], False, True),
        (["float", "base64", "binary", "ubinary"], True, True),
        (["float", "base64", "binary", "ubinary"], True, False),
    ],
)
def test_the_pieces_make_the_whole_answer(types, keyed, multivector):
    rng = np.random.default_rng(0)
    shapes = [(37, 16), (1, 16), (5, 16)] if multivector else [(16,), (16,), (16,)]
    vectors = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    r = request(types, multivector, keyed)
    pieces = list(answer_pieces(r, vectors, 43, numbers=48))  # 3 rows of 16 per piece
    assert json.loads(b"".join(pieces)) == answer(r, vectors, 43)
    rows = [len(v) if multivector else 1 for v in vectors]
    assert len(b"".join(pieces)) <= answer_bytes(r, rows, 16)
    if multivector:
        assert len(pieces) > 4 * len(types) + 10 and max(map(len, pieces)) < 4000  # 37 rows in 13 pieces


def test_the_answer_bound_holds_for_the_longest_floats():
    v = np.full((3, 128), -1.2345678e-38, dtype=np.float32)  # the longest reprs: 23 characters each
    r = request(["float"], multivector=True)
    assert len(b"".join(answer_pieces(r, [v], 3))) <= answer_bytes(r, [3], 128)


def test_an_answer_over_the_limit_is_refused_before_the_model_runs(model):
    s = serving(model, max_answer_bytes=200_000)
    try:
        calls = s.app.state.worker.calls
        body = {"input": ["a few words of text"] * 20, "return_multivector": True}
        status, out = call(s.url + "/v1/embeddings", body)
        assert status == 413 and "--max-answer-bytes" in out["error"]["message"] and "base64" in out["error"]["message"]
        assert s.app.state.worker.calls == calls
        assert call(s.url + "/v1/embeddings", {**body, "embedding_type": "base64"})[0] == 200
        assert call(s.url + "/v1/embeddings", {"input": ["a few words of text"] * 20})[0] == 200
    finally:
        s.stop()


def held_tokens(server):
    return call(server.url + "/health")[1]["pending_tokens"]


def test_a_streamed_answer_holds_its_budget_until_sent_or_abandoned(model):
    """An answer over 1 MiB is streamed (no Content-Length); its tokens go back to the budget once it is sent, and
    once its client, which stopped reading after the first bytes of a 12 MB answer, closes the connection."""
    s = serving(model)
    try:
        texts = [f"text {i} with some words in it, and a few more words to make it longer" for i in range(1600)]
        body = json.dumps({"input": texts, "return_multivector": True}).encode()
        req = urllib.request.Request(s.url + "/v1/embeddings", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.headers["Content-Length"] is None and r.headers["Transfer-Encoding"] == "chunked"
            out = json.loads(r.read())
        assert len(out["data"]) == 1600 and len(out["data"][0]["embeddings"][0]) == 24
        assert held_tokens(s) == 0
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.settimeout(120)
        c.connect(("127.0.0.1", int(s.url.rsplit(":", 1)[1])))
        head = f"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n\r\n"
        c.sendall(head.encode() + body)
        assert c.recv(100).startswith(b"HTTP/1.1 200")
        assert held_tokens(s) == out["usage"]["total_tokens"]  # the rest cannot be sent: the client reads no more
        c.close()
        deadline = time.monotonic() + 60  # against a hang only: the count ends the wait
        while held_tokens(s) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held_tokens(s) == 0
        small = call(s.url + "/v1/embeddings", {"input": ["a"]}, full=True)
        assert small[0] == 200 and small[2]["Content-Length"] is not None
    finally:
        s.stop()


@pytest.fixture(scope="module")
def model(models):
    return models(CKPT)


# ---- a real server, polled while it works ------------------------------------------------------------------------


class Poll:
    """GET /health every 50 ms, each on a new connection, from a thread; `worst` is the slowest answer's seconds."""

    def __init__(self, url):
        self.url, self.times, self.failures, self.stop = url, [], [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=120) as r:
                    ok = r.status == 200 and json.loads(r.read())["status"] == "ok"
            except Exception as e:
                ok = repr(e)
            self.times.append(time.monotonic() - start)
            if ok is not True:
                self.failures.append(ok)
            self.stop.wait(0.05)

    def end(self):
        self.stop.set()
        self.thread.join(150)
        return max(self.times)


BOUND = 2.5  # seconds for any /health answer: the loop stalled 11-44 s before; idle it answers in about 5 ms


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    from test_serve_load import start

    log = tmp_path_factory.mktemp("loop") / "server.log"
    proc, url = start(
        checkpoints[CKPT], log, "--max-answer-bytes", 10**9, "--max-length", 1024, "--max-tokens", 300_000
    )
    yield proc, url
    proc.terminate()
    proc.wait(60)


def post(url, raw, timeout=300):
    """-> (status, bytes of the answer, its head, its tail), the answer read in pieces and not kept."""
    req = urllib.request.Request(url + "/v1/embeddings", data=raw, headers={"Content-Type": "application/json"})
    try:
        r = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        r = e
    with r:
        head, size, tail = r.read(200), 0, b""
        size = len(head)
        while chunk := r.read(2**20):
            size, tail = size + len(chunk), (tail + chunk)[-200:]
        return r.status, size, head, tail


@pytest.mark.slow
def test_health_answers_while_a_large_multivector_answer_is_written(server):
    """2,000 short texts as multi-vectors: about 100 MB of JSON on the tiny checkpoint,
    streamed; one json.dumps of it stalled /health."""
    _, url = server
    texts = [f"text number {i} of a request, with a few more words in it to embed; " * 2 for i in range(2000)]
    poll = Poll(url)
    start = time.monotonic()
    status, size, head, tail = post(url, json.dumps({"input": texts, "return_multivector": True}).encode())
    took = time.monotonic() - start
    worst = poll.end()
    print(f"answer: {size / 1e6:.0f} MB in {took:.1f} s; /health: worst {worst:.3f} s over {len(poll.times)} polls")
    assert status == 200 and size > 80e6 and head.startswith(b'{"model": ') and tail.endswith(b"]]}]}"), head
    assert not poll.failures and worst < BOUND, (worst, poll.failures[:3])


@pytest.mark.slow
def test_health_answers_while_a_24_mb_body_of_empty_lists_is_refused(server):
    from test_serve_load import rss_mb

    proc, url = server
    call(url + "/v1/embeddings", {"input": ["warm up"]})
    before = rss_mb(proc.pid)
    body = b'{"input": [' + b",".join([b"[]"] * 8_000_000) + b"]}"
    poll = Poll(url)
    status, size, head, tail = post(url, body)
    worst = poll.end()
    after = rss_mb(proc.pid)
    print(f"/health: worst {worst:.3f} s over {len(poll.times)} polls; RSS {before:.0f} -> {after:.0f} MB")
    assert status == 413 and b"JSON values" in head + tail, head
    assert not poll.failures and worst < BOUND, (worst, poll.failures[:3])
    assert after - before < 150  # 650 MB stayed held when the body was parsed into 8 M lists


@pytest.mark.slow
def test_an_8_mb_text_is_cut_without_stalling_the_loop(server):
    _, url = server
    text = "many words in a long document " * 280_000  # 8.4 MB
    poll = Poll(url)
    status, out = call(url + "/v1/embeddings", {"input": [text, "short"]}, timeout=300)
    worst = poll.end()
    print(f"/health: worst {worst:.3f} s over {len(poll.times)} polls")
    assert status == 200 and len(out["data"]) == 2 and 1024 < out["usage"]["total_tokens"] <= 1024 + 20, out["usage"]
    assert not poll.failures and worst < BOUND, (worst, poll.failures[:3])
