"""The agent's HTTP endpoint: /healthz, /readyz, /metrics (and extra read-only pages).

Standard library only (``socketserver``), one daemon thread for the listener and one per
connection (at most ``MAX_CONNECTIONS``; more wait in the listen backlog), so a slow scraper
never blocks the agent's loops and the agent's exit never waits for a client. Access logging is
off: a scrape every 15 s would otherwise fill the journal.

Scrapers must never slow the detection loop, which shares the interpreter (and its GIL) with
these threads. So requests are parsed and answered one at a time, at most one per
``REQUEST_GAP_S`` (waiting clients block on a lock, which costs no CPU and holds no GIL), and
the /metrics exposition is rendered at most once per ``RENDER_MAX_AGE_S`` and served from that
copy in between (an incident renders it afresh). Prometheus scrapes every 15 s or so; eight
clients scraping back to back then cost the agent about what a few hundred scrapes a second do.

* ``/healthz`` -- 200 while the process serves HTTP at all (liveness: restart if this fails);
* ``/readyz`` -- 200 when ``ready()`` is true, else 503 (readiness: the agent watches what it
  should and reads the proc connector);
* ``/metrics`` -- the Prometheus exposition (OpenMetrics if the scraper asks for it).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable

from cgguard.config import parse_listen
from cgguard.sinks.metrics import Metrics

log = logging.getLogger(__name__)

Page = Callable[[], tuple[int, str, bytes]]  # -> (status, content type, body)

_TEXT = "text/plain; charset=utf-8"
MAX_CONNECTIONS = 32  # connection threads at once; further clients wait to be accepted
REQUEST_GAP_S = 0.005  # at most ~200 requests a second reach the interpreter
RENDER_MAX_AGE_S = 1.0  # as the status board's: a newer render would show the same state


class _Gate:
    """One request at a time, and at least ``gap_s`` between two: the threads waiting here sleep
    on a lock instead of competing with the detection loop for the GIL."""

    def __init__(self, gap_s: float):
        self._lock = threading.Lock()
        self._gap_s = gap_s
        self._next = 0.0

    def __enter__(self) -> None:
        self._lock.acquire()
        wait = self._next - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def __exit__(self, *exc: object) -> None:
        self._next = time.monotonic() + self._gap_s
        self._lock.release()


class _Exposition:
    """The last /metrics render per content type, reused while younger than ``max_age_s`` and no
    incident was counted since (``Metrics.generation``)."""

    def __init__(self, metrics: Metrics, max_age_s: float):
        self._metrics = metrics
        self._max_age_s = max_age_s
        self._cache: dict[str | None, tuple[float, int, bytes, str]] = {}

    def get(self, accept: str | None) -> tuple[bytes, str]:
        # The Accept header picks the format (and its version and escaping): one copy per header
        # seen, and scrapers send the same one every time.
        key = accept
        gen = getattr(self._metrics, "generation", 0)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._max_age_s and hit[1] == gen:
            return hit[2], hit[3]
        body, ctype = self._metrics.render(accept)
        if len(self._cache) >= 16:
            self._cache.clear()
        self._cache[key] = (now, gen, body, ctype)
        return body, ctype


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True  # connection threads never hold up the agent's exit
    allow_reuse_address = True  # a restarted agent can bind at once despite TIME_WAIT
    block_on_close = False

    def __init__(self, addr: tuple[str, int], handler: type[socketserver.BaseRequestHandler], family: socket.AddressFamily):
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(addr, handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        # Blocks the listener (not the agent) while MAX_CONNECTIONS are served: a flood of
        # connections waits in the backlog instead of costing a thread each.
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # '::' should not silently also take IPv4 on hosts with bindv6only=0 differently
            # than on others: be explicit, IPv6 only; use 0.0.0.0 for IPv4.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


class Server:
    """A running endpoint; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, httpd: _Server, thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread
        self.host: str = str(httpd.server_address[0])
        self.port: int = int(httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop accepting, wait for the listener thread, release the port. Idempotent."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 414: "URI Too Long",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}
MAX_LINE = 65536
MAX_HEADERS = 100


class _BadRequest(Exception):
    def __init__(self, status: int):
        self.status = status


def _handler(ready: Callable[[], bool], metrics: Metrics | None, extra: dict[str, Page]) -> type[socketserver.BaseRequestHandler]:
    gate = _Gate(REQUEST_GAP_S)
    exposition = _Exposition(metrics, RENDER_MAX_AGE_S) if metrics is not None else None

    def answer(target: str, accept: str | None) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        try:
            if path == "/healthz":
                return 200, _TEXT, b"ok\n"
            if path == "/readyz":
                try:
                    ok = bool(ready())
                except Exception:
                    log.exception("http: ready() failed")
                    ok = False
                return (200, _TEXT, b"ready\n") if ok else (503, _TEXT, b"not ready\n")
            if path == "/metrics" and exposition is not None:
                body, ctype = exposition.get(accept)
                return 200, ctype, body
            if path in extra:
                return extra[path]()
            return 404, _TEXT, b"not found\n"
        except Exception as e:
            log.exception("http: %s failed", path)
            return 500, _TEXT, f"error: {type(e).__name__}\n".encode()

    class Handler(socketserver.StreamRequestHandler):
        """HTTP/1.1 with keep-alive, GET and HEAD, written out here: http.server (and the email,
        http.client and ssl modules it loads) cost the agent 1.4 MiB of RSS for what these
        endpoints need. A client that stalls mid-request loses its thread after ``timeout``."""

        timeout = 10

        def handle(self) -> None:
            try:
                while self._one():
                    pass
            except (TimeoutError, ConnectionError, OSError):
                pass  # the client went away or stalled; nothing to answer

        def _readline(self) -> bytes:
            line = self.rfile.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                raise _BadRequest(414)
            return line

        def _one(self) -> bool:
            """Serve one request; False when the connection is done."""
            try:
                line = self._readline()
                if not line:
                    return False
                with gate:
                    method, target, keep = self._request(line)
                    if method not in ("GET", "HEAD"):
                        self._send(501, _TEXT, b"not implemented\n", head=False, keep=False)
                        return False
                    status, ctype, body = answer(target, self._headers.get("accept"))
            except _BadRequest as e:
                self._send(e.status, _TEXT, f"{_REASONS[e.status].lower()}\n".encode(), head=False, keep=False)
                return False
            # Written after the gate: a client that reads slowly holds up nobody else.
            self._send(status, ctype, body, head=method == "HEAD", keep=keep)
            return keep

        def _request(self, line: bytes) -> tuple[str, str, bool]:
            try:
                words = line.decode("latin-1").rstrip("\r\n").split()
            except UnicodeDecodeError:
                raise _BadRequest(400) from None
            if len(words) != 3 or not words[2].startswith("HTTP/"):
                raise _BadRequest(400)
            method, target, version = words
            if version not in ("HTTP/1.0", "HTTP/1.1"):
                raise _BadRequest(505)
            self._headers: dict[str, str] = {}
            for _ in range(MAX_HEADERS + 1):
                h = self._readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                name, colon, value = h.decode("latin-1").partition(":")
                if not colon:
                    raise _BadRequest(400)
                self._headers[name.strip().lower()] = value.strip()
            else:
                raise _BadRequest(431)
            conn = self._headers.get("connection", "").lower()
            keep = "keep-alive" in conn if version == "HTTP/1.0" else "close" not in conn
            if self._headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in self._headers:
                keep = False  # a body we do not read: do not try to find the next request after it
            return method, target, keep

        def _send(self, status: int, ctype: str, body: bytes, head: bool, keep: bool) -> None:
            lines = [
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}",
                "Server: cgguard",
                f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}",
                f"Content-Type: {ctype}",
                f"Content-Length: {len(body)}",
                "Cache-Control: no-store",
            ]
            if not keep:
                lines.append("Connection: close")
            self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
            self.wfile.flush()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("http: %s - %d", self.client_address[0], status)

    return Handler


def serve(
    listen: str,
    ready: Callable[[], bool],
    metrics: Metrics | None,
    extra: dict[str, Page] | None = None,
) -> Server:
    """Bind ``HOST:PORT`` (port 0: any free port) and serve in a daemon thread.

    Raises OSError if the address cannot be bound (in use, not local), so the caller can say so.
    """
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    httpd = _Server((host, port), _handler(ready, metrics, dict(extra or {})), family)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="cgguard-http", daemon=True)
    thread.start()
    return Server(httpd, thread)
