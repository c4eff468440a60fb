"""What bounds the costs a request to `jina-v4 serve` can cause: the URL policy (a pure address check, a patched
resolver whose refused addresses are never connected to, redirects checked hop by hop and capped), one deadline
per fetch and one per request (trickled headers and bodies, slow redirect chains), error texts in the policy's
words only, bodies parsed off the event loop, lanes that keep small requests moving, the token and pixel budget
(503 + Retry-After), JSON 503s at shutdown with a worker that survives cancelled requests, header and keep-alive
timeouts, and the exposure warnings.

Everything runs on 127.0.0.0/8: a loopback HTTP server plays the remote, and a guard fails any test that would
connect anywhere else or look a name up in DNS. Waits are for events (a request entering a hook, a connection
closing), with generous bounds only against a hang."""

import gzip
import http.server
import json
import logging
import socket
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

import jina_v4.apps.serve as serve
from jina_v4.apps import url_fetch
from jina_v4.apps.http_formats import Limits
from jina_v4.apps.serve import create_app, exposure
from jina_v4.apps.url_fetch import Fetcher, FetchError, refusal

from test_serve import Server, b64, call, embed, loopback_only, png  # noqa: F401 (an autouse guard)

CKPT = "gqa4-single"
PNG = png(40, 30, 4)
HANG = 60  # seconds: the bound on waiting for an event, against a hang only


def fake_dns(monkeypatch, names: dict[str, list[str]]):
    """socket.getaddrinfo answering `names` from the table (IP literals as the real one does, through the guard)."""
    real = socket.getaddrinfo

    def lookup(host, port, *args, **kwargs):
        if host in names:
            out = []
            for a in names[host]:
                family = socket.AF_INET6 if ":" in a else socket.AF_INET
                out.append((family, socket.SOCK_STREAM, 6, "", (a, port, 0, 0) if ":" in a else (a, port)))
            return out
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)


def no_connect(monkeypatch) -> list:
    """url_fetch.connect replaced by one that records the address and fails: a refused address must never get
    there."""
    reached = []

    def connect(family, address, timeout):
        reached.append(address[0])
        raise ConnectionRefusedError("the test's connect")

    monkeypatch.setattr(url_fetch, "connect", connect)
    return reached


class Remote:
    """The remote web server, on 127.0.0.1: counts every path it is asked for, and every answer it sent whole."""

    def __init__(self):
        self.hits, self.completed = {}, {}
        remote = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path, _, query = self.path.partition("?")
                remote.hits[path] = remote.hits.get(path, 0) + 1
                try:
                    getattr(remote, "route_" + path.strip("/").split("/")[0].replace("-", "_"))(self, path, query)
                    remote.completed[path] = remote.completed.get(path, 0) + 1
                except OSError:  # the fetch gave up and closed the connection
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def route_img(self, h, path, query):
        h.send_response(200)
        h.send_header("Content-Length", str(len(PNG)))
        h.end_headers()
        h.wfile.write(PNG)

    def route_to(self, h, path, query):  # /to?url=X: a redirect to X
        h.send_response(302)
        h.send_header("Location", urllib.parse.parse_qs(query)["url"][0])
        h.end_headers()

    def route_hops(self, h, path, query):  # /hops/N: N redirects, then the image
        n = int(path.split("/")[2])
        h.send_response(302)
        h.send_header("Location", f"/hops/{n - 1}" if n > 1 else "/img")
        h.end_headers()

    def route_slow_hops(self, h, path, query):  # /slow-hops/N: the same, each answer after 0.25 s
        time.sleep(0.25)
        n = int(path.split("/")[2])
        h.send_response(302)
        h.send_header("Location", f"/slow-hops/{n - 1}" if n > 1 else "/img")
        h.end_headers()

    def route_trickle_headers(self, h, path, query):  # a status line, then header bytes, one every 50 ms (20 s)
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for b in b"X-Padding: " + b"a" * 400:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.05)
        h.wfile.write(b"\r\n\r\n")

    def route_trickle_body(self, h, path, query):  # a PNG one byte every 50 ms (over 20 s)
        data = PNG + b"\0" * 400
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        for b in data:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.05)

    def route_forbidden(self, h, path, query):
        h.send_response(403, "Forbidden by secret-marker-7f3a")
        h.send_header("Location", "http://internal.secret-marker/")
        h.end_headers()
        h.wfile.write(b"secret-marker-7f3a: the admin console lives on port 9999")

    def route_garbage(self, h, path, query):
        h.wfile.write(b"SSH-2.0-OpenSSH_9.6 secret-marker-7f3a\r\n")

    def route_declared_huge(self, h, path, query):  # announces more than the cap, sends nothing
        h.send_response(200)
        h.send_header("Content-Length", str(10**9))
        h.end_headers()

    def route_endless(self, h, path, query):  # no length: bytes until the client stops reading
        h.send_response(200)
        h.end_headers()
        h.wfile.write(PNG)
        for _ in range(64):
            h.wfile.write(b"\0" * 65536)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def remote():
    r = Remote()
    yield r
    r.close()


@pytest.fixture(scope="module")
def model(models):
    return models(CKPT)


def serving(model, **limits):
    return Server(create_app(model, CKPT, Limits(allow_urls=True, **limits)))


def refused(server, inputs, index=0, key=None) -> str:
    status, out = call(server.url + "/v1/embeddings", {"input": inputs}, key=key)
    assert status == 400 and out["error"]["index"] == index, out
    return out["error"]["message"]


# ---- the address policy: a pure function ---------------------------------------------------------------------

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: the IPv4 address itself
    ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("::ffff:169.254.169.254", "link-local"),
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 around 169.254.169.254
    ("fe80::1%eth0", "link-local"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("fd12:3456::1", "private"),
    ("192.0.2.1", "private"),  # documentation (TEST-NET-1)
    ("100.64.0.1", "non-global"),  # carrier-grade NAT
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address,kind", REFUSED)
def test_the_address_policy_refuses(address, kind):
    assert refusal(address) == kind


@pytest.mark.parametrize("address", ALLOWED)
def test_the_address_policy_allows_public_addresses(address):
    assert refusal(address) is None


# ---- the fetch path, with a patched resolver --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,addresses,kind",
    [
        ("metadata.example", ["169.254.169.254"], "link-local"),
        ("db.example", ["10.0.0.5"], "private"),
        ("mixed.example", ["93.184.216.34", "10.0.0.5"], "private"),  # one bad address is enough
        ("v6.example", ["::ffff:127.0.0.1"], "loopback"),
        ("here.example", ["127.0.0.1"], "loopback"),
    ],
)
def test_a_name_that_resolves_to_a_refused_address_is_never_connected(monkeypatch, name, addresses, kind):
    fake_dns(monkeypatch, {name: addresses})
    reached = no_connect(monkeypatch)
    with pytest.raises(FetchError, match=f"names a {kind} address, which this server does not fetch"):
        Fetcher(10**6, 5.0).fetch(f"http://{name}/logo.png", time.monotonic() + HANG)
    assert reached == []
    with pytest.raises(FetchError, match="could not be fetched"):  # allowed: connected, to the checked addresses
        Fetcher(10**6, 5.0, allow_private=True).fetch(f"http://{name}/logo.png", time.monotonic() + HANG)
    assert reached == addresses


def test_the_server_refuses_a_private_name_in_the_policy_s_words(model, monkeypatch):
    fake_dns(monkeypatch, {"metadata.example": ["169.254.169.254"]})
    reached = no_connect(monkeypatch)
    s = serving(model)
    try:
        message = refused(s, ["a", {"image": "http://metadata.example/latest/meta-data/"}], index=1)
        assert message == (
            "input[1]: the image URL names a link-local address, which this server does not fetch (it runs "
            "without --allow-private-urls)"
        )
        assert "169.254" not in message and reached == []
    finally:
        s.stop()


def test_a_redirect_is_checked_before_it_is_followed(model, remote, monkeypatch):
    """The remote (127.0.0.1, let through for this test only) redirects to names and literals that the policy
    refuses: each is refused at its hop, and only the remote was ever connected to."""
    policy = url_fetch.refusal
    monkeypatch.setattr(url_fetch, "refusal", lambda a: None if a == "127.0.0.1" else policy(a))
    fake_dns(monkeypatch, {"metadata.example": ["169.254.169.254"]})
    seen, connect = [], url_fetch.connect

    def recording(family, address, timeout):
        seen.append(address[0])
        return connect(family, address, timeout)

    monkeypatch.setattr(url_fetch, "connect", recording)
    s = serving(model)
    try:
        for target, kind in [
            ("http://metadata.example/latest/meta-data/", "link-local"),
            ("http://10.0.0.5:8080/admin", "private"),
            ("http://[::ffff:127.0.0.2]/", "loopback"),
            ("https://192.168.1.1/", "private"),
        ]:
            url = f"{remote.url}/to?url={urllib.parse.quote(target)}"
            message = refused(s, [{"image": url}])
            assert message.endswith(
                f"was redirected to a {kind} address, which this server does not fetch (it runs "
                "without --allow-private-urls)"
            ), message
        assert set(seen) == {"127.0.0.1"}
        url = f"{remote.url}/to?url={urllib.parse.quote(remote.url + '/img')}"
        assert len(embed(s, {"input": [{"image": url}]})["data"]) == 1  # a redirect the policy allows is followed
    finally:
        s.stop()


def test_redirects_are_capped(model, remote):
    s = serving(model, allow_private_urls=True, max_redirects=2)
    try:
        before = remote.hits.get("/hops/1", 0)
        assert len(embed(s, {"input": [{"image": f"{remote.url}/hops/2"}]})["data"]) == 1
        message = refused(s, [{"image": f"{remote.url}/hops/5"}])
        assert message == "input[0]: the image URL was redirected more than 2 times (the server's limit)"
        assert remote.hits["/hops/5"] == remote.hits["/hops/4"] == remote.hits["/hops/3"] == 1
        assert remote.hits.get("/hops/1", 0) == before + 1  # the capped chain stopped at /hops/3
    finally:
        s.stop()


# ---- deadlines ---------------------------------------------------------------------------------------------------


def test_trickled_headers_meet_the_fetch_deadline(model, remote):
    """A remote sending its headers a byte at a time (each read is quick) is cut off at the fetch's deadline:
    the answer comes while the remote is still sending."""
    s = serving(model, allow_private_urls=True, url_timeout=0.5)
    try:
        message = refused(s, [{"image": f"{remote.url}/trickle-headers"}])
        assert remote.completed.get("/trickle-headers", 0) == 0, "the remote finished before the answer came"
        assert message == "input[0]: the image URL took over 0.5 s (--url-timeout) and was abandoned"
    finally:
        s.stop()


def test_one_deadline_covers_a_redirect_chain(model, remote):
    """Four redirects of 0.25 s each: the 0.5 s deadline is the whole fetch's (each hop alone would meet it)."""
    s = serving(model, allow_private_urls=True, url_timeout=0.5, max_redirects=10)
    try:
        message = refused(s, [{"image": f"{remote.url}/slow-hops/4"}])
        assert message == "input[0]: the image URL took over 0.5 s (--url-timeout) and was abandoned"
    finally:
        s.stop()


def test_one_deadline_covers_all_the_urls_of_a_request(model, remote):
    """Each URL has 30 s, the request 0.6 s: the first image arrives, the trickling second is cut off at the
    request's deadline, and the answer comes while the remote is still sending."""
    s = serving(model, allow_private_urls=True, url_timeout=30, url_request_timeout=0.6)
    try:
        before = remote.completed.get("/trickle-body", 0)
        inputs = [{"image": f"{remote.url}/img"}, {"image": f"{remote.url}/trickle-body"}]
        message = refused(s, inputs + [{"image": f"{remote.url}/img"}], index=1)
        assert remote.completed.get("/trickle-body", 0) == before, "the remote finished before the answer came"
        assert message == "input[1]: the image URL ran past the request's deadline and was abandoned"
    finally:
        s.stop()


# ---- what a client is told ----------------------------------------------------------------------------------------


def test_the_remote_s_answer_never_reaches_the_client(model, remote):
    """A 403 with a telling reason, body and Location, a non-HTTP service, a closed port: all are "could not be
    fetched", so that a caller cannot scan hosts and ports through the server."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: a connection is refused
    s = serving(model, allow_private_urls=True)
    try:
        for url in (f"{remote.url}/forbidden", f"{remote.url}/garbage", f"http://127.0.0.1:{port}/x.png"):
            assert refused(s, [{"image": url}]) == "input[0]: the image URL could not be fetched"
        message = refused(s, [{"image": f"{remote.url}/declared-huge"}])
        assert (
            message
            == f"input[0]: the image URL is over the size cap of {Limits().max_body_bytes} bytes (--max-body-bytes)"
        )
    finally:
        s.stop()


def test_a_body_without_a_length_is_cut_at_the_cap(model, remote):
    s = serving(model, allow_private_urls=True, max_body_bytes=100_000)
    try:
        message = refused(s, [{"image": f"{remote.url}/endless"}])
        assert message == "input[0]: the image URL is over the size cap of 100000 bytes (--max-body-bytes)"
    finally:
        s.stop()


# ---- off the event loop, in lanes -------------------------------------------------------------------------------


class Hook:
    """A function of serve.py replaced by one that, for the calls `held(args)` picks, counts its entry and waits
    for `release` before going on."""

    def __init__(self, monkeypatch, name, held):
        self.entered, self.release, self.lock = 0, threading.Event(), threading.Lock()
        real = getattr(serve, name)

        def hooked(*args, **kwargs):
            if held(*args):
                with self.lock:
                    self.entered += 1
                assert self.release.wait(HANG)
            return real(*args, **kwargs)

        monkeypatch.setattr(serve, name, hooked)

    def wait_for(self, n):
        deadline = time.monotonic() + HANG  # a bound on a hang; the count ends the wait
        while self.entered < n:
            assert time.monotonic() < deadline, f"{self.entered} of {n} calls entered the hook"
            time.sleep(0.002)


def background(server, bodies):
    results = [None] * len(bodies)

    def send(i):
        try:
            results[i] = call(server.url + "/v1/embeddings", bodies[i], timeout=HANG)
        except Exception as e:  # not JSON (uvicorn's plain-text 500), or no answer: shown by the assertion
            results[i] = (None, repr(e))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, results


def test_json_is_parsed_off_the_event_loop(model, monkeypatch):
    """While a body is being parsed (held inside the parse), /health and other requests are answered."""
    hook = Hook(monkeypatch, "parse", lambda body, *rest: body.get("input") == ["held"])
    s = serving(model)
    try:
        threads, results = background(s, [{"input": ["held"]}])
        hook.wait_for(1)
        assert call(s.url + "/health", timeout=HANG)[0] == 200
        assert embed(s, {"input": ["not held"]}, timeout=HANG)["data"][0]["index"] == 0
        hook.release.set()
        threads[0].join(HANG)
        assert results[0][0] == 200
    finally:
        hook.release.set()
        s.stop()


def test_small_requests_pass_large_bodies_and_slow_urls(model, remote, monkeypatch):
    """Every thread of the large-body lane and of the URL lane held inside `prepare`, with more requests of each
    kind waiting behind them: a short text is still answered."""
    big = "word " * 250_000  # 1.25 MB: the large-body lane
    hook = Hook(monkeypatch, "prepare", lambda req, *rest: req.inputs[0] != "short")
    s = serving(model, allow_private_urls=True, max_body_bytes=2_000_000, max_tokens=10**6, max_length=64)
    try:
        bodies = [{"input": [big]}] * 3 + [{"input": [{"image": f"{remote.url}/img"}]}] * 5
        threads, results = background(s, bodies)
        hook.wait_for(2 + 4)  # the large lane has 2 threads, the URL lane 4
        assert embed(s, {"input": ["short"]}, timeout=HANG)["data"][0]["index"] == 0
        hook.release.set()
        for t in threads:
            t.join(HANG)
        assert [r[0] for r in results] == [200] * len(bodies)
    finally:
        hook.release.set()
        s.stop()


# ---- the budget --------------------------------------------------------------------------------------------------


def hold_the_model(server):
    """The worker's next model call waits inside for the returned event."""
    worker, entered, release = server.app.state.worker, threading.Event(), threading.Event()

    def held(group):
        del worker.encode
        entered.set()
        assert release.wait(HANG)
        return worker.encode(group)

    worker.encode = held
    return entered, release


def test_the_token_budget_answers_503_with_retry_after(model):
    """A budget that holds either request but not both: the second waits (503) while the first is in the model,
    and fits once the first is answered."""
    first, second = "word " * 120, "word " * 190
    n1, n2 = (len(model.prepare([t], "text-matching")[0].input_ids) for t in (first, second))
    s = Server(create_app(model, CKPT, Limits(max_tokens=max(n1, n2)), max_pending_tokens=n1 + n2 - 1))
    try:
        entered, release = hold_the_model(s)
        threads, results = background(s, [{"input": [first]}])
        assert entered.wait(HANG)
        status, out, headers = call(s.url + "/v1/embeddings", {"input": [second]}, full=True)
        assert status == 503 and headers["Retry-After"] == "1", out
        assert "--max-pending-tokens" in out["error"]["message"] and "retry in 1 s" in out["error"]["message"]
        assert call(s.url + "/health")[1]["pending_tokens"] == n1
        release.set()
        threads[0].join(HANG)
        assert results[0][0] == 200 and call(s.url + "/health")[1]["pending_tokens"] == 0
        assert embed(s, {"input": [second]})["usage"]["total_tokens"] == n2  # it fits now
    finally:
        s.stop()


def test_the_pixel_budget(model):
    """An image holds its decoded pixels and its resized patches' pixels: a budget of two images' worth lets a
    third wait (503) while two are in the model; a request that alone holds more can never fit (413)."""
    image = {"image": b64(PNG)}
    patches = model.prepare([{"image": PNG}], "text-matching")[0].pixel_values
    one = 40 * 30 + len(patches) * model.processor.image_cfg.patch_size**2
    s = Server(create_app(model, CKPT, Limits(max_image_pixels=one), max_pending_pixels=2 * one + one // 2))
    try:
        entered, release = hold_the_model(s)
        threads, results = background(s, [{"input": [image, image]}])
        assert entered.wait(HANG)
        assert call(s.url + "/health")[1]["pending_pixels"] == 2 * one
        status, out, headers = call(s.url + "/v1/embeddings", {"input": [image]}, full=True)
        assert status == 503 and headers["Retry-After"] == "1" and "--max-pending-pixels" in out["error"]["message"]
        release.set()
        threads[0].join(HANG)
        assert results[0][0] == 200 and call(s.url + "/health")[1]["pending_pixels"] == 0
        status, out = call(s.url + "/v1/embeddings", {"input": [image] * 3})
        assert status == 413 and "over the server's budget" in out["error"]["message"], out
    finally:
        s.stop()


def test_a_budget_below_one_request_is_refused_at_start(model):
    with pytest.raises(ValueError, match="--max-pending-tokens 100 is below one request's 131,072"):
        create_app(model, CKPT, Limits(), max_pending_tokens=100)


# ---- shutdown ------------------------------------------------------------------------------------------------------


def test_shutdown_past_the_graceful_time_answers_json_503(model, monkeypatch):
    """One request inside the model, one queued, then a shutdown with 1 s of graceful time: both are answered with
    a JSON 503 before the time ends (the one in the model too: its call is not waited for); the worker then finishes
    its call without an error, drops its result and stops."""
    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_type.__name__))
    s = Server(create_app(model, CKPT, Limits()), graceful_timeout=1.0)
    worker = s.app.state.worker
    entered, release = hold_the_model(s)
    try:
        threads, results = background(s, [{"input": ["in the model"]}])
        assert entered.wait(HANG)
        more, queued = background(s, [{"input": ["queued"], "dimensions": 8}])
        deadline = time.monotonic() + HANG
        while len(worker.pending) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        s.server.should_exit = True
        for t in threads + more:
            t.join(HANG)
        for status, out in results + queued:
            assert status == 503 and out["error"]["message"].startswith("the server is shutting down"), out
    finally:
        release.set()
        s.thread.join(HANG)
        worker.thread.join(HANG)
    assert not s.thread.is_alive() and not worker.thread.is_alive() and crashed == []
    assert worker.calls == 1 and worker.requests == 0  # the call in the model ran to its end; no one took its result


# ---- connections ---------------------------------------------------------------------------------------------------


def test_headers_must_arrive_in_time(model):
    """A client that sends part of its headers and stops is disconnected after --header-timeout."""
    s = Server(create_app(model, CKPT, Limits()), header_timeout=0.5, keep_alive_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=HANG) as c:
            c.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
            assert c.recv(1024) == b""  # the server closed the connection (a hang ends at HANG)
        with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=HANG) as c:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while chunk := c.recv(65536):  # the answer, then the end of an idle kept-alive connection
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in data
    finally:
        s.stop()


# ---- exposure -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host,key,warned",
    [
        ("127.0.0.1", None, False),
        ("127.0.0.2", None, False),
        ("::1", None, False),
        ("0.0.0.0", None, True),
        ("::", None, True),
        ("192.168.1.20", None, True),
        ("0.0.0.0", "a key", False),
    ],
)
def test_a_warning_for_a_public_address_without_a_key(host, key, warned):
    message = exposure(host, key)
    assert (message is not None) == warned and (not warned or "without an API key" in message)


def test_the_key_comes_from_the_environment(monkeypatch):
    from jina_v4.apps.cli import parser

    monkeypatch.setenv("JINA_V4_API_KEY", "from-the-environment")
    assert parser(["serve"]).parse_args(["serve"]).api_key == "from-the-environment"


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--header-timeout", "0"),
        ("--url-timeout", "inf"),
        ("--body-timeout", "-3"),
        ("--max-redirects", "-1"),
        ("--max-answer-bytes", "0"),
    ],
)
def test_bad_limits_are_refused_by_the_parser(flag, value, capsys):
    from jina_v4.apps.cli import parser

    with pytest.raises(SystemExit):
        parser(["serve"]).parse_args(["serve", flag, value])
    assert f"argument {flag}: {value!r} is not a" in capsys.readouterr().err


# ---- what a refusal quotes, and what reaches a client or the log ---------------------------------------------------


def error(server, body=None, raw=None, headers=None):
    status, out = call(server.url + "/v1/embeddings", body, raw=raw, headers=headers)
    return status, out["error"]["message"]


def test_a_client_s_own_path_comes_back_as_sent(model):
    """Only text the server produced is scrubbed: a `model` naming a path under the server's home directory or
    working directory is quoted as sent, so that a client cannot confirm its guesses of the server's paths."""
    s = serving(model)
    try:
        for guess in (str(Path.home() / "venv"), str(Path.cwd()), sys.prefix):
            status, message = error(s, {"input": "a", "model": guess})
            assert status == 400 and json.dumps(guess) in message and "<server path>" not in message, message
    finally:
        s.stop()


@pytest.mark.parametrize(
    "body,words",
    [
        ({"input": "a", "model": "m" * 1_000_000}, "1,000,000 characters"),
        ({"input": "a", "task": ["t"] * 100_000}, "characters of JSON"),
        ({"input": "a", "x" * 1_000_000: 1}, "1,000,000 characters"),
        ({"input": [[1, "t" * 1_000_000]]}, "1,000,000 characters"),
        ({"input": [{"image": "s" * 1_000_000 + "://x"}]}, "URLs are refused"),
        ({"input": ["a", {"text": "t" * 1_000_000, "image": "i"}]}, "characters of JSON"),
    ],
    ids=["model", "task", "field", "token", "scheme", "object"],
)
def test_an_invalid_value_is_quoted_in_short(model, body, words):
    s = serving(model, max_body_bytes=3_000_000)
    try:
        status, message = error(s, body)
        assert status == 400 and words in message and len(message) < 400, message[:1000]
    finally:
        s.stop()


def test_a_compressed_body_is_refused_by_its_encoding(model):
    s = serving(model)
    try:
        body = gzip.compress(json.dumps({"input": "a"}).encode())
        status, message = error(s, raw=body, headers={"Content-Encoding": "gzip"})
        assert status == 415 and "gzip" in message and "uncompressed" in message, message
        raw = json.dumps({"input": "a"}).encode()
        assert call(s.url + "/v1/embeddings", raw=raw, headers={"Content-Encoding": "identity"})[0] == 200
    finally:
        s.stop()


def test_the_access_log_never_shows_a_query_string(model):
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    keep = Keep()
    s = Server(create_app(model, CKPT, Limits(), api_key="the-key"), log_level="info")
    logging.getLogger("uvicorn.access").addHandler(keep)
    try:
        assert call(s.url + "/v1/embeddings?api_key=the-key&x=1", {"input": "a"})[0] == 401
        assert call(s.url + "/health?token=the-key")[0] == 200
    finally:
        logging.getLogger("uvicorn.access").removeHandler(keep)
        s.stop()
    assert any("POST /v1/embeddings?<query not logged>" in line and "401" in line for line in lines), lines
    assert any("GET /health?<query not logged>" in line for line in lines), lines
    assert not any("the-key" in line for line in lines), lines


@pytest.mark.parametrize(
    "header,status",
    [
        ("Bearer the-key", 200),
        ("bearer the-key", 200),
        ("BEARER  the-key", 200),
        ("Bearer the-keyx", 401),
        ("Basic the-key", 401),
        ("the-key", 401),
        ("bearer", 401),
    ],
)
def test_the_bearer_scheme_is_read_in_any_case(model, header, status):
    s = Server(create_app(model, CKPT, Limits(), api_key="the-key"))
    try:
        assert call(s.url + "/v1/embeddings", {"input": "a"}, headers={"Authorization": header})[0] == status
    finally:
        s.stop()


def test_a_url_without_a_host_is_called_that(model):
    with pytest.raises(FetchError, match="names no host"):
        Fetcher(10**6, 5.0, allow_private=True).fetch("http:///127.0.0.1:1/x", time.monotonic() + HANG)
    s = serving(model, allow_private_urls=True)
    try:
        message = refused(s, [{"image": "http:///127.0.0.1:1/x.png"}])
        assert "names no host" in message and "redirect" not in message, message
    finally:
        s.stop()


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n",
        b"NOT A REQUEST LINE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nbad header line\r\n\r\n",
    ],
    ids=["negative-length", "bad-length", "request-line", "header"],
)
def test_requests_h11_cannot_read_get_the_json_error(model, raw):
    s = serving(model)
    try:
        with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=HANG) as c:
            c.sendall(raw)
            answer = b""
            while chunk := c.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower(), answer
        error = json.loads(body)["error"]
        assert error["code"] == 400 and "not valid HTTP/1.1" in error["message"], error
        assert call(s.url + "/health")[0] == 200
    finally:
        s.stop()
