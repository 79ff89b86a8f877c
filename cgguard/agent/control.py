"""The control socket for ``cgguard status|tree|ctl``: served on its own thread.

A client that connects and then stalls must never delay a decision, so accepting and reading
happen here, and only the parsed request crosses to the loop, which owns the state. The loop
answers between two events (:meth:`ControlServer.serve_pending`, with :func:`answer`); the
client waits, the loop does not.

The socket is root-only twice over: mode 0600, and the peer's uid from SO_PEERCRED. Its path is
handled as root handles paths a user may influence: an existing path is replaced only if it is
a socket nobody answers on (a stale one from a crash), never a file, a link or a live agent's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import socket
import stat
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .tracking import Tracking

log = logging.getLogger("cgguard.control")

READ_TIMEOUT_S = 2.0
ANSWER_TIMEOUT_S = 10.0
MAX_REQUEST = 65536


class ControlError(Exception):
    """The control socket cannot be set up; the message is one line for the operator."""


@dataclass
class _Pending:
    request: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None


def _claim_path(path: str) -> None:
    """Make ``path`` free for our socket without destroying anything that is not a stale socket."""
    parent = os.path.dirname(path) or "."
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        st = os.lstat(parent)
    except OSError as e:
        raise ControlError(f"control socket {path}: {parent}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"control socket {path}: {parent} is not a directory (a symlink?)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"control socket {path}: the path exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.EAGAIN, None):  # None: the probe timed out
            # A full accept queue: an agent is there but stopped or too busy to accept.
            raise ControlError(
                f"control socket {path}: another cgguard agent holds it but does not answer (stopped or busy); not replacing it"
            ) from None
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlError(f"control socket {path}: {e.strerror}") from None
        os.unlink(path)  # stale: nobody listens
        return
    finally:
        probe.close()
    raise ControlError(f"control socket {path}: another cgguard agent is running (it answers on this socket)")


def bind_control(path: str) -> socket.socket:
    _claim_path(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # Created 0600 by the umask, not chmod-ed after: between bind() and a chmod by path the
    # socket can be swapped for a symlink, and the chmod would land on its target.
    old = os.umask(0o177)
    try:
        s.bind(path)
    except OSError as e:
        s.close()
        raise ControlError(f"control socket {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    s.listen(16)
    return s


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], "little")


class ControlServer:
    """Accepts on its own thread; :meth:`serve_pending` runs queued requests on the loop."""

    def __init__(self, path: str, wake: Callable[[], None]):
        self.path = path
        self._wake = wake
        self._sock = bind_control(path)
        self._inode = os.stat(path).st_ino
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="cgguard-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def serve_pending(self, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        while True:
            try:
                p = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                p.reply = handle(p.request)
            except Exception as e:  # a bad request must not take the loop down
                log.exception("control request %r failed", p.request.get("cmd"))
                p.reply = {"ok": False, "error": f"internal error: {e!r}"}
            p.done.set()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                continue
            # One client at a time is plenty for an admin socket, and bounds what a flood costs.
            with conn:
                try:
                    self._serve(conn)
                except OSError:
                    pass

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(READ_TIMEOUT_S)
        # Read the (bounded) request before any answer, a refusal included: closing on a client
        # that is still sending would hand it EPIPE instead of the reason.
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        # The file is 0600 already; this also holds if someone loosens its mode.
        if peer_uid(conn) != 0:
            conn.sendall(b'{"ok": false, "error": "only root may use the control socket"}\n')
            return
        try:
            req = json.loads(data or b"{}")
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            reply: dict[str, Any] = {"ok": False, "error": f"bad request: {e}"}
        else:
            p = _Pending(req)
            self._queue.put(p)
            self._wake()
            if p.done.wait(ANSWER_TIMEOUT_S) and p.reply is not None:
                reply = p.reply
            else:
                reply = {"ok": False, "error": "the agent did not answer in time"}
        conn.settimeout(ANSWER_TIMEOUT_S)
        conn.sendall(json.dumps(reply, default=str).encode() + b"\n")

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        # Remove the socket only if it is still ours: a successor may have bound the path.
        try:
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        self._thread.join(timeout=2)


def answer(
    req: dict[str, Any],
    *,
    status: Callable[[], dict[str, Any]],
    tracking: "Tracking | None",
    tracking_note: str,
    reset_interval_set: Callable[[int], None],
) -> dict[str, Any]:
    """The reply to one request, made on the loop's thread (it reads and sets the loop's state).
    ``reset_interval_set(ms)`` is told a new reset interval once tracking has it."""
    cmd = req.get("cmd")
    if cmd == "status":
        return {"ok": True, "status": status()}
    if cmd == "tree":
        if tracking is None:
            return {"ok": False, "error": f"process tracking is {tracking_note}"}
        return {"ok": True, "tree": tracking.tree_json(str(req.get("cgroup") or ""))}
    if cmd == "tracking":
        value = req.get("value")
        if value not in ("enable", "disable"):
            return {"ok": False, "error": "tracking takes 'enable' or 'disable'"}
        if tracking is None:
            return {"ok": False, "error": f"process tracking is {tracking_note}"}
        tracking.set_enabled(value == "enable")
        return {"ok": True, "tracking": value + "d"}
    if cmd == "reset-interval":
        try:
            ms = int(req.get("value"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return {"ok": False, "error": "reset-interval takes milliseconds (an integer)"}
        if not 100 <= ms <= 2**32 - 1:
            return {"ok": False, "error": "reset-interval must be between 100 and 4294967295 ms"}
        if tracking is None:
            return {"ok": False, "error": f"process tracking is {tracking_note}"}
        tracking.set_reset_interval(ms)
        reset_interval_set(ms)
        return {"ok": True, "reset_interval_ms": ms}
    return {"ok": False, "error": f"unknown command {cmd!r}"}
