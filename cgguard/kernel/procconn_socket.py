"""Opening and subscribing a proc connector socket (the reader is :mod:`cgguard.kernel.procconn`).

The socket is created and bound by pyroute2's ``ProcEventSocket`` (which picks a free netlink
port id and joins the group) in a short-lived helper process, which hands the descriptor back over
a socketpair (SCM_RIGHTS) and exits: importing pyroute2 (with asyncio, sqlite3 and psutil behind
it) costs a process about 11 MiB of RSS that dropping its modules does not give back (35 -> 46 MiB
measured for the agent), and the agent lives for months. A netlink socket belongs to its open
file, not to the process that bound it, so it keeps its port id and membership. If the helper
cannot run (no pyroute2, no interpreter to start) the socket is opened directly; the syscalls
are the same. ``ProcConnector.socket_source`` says which happened; ``use_pyroute2=False`` skips
the helper.

Subscription: kernels since about 6.6 accept ``struct proc_input {op, event_type}``
(cn_msg.len == 8) and then multicast only the chosen types to this socket. A request for *all*
types is ACKed, a narrower one is not (the ACK itself is an event of type NONE and is filtered),
so we probe with "all", and on an ACK narrow it down. Older kernels ignore an 8-byte request
entirely; then we send the legacy 4-byte op and receive every event type.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable

from cgguard.kernel.procconn_abi import (
    _ACK_FIELD,
    _ACK_OFFSET,
    _EVENT,
    _EVENT_OFFSET,
    CN_IDX_PROC,
    FILTER_EVENTS,
    FILTER_LEGACY,
    MSG_SIZE,
    NETLINK_CONNECTOR,
    PROC_CN_MCAST_IGNORE,
    PROC_CN_MCAST_LISTEN,
    PROC_EVENT_ALL,
    PROC_EVENT_NONE,
    SO_RCVBUFFORCE,
    ProcConnectorUnavailable,
    control_message,
)

# Receive buffer for the subscription handshake (one datagram at a time).
_BUF_SIZE = 4096
# Datagrams kept from the handshake for the first read; more than a queue holds at any rcvbuf.
_EARLY_MAX = 65536

# Runs in the helper process: bind with pyroute2, pass the descriptor back, exit at once. pyroute2's
# own event loop never runs there, so nothing else ever reads the socket; and os._exit skips its
# clean-up, which would tell the kernel to stop sending events to the socket we now share.
_PYROUTE2_HELPER = """
import os, socket, sys
from pyroute2.netlink.connector.cn_proc import ProcEventSocket
ps = ProcEventSocket()
ps.bind()
back = socket.socket(fileno=int(sys.argv[1]))
socket.send_fds(back, [b"ok"], [ps.asyncore.socket.fileno()])
os._exit(0)
"""
HELPER_TIMEOUT_S = 60.0  # a loaded node may take long to start an interpreter; start-up only


def _open_with_pyroute2() -> socket.socket:
    if not sys.executable:
        raise OSError(errno.ENOENT, "no Python interpreter to run the pyroute2 helper")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PYROUTE2_HELPER, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        try:
            ours.settimeout(HELPER_TIMEOUT_S)
            _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        except OSError:
            fds = []
        finally:
            try:
                _, err = proc.communicate(timeout=HELPER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        if not fds:
            lines = (err or b"").decode(errors="replace").strip().splitlines()
            raise OSError(errno.EIO, f"pyroute2 helper exited {proc.returncode}: {lines[-1] if lines else 'no descriptor'}")
        for extra in fds[1:]:
            os.close(extra)
        return socket.socket(fileno=fds[0])
    finally:
        ours.close()
        theirs.close()


def _open_plain() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        sock.bind((0, CN_IDX_PROC))
    except OSError:
        sock.close()
        raise
    return sock


def open_socket(use_pyroute2: bool) -> tuple[socket.socket, str]:
    """A bound, not yet subscribed connector socket, and where it came from ("pyroute2" or
    "socket"). Raises :class:`ProcConnectorUnavailable` with every way that was tried."""
    errors = []
    if use_pyroute2:
        try:
            return _open_with_pyroute2(), "pyroute2"
        except Exception as e:  # pyroute2 raises its own types; fall back to the syscall
            errors.append(f"pyroute2: {e!r}")
    try:
        return _open_plain(), "socket"
    except OSError as e:
        errors.append(f"socket: {e}")
    raise ProcConnectorUnavailable(errno.EPERM, "cannot open the proc connector: " + "; ".join(errors))


def set_rcvbuf(sock: socket.socket, size: int) -> int:
    """Ask for ``size`` bytes of receive queue; as root SO_RCVBUFFORCE ignores rmem_max.
    Returns the effective SO_RCVBUF as the kernel reports it (twice what was asked)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def send_control(sock: socket.socket, payload: bytes) -> int:
    """Send a control message; returns the ack value its ACK will carry (plus one)."""
    # A random ack value tells our ACK apart from ACKs to other listeners, which the kernel
    # multicasts to everyone in the group.
    ack = random.randrange(1, 1 << 31)
    portid = sock.getsockname()[0]
    try:
        sock.send(control_message(payload, ack, portid))
    except OSError as e:
        # ECONNREFUSED: no connector kernel socket in this network namespace.
        raise ProcConnectorUnavailable(e.errno, f"proc connector: sending the subscription failed: {e.strerror}") from None
    return ack


class _Handshake:
    """What a subscription read besides its ACKs: every datagram (for the first read) and the
    ENOBUFS reports (for the loss counters)."""

    def __init__(self, sock: socket.socket, early: list[bytes]):
        self.sock = sock
        self.early = early
        self.enobufs = 0
        self.buf = bytearray(_BUF_SIZE)

    def await_ack(self, ack: int, timeout_s: float) -> int | None:
        """The error code of the kernel's ACK to ``ack``, or None if none came in time."""
        sock, buf = self.sock, self.buf
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                select.select([sock], [], [], left)
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.enobufs += 1
                    continue
                raise
            if n < MSG_SIZE:
                continue
            # Everything queued before the ACK goes to the first read(), ACKs included: they take
            # sequence numbers too, and skipping one would look like a lost event.
            if len(self.early) < _EARLY_MAX:
                self.early.append(bytes(buf[:n]))
            what = _EVENT.unpack_from(buf, _EVENT_OFFSET)[1]
            if what == PROC_EVENT_NONE and _ACK_FIELD.unpack_from(buf, _ACK_OFFSET)[0] == ack + 1:
                return _EVENT.unpack_from(buf, _EVENT_OFFSET)[4]  # event_data.ack.err


def subscribe(
    sock: socket.socket,
    send: Callable[[bytes], int],
    filter_events: bool,
    events: int,
    timeout_s: float,
    early: list[bytes],
) -> tuple[str, int]:
    """Subscribe the non-blocking ``sock`` with ``send`` (:func:`send_control` on it); returns
    the mode (FILTER_EVENTS or FILTER_LEGACY) and how many ENOBUFS came meanwhile. Datagrams
    read while waiting for an ACK are appended to ``early``."""
    hs = _Handshake(sock, early)
    if filter_events:
        ack = send(struct.pack("=II", PROC_CN_MCAST_LISTEN, PROC_EVENT_ALL))
        err = hs.await_ack(ack, timeout_s)
        if err is not None:
            if err:
                raise ProcConnectorUnavailable(err, f"proc connector refused the subscription: {os.strerror(err)}")
            # Narrowing is not ACKed (the ACK is a NONE event, which the filter now drops).
            send(struct.pack("=II", PROC_CN_MCAST_LISTEN, events & PROC_EVENT_ALL))
            return FILTER_EVENTS, hs.enobufs
    ack = send(struct.pack("=I", PROC_CN_MCAST_LISTEN))
    err = hs.await_ack(ack, timeout_s)
    if err is None:
        raise ProcConnectorUnavailable(
            errno.ETIMEDOUT,
            "proc connector did not acknowledge the subscription "
            "(not in the initial user/pid namespace?)",
        )
    if err:
        raise ProcConnectorUnavailable(err, f"proc connector refused the subscription: {os.strerror(err)}")
    return FILTER_LEGACY, hs.enobufs


def unsubscribe(sock: socket.socket) -> None:
    """Lowers the kernel's listener count so it stops building events if nobody else listens."""
    try:
        sock.send(control_message(struct.pack("=I", PROC_CN_MCAST_IGNORE), 0, sock.getsockname()[0]))
    except OSError:
        pass
