"""Sink: the incident webhook (``Webhook``): POST each incident's JSON to an HTTP endpoint.

Called on the agent's detection loop, so ``incident()`` only snapshots the record and queues it
(O(1), never blocks, never raises); one worker thread delivers, with a per-attempt timeout and
retries with exponential backoff and jitter. The queue is bounded: when the endpoint is slower
than a storm of incidents, deliveries are dropped and counted. ``close()`` returns within its
bound even when the endpoint hangs.
"""

from __future__ import annotations

import http.client
import json
import logging
import queue as queue_mod
import random
import ssl
import threading
import time
import urllib.parse
from typing import Any

from cgguard import __version__
from cgguard.sinks import Counters, LogLimit, env_value, incident_snapshot, normal_priority
from cgguard.sinks.incidents import Incident

log = logging.getLogger("cgguard.sinks.webhook")


RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
RESPONSE_CAP = 65536


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry ``attempt`` (1 = the first retry): exponential, capped, with "equal
    jitter" (half fixed, half random) so that many agents retrying a recovering endpoint spread
    out but never retry sooner than half the nominal delay."""
    nominal = min(max_s, base_s * (2 ** (attempt - 1)))
    return nominal / 2 + (rng or random).uniform(0, nominal / 2)


class WebhookError(ValueError):
    pass


def parse_url(url: str) -> urllib.parse.SplitResult:
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https"):
        raise WebhookError(f"{url!r}: must start with http:// or https://")
    if not u.hostname:
        raise WebhookError(f"{url!r}: no host")
    try:
        u.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise WebhookError(f"{url!r}: bad port") from None
    return u


class Webhook:
    """POSTs each incident record (at detection and with the result; ``result`` tells which) as
    JSON to ``url``, from one worker thread, in order.

    Connection errors, timeouts and HTTP 408/425/429/5xx are retried up to ``retries`` times with
    exponential backoff and jitter; other statuses (3xx, 4xx) count as failed at once, as
    retrying cannot fix them. Redirects are not followed. ``timeout_s`` bounds connecting and
    each read of one attempt.
    """

    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        queue: int = 256,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.url = url
        self._u = parse_url(url)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._ssl = ssl_context if ssl_context is not None else (ssl.create_default_context() if self._u.scheme == "https" else None)
        self._q: queue_mod.Queue[tuple[str, dict[str, Any]] | None] = queue_mod.Queue(maxsize=queue)
        self._counts = Counters("delivered", "failed", "dropped", "retries")
        self._closed = False
        self._closing = threading.Event()
        self._abort = False
        self._conn: http.client.HTTPConnection | None = None
        self._warn = LogLimit(log)
        self._thread = threading.Thread(target=self._work, name="cgguard-webhook", daemon=True)
        self._thread.start()

    # -- the agent's side --------------------------------------------------------------------
    def incident(self, inc: Incident) -> None:
        try:
            if self._closed:
                self._count("dropped")
                return
            phase = "detected" if inc.result == "detected" else "final"
            self._q.put_nowait((phase, incident_snapshot(inc)))
        except queue_mod.Full:
            self._count("dropped")
        except Exception:  # never let the webhook break the agent's loop
            log.exception("webhook: could not queue incident")

    def stats(self) -> dict[str, int]:
        return self._counts.snapshot()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop retrying, send what is queued for most of ``timeout_s``, then abort the attempt
        in flight; what is still queued then counts as dropped."""
        if self._closed:
            return
        self._closed = True
        start = time.monotonic()
        self._closing.set()
        try:
            self._q.put_nowait(None)
        except queue_mod.Full:
            pass  # the worker finds _abort set below and drains the queue itself
        self._thread.join(timeout_s * 0.6)
        if self._thread.is_alive():
            self._abort = True
            conn = self._conn
            sock = getattr(conn, "sock", None) if conn is not None else None
            if sock is not None:
                try:
                    sock.shutdown(2)  # wakes the worker's blocked send/recv at once
                except OSError:
                    pass
            self._thread.join(max(0.0, start + timeout_s - time.monotonic()))

    # -- the worker --------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        self._counts.add(key, n)

    def _work(self) -> None:
        normal_priority()
        while True:
            try:
                item = self._q.get(timeout=0.2) if self._abort else self._q.get()
            except queue_mod.Empty:
                return
            if item is None:
                return
            if self._abort:
                self._count("dropped")
                continue
            phase, rec = item
            try:
                self._deliver(phase, rec)
            except Exception:  # a broken record must not end the worker
                log.exception("webhook %s", self.url)
                self._count("failed")

    def _deliver(self, phase: str, rec: dict[str, Any]) -> None:
        body = json.dumps(rec, sort_keys=True, default=str).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"cgguard/{__version__}",
            "X-Cgguard-Incident-Id": env_value(rec.get("id")),
            "X-Cgguard-Phase": phase,
        }
        attempt = 0
        while True:
            ok, retryable, why = self._attempt(body, headers)
            if ok:
                self._count("delivered")
                return
            if not retryable or attempt >= self.retries or self._closing.is_set():
                self._warn.warning("webhook %s: incident %s (%s) not delivered: %s", self.url, rec.get("id"), phase, why)
                self._count("failed")
                return
            attempt += 1
            self._count("retries")
            delay = backoff_delay(attempt, self.backoff_s, self.max_backoff_s)
            log.debug("webhook %s: %s; retry %d in %.2fs", self.url, why, attempt, delay)
            if self._closing.wait(delay):
                self._warn.warning("webhook %s: incident %s (%s) not delivered: %s (stopping)", self.url, rec.get("id"), phase, why)
                self._count("failed")
                return

    def _attempt(self, body: bytes, headers: dict[str, str]) -> tuple[bool, bool, str]:
        """One POST: (delivered, worth retrying, what happened)."""
        u = self._u
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        conn: http.client.HTTPConnection
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(u.hostname or "", u.port, timeout=self.timeout_s, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=self.timeout_s)
        self._conn = conn
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read(RESPONSE_CAP)
            status = resp.status
        except (OSError, http.client.HTTPException) as e:
            return False, True, f"{type(e).__name__}: {e}"
        finally:
            self._conn = None
            conn.close()
        if 200 <= status < 300:
            return True, False, str(status)
        return False, status in RETRY_STATUS, f"HTTP {status}"
