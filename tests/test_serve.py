"""`jina-v4 serve` in-process on 127.0.0.1: both request formats answered as the offline API answers them (the
real `openai` client included), the announcement's request, dynamic batching that keeps requests apart, and every
refusal as a JSON error that names the input while the server stays up."""

import base64
import functools
import http.server
import io
import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from openai import AuthenticationError, BadRequestError, OpenAI
from PIL import Image

from jina_v4 import encode_chunks
from jina_v4.apps.http_formats import Limits
from jina_v4.apps.serve import create_app, make_server
from jina_v4.model.processing import Item

CKPT = "gqa4-single"
LIMITS = dict(max_items=64, max_tokens=30000, max_body_bytes=2_000_000, max_image_pixels=1_000_000)
SUNSET = [
    "غروب جميل على الشاطئ",
    "海滩上美丽的日落",
    "A beautiful sunset over the beach",
    "Un beau coucher de soleil sur la plage",
    "Ein wunderschöner Sonnenuntergang am Strand",
]


class Server:
    """uvicorn serving `app` from a thread, on a free port of 127.0.0.1, as `jina-v4 serve` runs it (make_server)."""

    def __init__(self, app, **kw):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.app, self.server = app, make_server(app, **{"log_level": "warning", **kw})
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.01)
        assert self.server.started

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def call(url, body=None, key=None, raw=None, method=None, timeout=120, headers=None, full=False):
    """-> (status, decoded JSON body), and the response headers with full=True."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {
        "Content-Type": "application/json",
        **({"Authorization": f"Bearer {key}"} if key else {}),
        **(headers or {}),
    }
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, out, got = r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        status, out, got = e.code, json.loads(e.read()), e.headers
    return (status, out, got) if full else (status, out)


def embed(server, body, **kw):
    status, out = call(server.url + "/v1/embeddings", body, **kw)
    assert status == 200, out
    return out


def floats(out, key="embedding"):
    return [torch.tensor(d[key], dtype=torch.float32) for d in out["data"]]


def png(w, h, seed=0, solid=False):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    (Image.new("L", (w, h)) if solid else Image.fromarray(arr)).save(buf, "PNG")
    return buf.getvalue()


def b64(data):
    return base64.b64encode(data).decode()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """No connection leaves 127.0.0.0/8 and no name reaches DNS: such an attempt fails before a packet is sent,
    and fails the test (also when it happens in a server thread, through `violations`)."""
    violations = []
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            ip = ipaddress.ip_address(address[0].split("%")[0])
            if ip.version != 4 or not ip.is_loopback:
                violations.append(f"connect to {address}")
                raise ConnectionRefusedError(f"the test guard refused a connection to {address}")

    def guarded_connect(sock, address):
        check(sock, address)
        return connect(sock, address)

    def guarded_connect_ex(sock, address):
        check(sock, address)
        return connect_ex(sock, address)

    def resolver(host, *args, **kwargs):
        try:
            ipaddress.ip_address(str(host).split("%")[0])
        except ValueError:
            violations.append(f"DNS lookup of {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, "the test guard refused a DNS lookup") from None
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    yield violations
    assert not violations, violations


@pytest.fixture(scope="module")
def model(models):
    return models(CKPT)


@pytest.fixture(scope="module")
def server(model, checkpoints):
    """Image URLs allowed, private addresses too: the test's remote is a server on 127.0.0.1."""
    s = Server(create_app(model, str(checkpoints[CKPT]), Limits(allow_urls=True, allow_private_urls=True, **LIMITS)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict(model, checkpoints):
    """Deterministic, behind a key, image URLs refused."""
    s = Server(create_app(model, str(checkpoints[CKPT]), Limits(**LIMITS), api_key="secret", deterministic=True))
    yield s
    s.stop()


class Web(str):
    """The loopback remote's base URL; `completed` counts the slow answers sent to their end."""

    completed: Counter


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A loopback HTTP server with two PNGs, a file over the size cap, a redirect to an ftp:// URL, and /slow: a
    valid PNG sent one byte every 50 ms (its answer takes 10 s and more)."""
    d = tmp_path_factory.mktemp("web")
    (d / "beach1.png").write_bytes(png(96, 64, 1))
    (d / "beach2.png").write_bytes(png(50, 80, 2))
    (d / "big.png").write_bytes(png(96, 64, 3) + os.urandom(LIMITS["max_body_bytes"]))
    completed = Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow":
                data = png(8, 8) + b"\0" * 200
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for b in data:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                        time.sleep(0.05)
                    completed[self.path] += 1
                except OSError:  # the fetch gave up and closed the connection
                    pass
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "ftp://127.0.0.1:1/beach1.png")
                self.end_headers()
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(d)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = Web(f"http://127.0.0.1:{httpd.server_address[1]}")
    base.completed = completed
    yield base, d
    httpd.shutdown()


@pytest.mark.parametrize(
    "jina_task,task,prompt",
    [
        ("retrieval.query", "retrieval", "query"),
        ("retrieval.passage", "retrieval", "passage"),
        ("text-matching", "text-matching", "query"),
        ("code.query", "code", "query"),
        ("code.passage", "code", "passage"),
    ],
)
def test_jina_tasks_match_the_offline_api(server, model, batch_tol, jina_task, task, prompt):
    texts = ["first text", "zweiter Text", "def f(x): return x"]
    body = {
        "model": "jina-embeddings-v4",
        "task": jina_task,
        "dimensions": 16,
        "input": [texts[0]] + [{"text": t} for t in texts[1:]],
    }  # strings and objects
    out = embed(server, body)
    assert out["object"] == "list" and out["model"] == "jina-embeddings-v4"
    assert [d["index"] for d in out["data"]] == [0, 1, 2] and {d["object"] for d in out["data"]} == {"embedding"}
    items = model.prepare(texts, task, prompt)
    assert out["usage"] == {
        "total_tokens": sum(len(it.input_ids) for it in items),
        "prompt_tokens": sum(len(it.input_ids) for it in items),
    }
    expected = model.encode(texts, task=task, prompt_name=prompt, truncate_dim=16)
    assert torch.allclose(torch.stack(floats(out)), expected, atol=batch_tol(CKPT), rtol=0)


def test_embedding_types_decode_to_the_same_vector(server, model, batch_tol):
    out = embed(server, {"input": ["a text", "another"], "embedding_type": ["float", "base64", "binary", "ubinary"]})
    expected = model.encode(["a text", "another"], task="text-matching").numpy()
    for d, e in zip(out["data"], expected):
        got = d["embedding"]
        assert set(got) == {"float", "base64", "binary", "ubinary"}
        assert np.array_equal(np.frombuffer(base64.b64decode(got["base64"]), "<f4"), np.float32(got["float"]))
        assert np.array_equal(np.uint8(got["ubinary"]), np.packbits(e > 0))
        assert np.array_equal(np.int16(got["binary"]), np.packbits(e > 0).astype(np.int16) - 128)
        assert np.allclose(got["float"], e, atol=batch_tol(CKPT), rtol=0)
    one = embed(server, {"input": ["a text"], "embedding_type": "base64"})
    assert isinstance(one["data"][0]["embedding"], str)


def test_multivectors_of_texts_and_images(server, model, batch_tol):
    image = png(60, 90, 5)
    inputs = ["a passage", {"image": b64(image)}, {"image": "data:image/png;base64," + b64(image)}]
    out = embed(server, {"task": "retrieval.passage", "return_multivector": True, "input": inputs})
    expected = model.encode(
        ["a passage", {"image": image}, {"image": image}],
        task="retrieval",
        prompt_name="passage",
        return_multivector=True,
    )
    for got, e in zip(floats(out, "embeddings"), expected):
        assert got.shape == e.shape and torch.allclose(got, e, atol=batch_tol(CKPT), rtol=0)


def test_the_announcement_request_gets_7_embeddings(server, model, batch_tol, web):
    base, d = web
    body = {
        "model": "jina-embeddings-v4",
        "task": "text-matching",
        "input": [{"text": t} for t in SUNSET] + [{"image": f"{base}/beach1.png"}, {"image": f"{base}/beach2.png"}],
    }
    out = embed(server, body)
    assert len(out["data"]) == 7 and [x["index"] for x in out["data"]] == list(range(7))
    images = [Image.open(d / "beach1.png"), Image.open(d / "beach2.png")]
    expected = model.encode(SUNSET + images, task="text-matching")
    assert torch.allclose(torch.stack(floats(out)), expected, atol=batch_tol(CKPT), rtol=0)


def test_late_chunking_equals_encode_chunks(server, model, batch_tol):
    chunks = ["Late chunking embeds a document once.", "Each chunk pools its own tokens.", "The last one."]
    out = embed(server, {"task": "retrieval.passage", "late_chunking": True, "input": chunks, "dimensions": 32})
    text = " ".join(chunks)  # the documented join
    spans = [(text.index(c), text.index(c) + len(c)) for c in chunks]
    expected, _ = encode_chunks(model, text, spans, task="retrieval", prompt_name="passage", truncate_dim=32)
    assert len(out["data"]) == 3 and torch.allclose(torch.stack(floats(out)), expected, atol=batch_tol(CKPT), rtol=0)
    body = {"late_chunking": True, "input": ["a", {"image": b64(png(30, 30))}]}
    status, err = call(server.url + "/v1/embeddings", body)
    assert status == 400 and err["error"]["index"] == 1 and "texts only" in err["error"]["message"]


def test_truncate(model, batch_tol, checkpoints):
    s = Server(create_app(model, str(checkpoints[CKPT]), Limits(max_length=12)))
    try:
        texts = ["short", "a text that is well over eight tokens long, surely"]
        status, err = call(s.url + "/v1/embeddings", {"input": texts, "truncate": False})
        assert status == 400 and err["error"]["index"] == 1 and "max_length=12" in err["error"]["message"]
        out = embed(s, {"input": texts})  # truncate defaults to true: cut at max_length
        expected = model.encode(texts, task="text-matching", max_length=12)
        assert torch.allclose(torch.stack(floats(out)), expected, atol=batch_tol(CKPT), rtol=0)
    finally:
        s.stop()


def test_openai_client_and_key(strict, model):
    client = OpenAI(base_url=f"{strict.url}/v1", api_key="secret", max_retries=0)
    texts = ["hello world", "second text", " "]
    r = client.embeddings.create(model="jina-embeddings-v4", input=texts)  # the client asks for base64
    expected = model.encode(texts, task="text-matching", deterministic=True)
    assert torch.equal(torch.tensor([d.embedding for d in r.data], dtype=torch.float32), expected)
    r = client.embeddings.create(
        model="jina-embeddings-v4", input="one", dimensions=16, encoding_format="float", user="someone"
    )  # `user` is accepted and ignored
    assert torch.equal(
        torch.tensor(r.data[0].embedding),
        model.encode(["one"], task="text-matching", truncate_dim=16, deterministic=True)[0],
    )
    ids = [[5, 17, 300, 2], [9, 9]]  # token ids: embedded as given, no prompt prefix
    r = client.embeddings.create(model="jina-embeddings-v4", input=ids)
    expected = model.encode_items([Item(i, "text-matching") for i in ids], deterministic=True)
    assert torch.equal(torch.tensor([d.embedding for d in r.data]), expected) and r.usage.total_tokens == 6
    with pytest.raises(BadRequestError, match="valid values are"):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(BadRequestError, match=r"input\[1\] is an empty text"):  # as OpenAI's own API refuses it
        client.embeddings.create(model="jina-embeddings-v4", input=["x", ""])
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{strict.url}/v1", api_key="wrong", max_retries=0).embeddings.create(model="x", input="a")
    assert call(strict.url + "/v1/embeddings", {"input": "a"})[0] == 401
    assert call(strict.url + "/v1/models")[0] == 401
    status, models = call(strict.url + "/v1/models", key="secret")
    assert status == 200 and "jina-embeddings-v4" in [m["id"] for m in models["data"]]
    status, health = call(strict.url + "/health")  # no key: a liveness probe
    assert status == 200 and health["status"] == "ok"


def bomb():
    """A 1x1 PNG whose header claims 100000 x 100000 pixels (PIL's decompression-bomb guard)."""
    data = bytearray(png(1, 1))
    data[16:24] = struct.pack(">II", 100000, 100000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


REFUSALS = [  # (body, raw bytes, status, words in the message, index)
    (None, b'{"input": ["a",', 400, "not valid JSON", None),
    (["a"], None, 400, "JSON object", None),
    ({"input": "a", "color": "red"}, None, 400, "valid fields are", None),
    ({"input": "a", "task": "retrieval"}, None, 400, "retrieval.query", None),
    ({"input": "a", "model": "gpt"}, None, 400, "jina-embeddings-v4", None),
    ({"input": "a", "dimensions": 10}, None, 400, "[8, 16, 32, 64]", None),
    ({"input": "a", "embedding_type": "int4"}, None, 400, "ubinary", None),
    ({"input": "a", "encoding_format": "hex"}, None, 400, "base64", None),
    ({"input": "a", "return_multivector": True, "dimensions": 8}, None, 400, "single vectors", None),
    ({"input": "a", "normalized": False}, None, 400, "[true]", None),
    ({"input": []}, None, 400, "non-empty", None),
    ({"input": ["a", 3]}, None, 400, "input[1] is int", 1),
    ({"input": ["a", {"video": "x"}]}, None, 400, "input[1]", 1),
    ({"input": [[1, 2], "a"]}, None, 400, "token-id lists", 1),
    ({"input": [[1, 2], [3, 99999]]}, None, 400, "not a token id", 1),
    ({"input": [[1, 412]]}, None, 400, "image placeholder", 0),
    ({"input": ["a", "bad \ud800"]}, None, 400, "lone surrogate", 1),
    ({"input": ["a"] * 65}, None, 413, "--max-items", None),
    ({"input": ["many words " * 300] * 12}, None, 413, "--max-tokens", None),
    ({"input": ["a"], "model": "x" * 2_000_000}, None, 413, "--max-body-bytes", None),
    ({"input": ["a", {"image": "/etc/hostname"}]}, None, 400, "file path", 1),
    ({"input": [{"image": "~/page.png"}]}, None, 400, "file path", 0),
    ({"input": [{"image": "file:///etc/hostname"}]}, None, 400, "file://", 0),
    ({"input": [{"image": "ftp://127.0.0.1/x.png"}]}, None, 400, "http(s)", 0),
    ({"input": [{"image": "not an image at all!"}]}, None, 400, "neither", 0),
    ({"input": [{"image": b64(b"GIF89a but not really a gif")}]}, None, 400, "not a decodable image", 0),
    ({"input": ["a", {"image": b64(png(40, 40)[:60])}]}, None, 400, "not a decodable image", 1),
    ({"input": [{"image": b64(bomb())}]}, None, 400, "DecompressionBomb", 0),
    ({"input": [{"image": b64(png(1100, 1000, solid=True))}]}, None, 400, "--max-image-pixels", 0),
    ({"input": [{"image": b64(png(600, 2))}]}, None, 400, "aspect ratio", 0),
    ({"input": [[]]}, None, 400, "empty token-id list", 0),
    ({"input": [[5], []]}, None, 400, "empty token-id list", 1),
    ({"input": ""}, None, 400, "empty text", 0),
    ({"input": ["a", {"text": ""}]}, None, 400, "empty text", 1),
    ({"input": [{"image": b64(b"%PDF-1.7\n/Type /Catalog /Pages 2 0 R\n" * 3)}]}, None, 400, "image formats", 0),
    ({"input": [{"image": b64(b"\x00\x00\x01\x00 an icon, not read here" * 4)}]}, None, 400, "image formats", 0),
    ({"input": [{"image": b64(b"BM but no bitmap")}]}, None, 400, "none of PNG, JPEG", 0),
    ({"input": "a", "model": "/etc"}, None, 400, '"jina-embeddings-v4"', None),
]


@pytest.mark.parametrize("body,raw,status,words,index", REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_refusals(server, model, checkpoints, body, raw, status, words, index):
    got, out = call(server.url + "/v1/embeddings", body, raw=raw)
    message = out["error"]["message"]
    assert got == status and words in message, out
    assert out["error"]["index"] == index and (index is None or f"input[{index}]" in message)
    assert not re.search(r"0x[0-9a-fA-F]{6}|Traceback|File \"", message) and str(checkpoints[CKPT]) not in message
    assert "file path" not in message or "file path" in words  # base64 of another format is not called a path
    assert embed(server, {"input": ["still up"]})["data"][0]["index"] == 0


def test_image_urls(server, strict, web, model):
    """The remote's failures are told in the server's words only: no status, no reason, no Location."""
    base, _ = web
    for url, words in [
        (f"{base}/big.png", "size cap"),
        (f"{base}/missing.png", "the image URL could not be fetched"),
        (f"{base}/redirect", "was redirected to a URL that is not http(s)"),
    ]:
        status, out = call(server.url + "/v1/embeddings", {"input": ["a", {"image": url}]})
        message = out["error"]["message"]
        assert status == 400 and words in message and out["error"]["index"] == 1, out
        assert not re.search(r"404|Not Found|ftp:|HTTPError|Errno", message), message
    status, out = call(strict.url + "/v1/embeddings", {"input": [{"image": f"{base}/beach1.png"}]}, key="secret")
    assert status == 400 and "--allow-urls" in out["error"]["message"]


def test_a_slow_url_meets_its_deadline(model, web):
    """/slow sends one byte every 50 ms for over 10 s: the fetch gives up at its 0.5 s deadline, all of the fetch
    (not per read), and the answer comes while the remote is still sending (an event, not a clock reading)."""
    base, _ = web
    s = Server(create_app(model, "tiny", Limits(allow_urls=True, allow_private_urls=True, url_timeout=0.5)))
    try:
        status, out = call(s.url + "/v1/embeddings", {"input": [{"image": f"{base}/slow"}]})
        assert base.completed["/slow"] == 0, "the remote finished sending before the answer came"
        assert status == 400 and "took over 0.5 s (--url-timeout)" in out["error"]["message"], out
    finally:
        s.stop()


def requests_mix():
    """Requests of different sizes, tasks and kinds: who batches with whom must not change any answer."""
    img = png(70, 50, 9)
    mix = []
    for k in range(12):
        texts = [f"request {k} item {j} " + "word " * (k * 3 + j) for j in range(1 + k % 4)]
        task = ["retrieval.query", "retrieval.passage", "text-matching", "code.query"][k % 4]
        body = {"task": task, "input": texts + ([{"image": b64(img)}] if k % 3 == 0 else [])}
        if k % 5 == 1:
            body["return_multivector"] = True
        elif k % 5 == 2:
            body["dimensions"] = 8
        mix.append(body)
    return mix


def offline(model, body, deterministic=False):
    from jina_v4.apps.http_formats import http_tasks

    task, prompt = http_tasks(model.tasks)[body.get("task", "text-matching")]
    inputs = [
        {"image": base64.b64decode(x["image"])} if isinstance(x, dict) and "image" in x else x for x in body["input"]
    ]
    return model.encode(
        inputs,
        task=task,
        prompt_name=prompt,
        truncate_dim=body.get("dimensions"),
        return_multivector=body.get("return_multivector", False),
        deterministic=deterministic,
    )


def concurrently(server, bodies, key=None):
    """Send all bodies while the model worker is held inside its first model call, so that they queue and batch:
    a gate, not a race with the clock (the worker resumes once every body is queued)."""
    worker = server.app.state.worker
    entered, gate, results = threading.Event(), threading.Event(), [None] * (len(bodies) + 1)

    def held(group):
        del worker.encode  # later calls go straight to the method
        entered.set()
        assert gate.wait(120)
        return worker.encode(group)

    worker.encode = held
    first = threading.Thread(
        target=lambda: results.__setitem__(
            -1, call(server.url + "/v1/embeddings", {"input": ["the first request"] * 12}, key=key)
        )
    )
    first.start()
    assert entered.wait(120)

    def send(i):
        results[i] = call(server.url + "/v1/embeddings", bodies[i], key=key)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120  # a bound on a hang; the queue's length ends the wait
    while len(worker.pending) < len(bodies):
        assert time.monotonic() < deadline and all(r is None for r in results[:-1]), "a request was not queued"
        time.sleep(0.002)
    gate.set()
    for t in threads + [first]:
        t.join()
    assert results[-1][0] == 200 and len(results[-1][1]["data"]) == 12
    return results[:-1]


def check_answers(bodies, results, expected, exact, tol=0.0):
    for body, (status, out), e in zip(bodies, results, expected):
        key = "embeddings" if body.get("return_multivector") else "embedding"
        assert status == 200 and [d["index"] for d in out["data"]] == list(range(len(body["input"])))
        for got, want in zip(floats(out, key), e):
            assert got.shape == want.shape
            assert torch.equal(got, want) if exact else torch.allclose(got, want, atol=tol, rtol=0)


def test_dynamic_batching_keeps_requests_apart(server, model, batch_tol):
    bodies = requests_mix()
    expected = [offline(model, b) for b in bodies]
    before = call(server.url + "/health")[1]
    results = concurrently(server, bodies)
    after = call(server.url + "/health")[1]
    calls, answered = after["model_calls"] - before["model_calls"], after["requests"] - before["requests"]
    assert answered == len(bodies) + 1 and calls < answered, "the queued requests should share model calls"
    check_answers(bodies, results, expected, exact=False, tol=batch_tol(CKPT))


def test_deterministic_answers_are_bit_exact(strict, model):
    """--deterministic: whatever is packed with it, a request's answer is the offline API's, bit for bit."""
    bodies = requests_mix()
    expected = [offline(model, b, deterministic=True) for b in bodies]
    before = call(strict.url + "/health")[1]
    results = concurrently(strict, bodies, key="secret")
    after = call(strict.url + "/health")[1]
    calls, answered = after["model_calls"] - before["model_calls"], after["requests"] - before["requests"]
    assert answered == len(bodies) + 1 and calls < answered, "the queued requests should share model calls"
    check_answers(bodies, results, expected, exact=True)


class StubModel:
    """What the worker reads of a model: its token budget and Matryoshka dims."""

    max_batch_tokens = 100
    config = types.SimpleNamespace(matryoshka_dims=(8,))


class StubEncode:
    """pipeline.encode's stand-in: waits for `go`, records the first id of every item it gets, fails on a "bad"
    item, and gives each item the vector [first id]."""

    def __init__(self):
        self.go, self.calls = threading.Event(), []

    def __call__(self, model, items, head, batch_size=None, deterministic=False, errors="raise"):
        assert self.go.wait(30)
        self.calls.append([it.input_ids[0] for it in items])
        if any(it.task == "bad" for it in items):
            raise ValueError("a bad item")
        return [torch.tensor([float(it.input_ids[0])]) for it in items]


def test_worker_packs_by_settings_budget_and_count(monkeypatch):
    import jina_v4.apps.serve
    from jina_v4.apps.http_formats import RequestError
    from jina_v4.apps.serve import Job, Worker

    def job(first, n, key=(False, None), task="t"):  # n items of 10 tokens each
        return Job([Item([first + i] + [0] * 9, task) for i in range(n)], key, 10 * n)

    model = StubEncode()
    monkeypatch.setattr(jina_v4.apps.serve, "encode", model)
    worker = Worker(StubModel(), max_requests=3, max_queued=7)
    first = worker.submit(job(0, 1))
    while worker.pending:  # the worker holds the first job, waiting for `go`
        time.sleep(0.001)
    jobs = [
        job(100, 2),
        job(200, 1, key=(True, None)),
        job(300, 3),
        job(400, 1, task="bad"),
        job(500, 5),
        job(600, 1),
        job(700, 5),
    ]
    futures = [worker.submit(j) for j in jobs]
    with pytest.raises(RequestError) as full:
        worker.submit(job(800, 1))
    assert full.value.status == 503
    model.go.set()
    assert [v.tolist() for v in first.result(30)] == [[0.0]]
    assert [[v.item() for v in f.result(30)] for f in (futures[0], futures[2], futures[4], futures[5])] == [
        [100, 101],
        [300, 301, 302],
        [500, 501, 502, 503, 504],
        [600],
    ]
    assert [v.item() for v in futures[6].result(30)] == [700, 701, 702, 703, 704]
    with pytest.raises(ValueError, match="a bad item"):
        futures[3].result(30)
    assert [v.item() for v in futures[1].result(30)] == [200]
    worker.close()
    # the same settings pack up to 3 requests; the bad one's batch is rerun one request at a time; other settings
    # wait for their own call; the 100-token budget keeps the last one out of the 500 + 600 call
    assert model.calls == [
        [0],
        [100, 101, 300, 301, 302, 400],
        [100, 101],
        [300, 301, 302],
        [400],
        [200],
        [500, 501, 502, 503, 504, 600],
        [700, 701, 702, 703, 704],
    ]


def test_404_and_405_are_json(server):
    assert call(server.url + "/nowhere")[0] == 404
    status, out = call(server.url + "/v1/embeddings")
    assert status == 405 and "error" in out


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_bodies_that_are_not_json_get_415(server, content_type):
    status, out = call(server.url + "/v1/embeddings", {"input": "a"}, headers={"Content-Type": content_type})
    assert status == 415 and "application/json" in out["error"]["message"] and content_type in out["error"]["message"]
    for ok in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert call(server.url + "/v1/embeddings", {"input": "a"}, headers={"Content-Type": ok})[0] == 200


def test_no_server_path_reaches_a_client(server, checkpoints):
    """/health, /v1/models and the unknown-model error name the checkpoint by its directory's name only."""
    path = str(checkpoints[CKPT])
    answers = [call(server.url + "/health")[1], call(server.url + "/v1/models")[1]]
    answers.append(call(server.url + "/v1/embeddings", {"input": "a", "model": "x"})[1])
    assert all(path not in json.dumps(a) for a in answers)
    assert answers[0]["model"] == CKPT and [m["id"] for m in answers[1]["data"]] == ["jina-embeddings-v4", CKPT]
    assert call(server.url + "/v1/embeddings", {"input": "a", "model": CKPT})[0] == 200


def test_a_failure_inside_the_model_tells_the_client_nothing_of_the_server(server, monkeypatch):
    worker = server.app.state.worker

    def broken(group):
        raise RuntimeError(f"at <_io.BytesIO object at 0x7f3a2b1c4d50> in {__file__}")

    monkeypatch.setattr(worker, "encode", broken)
    status, out = call(server.url + "/v1/embeddings", {"input": ["a"]})
    assert status == 500 and out["error"]["message"] == "internal error; the server's log has the details"


def test_serve_without_the_extra(checkpoints):
    """Without starlette, `serve` says what to install in one line, and `embed` still works."""
    code = "import sys; sys.modules['starlette'] = None; from jina_v4.apps.cli import main; sys.exit(main({}))"
    ckpt = str(checkpoints[CKPT])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code.format(["serve", "--model", ckpt])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "jina-v4: error: jina-v4 serve needs starlette and uvicorn: pip install 'jina_v4[serve]'"
    ]
    out = subprocess.run(
        [sys.executable, "-c", code.format(["embed", "a text", "--model", ckpt, "--quiet"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0 and len(json.loads(out.stdout.splitlines()[0])["embedding"]) == 64, out.stderr
