"""Image URLs for `jina-v4 serve --allow-urls`, fetched under the server's policy.

Every address a URL's host resolves to is checked before a connection is made, at the first request and at every
redirect (`refusal`, a pure function of the address): loopback, private, link-local (cloud metadata), multicast,
reserved and other non-global addresses are refused unless the server runs with --allow-private-urls. The
connection then goes to the checked address itself, so a second DNS answer cannot swap it. At most
`max_redirects` redirects, to http(s) only. One deadline covers a whole fetch (DNS, connect, TLS, headers, body,
redirects) and the caller's deadline covers all the URLs of one request: at the earlier of the two a watchdog
shuts the socket, so a server that trickles bytes meets it as surely as a silent one. A refusal says what the
policy refused, never what the remote answered (no status, no reason, no Location, no socket error): a caller
learns nothing about hosts and ports it could not reach, and the server's log keeps the details.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

log = logging.getLogger("jina_v4.serve")
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv4 addresses reached through a NAT64 gateway
KINDS = ["loopback", "link_local", "unspecified", "multicast", "reserved", "private"]  # the first that applies
REDIRECTS = (301, 302, 303, 307, 308)
RESOLVER = ThreadPoolExecutor(4, thread_name_prefix="jina-v4-dns")  # getaddrinfo cannot be interrupted: waited on


class FetchError(Exception):
    """What a client is told, after "the image URL ": the policy's words. status: 400, or 503 while shutting down."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def refusal(address: str) -> str | None:
    """None for a global unicast address; otherwise what it is ("loopback", "link-local", "private", ...). An IPv4
    address written as IPv6 (mapped, NAT64) is the IPv4 address; a 6to4 one is judged by both."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") names no other host
    inner = None
    if ip.version == 6 and (ip.ipv4_mapped or ip in NAT64):
        ip = ip.ipv4_mapped or ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    elif ip.version == 6:
        inner = ip.sixtofour
    for candidate in (ip, inner):
        if candidate is None:
            continue
        for kind in KINDS:
            if getattr(candidate, f"is_{kind}"):
                return kind.replace("_", "-")
        if not candidate.is_global:
            return "non-global"
    return None


def connect(family: int, address: tuple, timeout: float) -> socket.socket:
    """A TCP connection to an address already checked (tests replace this to see that a refused one never is)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


class Fetcher:
    """Fetches image URLs for one server: `fetch(url, deadline)`; `close()` aborts the fetches under way (shutdown)
    and refuses new ones."""

    def __init__(self, max_bytes: int, timeout: float, allow_private: bool = False, max_redirects: int = 3):
        self.max_bytes, self.timeout = max_bytes, timeout
        self.allow_private, self.max_redirects = allow_private, max_redirects
        self.lock, self.open, self.closed = threading.Lock(), set(), False

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for watch in self.open:
                shut(watch)

    def fetch(self, url: str, deadline: float) -> bytes:
        """The body of `url` (after redirects), within max_bytes, before min(now + timeout, deadline) (monotonic
        seconds), or a FetchError in the policy's words."""
        own = time.monotonic() + self.timeout
        end = min(own, deadline)
        late = f"took over {self.timeout:g} s (--url-timeout)" if own <= deadline else "ran past the request's deadline"
        for hop in range(self.max_redirects + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise FetchError(
                    "was redirected to a URL that is not http(s), which the server refuses"
                    if hop
                    else "is not an http(s) URL"
                )
            if not parts.hostname:
                raise FetchError("was redirected to a URL without a host" if hop else "names no host (http://HOST/...)")
            try:
                status, location, body = self.get(parts, end, hop)
            except FetchError:
                raise
            except Exception as e:  # DNS, connection, TLS, HTTP: the details stay in the log
                if self.closed:
                    raise FetchError("was not fetched: the server is shutting down", 503) from None
                if time.monotonic() >= end:
                    raise FetchError(f"{late} and was abandoned") from None
                log.info("fetching %s failed: %s: %s", url, type(e).__name__, e)
                raise FetchError("could not be fetched") from None
            if status == 200:
                return body
            if status not in REDIRECTS or not location:
                log.info("fetching %s failed: HTTP status %d", url, status)
                raise FetchError("could not be fetched")
            url = urllib.parse.urljoin(url, location)
        raise FetchError(f"was redirected more than {self.max_redirects} times (the server's limit)")

    def addresses(self, host: str, port: int, end: float, hop: int) -> list[tuple]:
        """(family, sockaddr) of every address of `host`, each one checked; DNS waited on until `end`."""
        job = RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            found = job.result(timeout=max(0.0, end - time.monotonic()))
        except FutureTimeout:
            raise TimeoutError("DNS") from None
        for *_, sockaddr in found:
            kind = None if self.allow_private else refusal(sockaddr[0])
            if kind is not None:
                how = "names" if hop == 0 else "was redirected to"
                raise FetchError(
                    f"{how} a {kind} address, which this server does not fetch (it runs without --allow-private-urls)"
                )
        return [(family, sockaddr) for family, *_, sockaddr in found]

    def get(self, parts: urllib.parse.SplitResult, end: float, hop: int) -> tuple[int, str | None, bytes]:
        """One GET: (status, Location, body), the body read only for a 200."""
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        addresses = self.addresses(parts.hostname, port, end, hop)
        for k, (family, sockaddr) in enumerate(addresses):
            try:
                sock = connect(family, sockaddr, max(0.001, end - time.monotonic()))
                break
            except OSError:
                if k == len(addresses) - 1 or time.monotonic() >= end:
                    raise
        watch, fired = sock.dup(), threading.Event()  # shutting a dup ends the connection, TLS or not
        with self.lock:
            if self.closed:
                shut(watch)
            self.open.add(watch)

        def expire():
            fired.set()
            shut(watch)

        watchdog = threading.Timer(max(0.0, end - time.monotonic()), expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            if https:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
            conn = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(parts.hostname, port)
            conn.sock = sock  # already connected, to the checked address
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"Accept": "image/*"})
            r = conn.getresponse()
            body, size = b"", r.getheader("Content-Length", "")
            if r.status == 200 and size.isdigit() and int(size) > self.max_bytes:
                raise FetchError(f"is over the size cap of {self.max_bytes} bytes (--max-body-bytes)")
            if r.status == 200:
                body = r.read(self.max_bytes + 1)
            if fired.is_set() or self.closed:  # the socket was shut under the read: the body may be cut short
                raise TimeoutError("the fetch's deadline, or the server's shutdown")
            if len(body) > self.max_bytes:
                raise FetchError(f"is over the size cap of {self.max_bytes} bytes (--max-body-bytes)")
            return r.status, r.getheader("Location"), body
        finally:
            watchdog.cancel()
            with self.lock:
                self.open.discard(watch)
            watch.close()
            sock.close()


def shut(sock: socket.socket) -> None:
    """Wake whatever thread reads the connection by shutting it down."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
