"""The agent's HTTP endpoint: /healthz, /readyz, /metrics (and extra read-only pages).

Standard library only (``http.server``), one daemon thread for the listener and one per
connection, so a slow scraper never blocks the agent's loops and the agent's exit never waits
for a client. Access logging is off: a scrape every 15 s would otherwise fill the journal.

* ``/healthz`` -- 200 while the process serves HTTP at all (liveness: restart if this fails);
* ``/readyz`` -- 200 when ``ready()`` is true, else 503 (readiness: the agent watches what it
  should and reads the proc connector);
* ``/metrics`` -- the Prometheus exposition (OpenMetrics if the scraper asks for it).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cgguard.config import parse_listen
from cgguard.sinks.metrics import Metrics

log = logging.getLogger(__name__)

Page = Callable[[], tuple[int, str, bytes]]  # -> (status, content type, body)

_TEXT = "text/plain; charset=utf-8"


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # connection threads never hold up the agent's exit
    allow_reuse_address = True  # a restarted agent can bind at once despite TIME_WAIT

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], family: socket.AddressFamily):
        self.address_family = family
        super().__init__(addr, handler)

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


def _handler(ready: Callable[[], bool], metrics: Metrics | None, extra: dict[str, Page]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cgguard"
        sys_version = ""
        protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its connection
        timeout = 10  # a client that stalls mid-request loses its thread after this

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
            log.debug("http: %s - %s", self.address_string(), format % args)

        def _send(self, status: int, ctype: str, body: bytes, head: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _route(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/healthz":
                    self._send(200, _TEXT, b"ok\n", head)
                elif path == "/readyz":
                    try:
                        ok = bool(ready())
                    except Exception:
                        log.exception("http: ready() failed")
                        ok = False
                    self._send(200 if ok else 503, _TEXT, b"ready\n" if ok else b"not ready\n", head)
                elif path == "/metrics" and metrics is not None:
                    body, ctype = metrics.render(self.headers.get("Accept"))
                    self._send(200, ctype, body, head)
                elif path in extra:
                    status, ctype, body = extra[path]()
                    self._send(status, ctype, body, head)
                else:
                    self._send(404, _TEXT, b"not found\n", head)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; nothing to answer
            except Exception as e:
                log.exception("http: %s failed", path)
                try:
                    self._send(500, _TEXT, f"error: {type(e).__name__}\n".encode(), head)
                except OSError:
                    pass

        def do_GET(self) -> None:  # noqa: N802 (stdlib name)
            self._route(head=False)

        def do_HEAD(self) -> None:  # noqa: N802 (stdlib name)
            self._route(head=True)

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
