"""Sink: each finished incident as one structured entry in the systemd journal.

Speaks journald's native protocol (systemd's "Native Journal Protocol") on its datagram socket:
``NAME=value\\n`` per field, the binary-safe form ``NAME\\n<le64 length><bytes>\\n`` for values
with a newline, and, when the entry is too large for one datagram, the entry written to a sealed
memfd whose descriptor is passed with SCM_RIGHTS. Only the final record of an incident is sent
(the detection record is in incidents.jsonl and the hooks); operators filter by MESSAGE_ID:

* ``2efd8b6eb6a7405691d65a1fcedb0bb7`` cgguard acted (kill-cgroup, kill-lineage, freeze);
* ``06799536a487462698aa39b57ca4930d`` cgguard only reported: action report, dry run, a refusal
  (protected cgroup, exhausted budget) or an allow-list exemption.

``incident()`` only queues a snapshot; a worker thread formats and sends with MSG_DONTWAIT, so a
stalled journald costs a failed entry, never a blocked agent.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from typing import Any

from cgguard.sinks import LogLimit, incident_snapshot
from cgguard.sinks.incidents import Incident

log = logging.getLogger("cgguard.sinks.journal")

DEFAULT_SOCKET = "/run/systemd/journal/socket"
MESSAGE_ID_ACTED = "2efd8b6eb6a7405691d65a1fcedb0bb7"
MESSAGE_ID_REPORTED = "06799536a487462698aa39b57ca4930d"
ACTING = frozenset({"kill-cgroup", "kill-lineage", "freeze"})
REPORT_RESULTS = frozenset({"reported", "refused", "allowed"})

# syslog priorities: 3 err, 4 warning, 5 notice.
PRIO_ERR, PRIO_WARNING, PRIO_NOTICE = 3, 4, 5
_PRIORITY = {
    "failed": PRIO_ERR,
    "timeout": PRIO_ERR,  # the runaway may still be running
    "removed": PRIO_WARNING,
    "gone": PRIO_WARNING,
    "frozen": PRIO_WARNING,
    # The lineage had already vanished, or the agent stopped mid-action: nothing is known to be
    # left running, but someone should look, as for a removal.
    "not-found": PRIO_WARNING,
    "interrupted": PRIO_WARNING,
}
CMDLINE_MAX = 200  # in MESSAGE only; CGGUARD_ORIGIN_CMDLINE keeps it whole
SEND_RETRIES = 5  # a full journald queue (EAGAIN): a few short retries on the worker, then failed
SEND_RETRY_S = 0.02


def is_report_only(rec: dict[str, Any]) -> bool:
    return bool(rec.get("dry_run")) or rec.get("action") == "report" or rec.get("result") in REPORT_RESULTS


def message_id(rec: dict[str, Any]) -> str:
    """Anything not report-only is an action cgguard took or attempted (unknown future actions too)."""
    return MESSAGE_ID_REPORTED if is_report_only(rec) else MESSAGE_ID_ACTED


def priority(rec: dict[str, Any]) -> int:
    result = rec.get("result")
    if result in ("failed", "timeout"):
        return PRIO_ERR
    if is_report_only(rec):
        return PRIO_NOTICE
    return _PRIORITY.get(str(result), PRIO_WARNING)


def _s(v: Any) -> str:
    return "" if v is None else str(v)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return _s(v)


def message(rec: dict[str, Any]) -> str:
    """One readable line: what, where, result, origin."""
    origin = rec.get("origin") if isinstance(rec.get("origin"), dict) else None
    wl = rec.get("workload") if isinstance(rec.get("workload"), dict) else None
    parts = []
    if rec.get("dry_run"):
        parts.append("[dry-run]")
    where = _s(rec.get("cgroup")) or "/"
    parts.append(f"runaway process creation in {where}")
    if wl and wl.get("kind") not in (None, "cgroup", "root") and wl.get("name"):
        parts.append(f"({wl.get('kind')} {wl.get('name')})")
    det = [f"detector {_s(rec.get('detector')) or '?'}"]
    if rec.get("tasks_at_detection") is not None:
        det.append(f"{rec.get('tasks_at_detection')} tasks")
    if rec.get("peak_tasks") is not None:
        det.append(f"peak {rec.get('peak_tasks')}")
    line = " ".join(parts) + ": " + ", ".join(det)
    res = f"{_s(rec.get('action')) or '?'} -> {_s(rec.get('result')) or '?'}"
    if rec.get("remove_ms") is not None:
        res += f" in {_num(rec.get('remove_ms'))} ms"
    if rec.get("survivors"):
        res += f", {rec.get('survivors')} survivors"
    line += f"; {res}"
    if origin and origin.get("pid") is not None:
        o = f"origin pid {origin.get('pid')}"
        if origin.get("comm"):
            o += f" ({origin.get('comm')})"
        cmd = _one_line(_s(origin.get("cmdline")))
        if cmd:
            o += f": {cmd[:CMDLINE_MAX]}{'…' if len(cmd) > CMDLINE_MAX else ''}"
        if origin.get("alive") is False:
            o += " [exited]"
        line += f"; {o}"
    return _one_line(line)


def fields(rec: dict[str, Any]) -> list[tuple[str, str]]:
    """The journal fields of one final incident record; absent values are left out."""
    origin = rec.get("origin") if isinstance(rec.get("origin"), dict) else {}
    wl = rec.get("workload") if isinstance(rec.get("workload"), dict) else {}
    out: list[tuple[str, str]] = [
        ("MESSAGE_ID", message_id(rec)),
        ("PRIORITY", str(priority(rec))),
        ("SYSLOG_IDENTIFIER", "cgguard"),
        ("MESSAGE", message(rec)),
    ]
    pairs: list[tuple[str, Any]] = [
        ("CGGUARD_INCIDENT_ID", rec.get("id")),
        ("CGGUARD_CGROUP", rec.get("cgroup")),
        ("CGGUARD_ACTION", rec.get("action")),
        ("CGGUARD_RESULT", rec.get("result")),
        ("CGGUARD_DETECTOR", rec.get("detector")),
        ("CGGUARD_ORIGIN_PID", origin.get("pid")),
        ("CGGUARD_ORIGIN_COMM", origin.get("comm")),
        ("CGGUARD_ORIGIN_CMDLINE", origin.get("cmdline")),
        ("CGGUARD_TASKS_AT_DETECTION", rec.get("tasks_at_detection")),
        ("CGGUARD_PEAK_TASKS", rec.get("peak_tasks")),
        ("CGGUARD_DETECT_MS", rec.get("detect_ms")),
        ("CGGUARD_REMOVE_MS", rec.get("remove_ms")),
        ("CGGUARD_SURVIVORS", rec.get("survivors")),
        ("CGGUARD_DRY_RUN", "1" if rec.get("dry_run") else "0"),
        ("CGGUARD_WORKLOAD_KIND", wl.get("kind")),
        ("CGGUARD_WORKLOAD_NAME", wl.get("name")),
        ("CGGUARD_POD_UID", wl.get("pod_uid")),
        ("CGGUARD_CONTAINER_ID", wl.get("container_id")),
        ("CGGUARD_UNIT", wl.get("unit")),
        ("CGGUARD_TENANT", rec.get("tenant")),
    ]
    for name, v in pairs:
        if v is None or v == "" or isinstance(v, (dict, list)):
            continue
        out.append((name, _num(v)))
    out.append(("CGGUARD_INCIDENT_JSON", json.dumps(rec, sort_keys=True, default=str)))
    return out


def encode(entry: list[tuple[str, str]]) -> bytes:
    """Native protocol: ``NAME=value\\n``, or ``NAME\\n<le64 size><value>\\n`` when the value has
    a newline (or anything else the simple form cannot carry)."""
    buf = bytearray()
    for name, value in entry:
        data = value.encode("utf-8", "replace")
        key = name.encode("ascii")
        if b"\n" in data:
            buf += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            buf += key + b"=" + data + b"\n"
    return bytes(buf)


class JournalSink:
    name = "journal"

    def __init__(self, socket_path: str = DEFAULT_SOCKET, queue_size: int = 256):
        self.socket_path = socket_path
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._sent = 0
        self._failed = 0
        self.sent_memfd = 0  # entries that needed the memfd path (tests and debugging)
        self._closed = False
        self._warn = LogLimit(log)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="cgguard-journal", daemon=True)
        self._thread.start()

    # -- the agent's side --------------------------------------------------------------------
    def incident(self, inc: Incident) -> None:
        try:
            if inc.result == "detected" or self._closed:
                return
            self._q.put_nowait(incident_snapshot(inc))
        except queue.Full:
            self._count(False, "queue full")
        except Exception:  # never let the journal break the agent's loop
            self._count(False, "snapshot failed")

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"sent": self._sent, "failed": self._failed}

    def close(self, timeout_s: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._q.put(None, timeout=timeout_s / 2)
        except queue.Full:
            pass
        self._thread.join(timeout_s / 2)
        if not self._thread.is_alive():
            self._sock.close()

    # -- the worker --------------------------------------------------------------------------
    def _count(self, ok: bool, why: str = "") -> None:
        with self._lock:
            if ok:
                self._sent += 1
            else:
                self._failed += 1
        if not ok:
            self._warn.warning("journal %s: entry not sent: %s", self.socket_path, why)

    def _run(self) -> None:
        while True:
            rec = self._q.get()
            if rec is None:
                return
            try:
                data = encode(fields(rec))
                self._send(data)
                self._count(True)
            except OSError as e:
                self._count(False, e.strerror or str(e))
            except Exception as e:  # a malformed record must not end the worker
                self._count(False, f"{type(e).__name__}: {e}")

    def _send(self, data: bytes) -> None:
        try:
            self._retrying(lambda: self._sock.sendto(data, socket.MSG_DONTWAIT, self.socket_path))
            return
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
        self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        # Too large for a datagram: journald takes a sealed memfd holding the same payload.
        fd = os.memfd_create("cgguard-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            self._retrying(lambda: self._sock.sendmsg([], anc, socket.MSG_DONTWAIT, self.socket_path))
            self.sent_memfd += 1
        finally:
            os.close(fd)

    def _retrying(self, send: Any) -> None:
        for attempt in range(SEND_RETRIES + 1):
            try:
                send()
                return
            except BlockingIOError:
                if attempt == SEND_RETRIES or self._closed:
                    raise
                time.sleep(SEND_RETRY_S)
