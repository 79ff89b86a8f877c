"""Incident sinks: where the agent reports each incident besides the incident log.

A sink has ``name``, ``incident(inc)`` (called on the agent's loop twice per incident: at
detection and with the result; it must return at once and never raise), ``stats()`` (counters the
metrics read by ``name``) and ``close()`` (bounded, even if a hook hangs).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cgguard.config import Config
    from cgguard.sinks.incidents import Incident


log = logging.getLogger("cgguard.sinks")


class Sink(Protocol):
    name: str

    def incident(self, inc: Incident) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def incident_snapshot(inc: Incident) -> dict[str, Any]:
    """The record as it is now. The agent keeps mutating the same Incident after the detection
    call (result, notes, timings), and sinks read it later on their own threads, so the
    containers are copied one level deep; this stays cheap enough for the detection loop."""
    d = inc.to_dict()
    for k, v in d.items():
        if isinstance(v, list):
            d[k] = list(v)
        elif isinstance(v, dict):
            d[k] = dict(v)
    return d


class Counters:
    """A sink's outcome counters, added to from its threads and read by the metrics."""

    def __init__(self, *keys: str):
        self._lock = threading.Lock()
        self._c = dict.fromkeys(keys, 0)

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


class LogLimit:
    """Warnings of one sink at most once per ``interval_s``; the rest go to debug and are counted
    in the next warning. A dead endpoint during an incident storm must not flood the log."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0):
        self.log = logger
        self.interval_s = interval_s
        self._last = -interval_s
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            loud = now - self._last >= self.interval_s
            if loud:
                self._last, n, self._suppressed = now, self._suppressed, 0
            else:
                self._suppressed += 1
        if loud:
            self.log.warning(msg + (f" ({n} similar messages since the last one at debug level)" if n else ""), *args)
        else:
            self.log.debug(msg, *args)


def build_sinks(cfg: Config) -> list[Sink]:
    """The sinks the configuration asks for: the journal (on, or 'auto' and its socket exists),
    the hook commands (when any are configured) and the webhook (when a URL is set). Each is
    imported only when configured: the agent lives for months, and what it imports it keeps."""
    sinks: list[Sink] = []
    j = cfg.journal
    if j.enabled is True or (j.enabled == "auto" and os.path.exists(j.socket)):
        from cgguard.sinks.journald import JournalSink

        sinks.append(JournalSink(j.socket))
    h = cfg.hooks
    if h.on_incident:
        from cgguard.sinks.hooks import HookRunner

        sinks.append(HookRunner(h.on_incident, timeout_s=h.timeout_ms / 1000.0, max_concurrent=h.max_concurrent, queue=h.queue))
    w = h.webhook
    if w.url:
        from cgguard.sinks.webhook import Webhook

        sinks.append(
            Webhook(
                w.url,
                timeout_s=w.timeout_ms / 1000.0,
                queue=w.queue,
                retries=w.retries,
                backoff_s=w.backoff_ms / 1000.0,
                max_backoff_s=w.max_backoff_ms / 1000.0,
            )
        )
    return sinks


def normal_priority() -> None:
    """Make the calling thread (and so whatever it spawns) an ordinary one: SCHED_OTHER, nice 0.

    Lowering both is always permitted. Linux keeps both per thread, so the agent's own threads
    keep their priority."""
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError as e:
        log.warning("sinks: cannot reset the scheduling policy: %s", e.strerror)
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError as e:
        log.warning("sinks: cannot reset the nice value: %s", e.strerror)


def env_value(v: Any) -> str:
    return ("" if v is None else str(v)).replace("\0", "")
