"""Kernel edge: the proc connector (NETLINK_CONNECTOR, group CN_IDX_PROC).

The kernel multicasts one 76-byte datagram per process event: nlmsghdr (16) + cn_msg (20) +
proc_event (40: what, cpu, timestamp_ns, then a 24-byte union). We decode it with one
precompiled ``struct.Struct`` at a fixed offset instead of pyroute2's per-message parser, which
tops out at about 15k events/s -- a quarter of what a C fork loop produces -- and then falls
behind without bound.

The socket is created and bound by pyroute2's ``ProcEventSocket`` (which picks a free netlink
port id and joins the group); we take a duplicate of its descriptor and close the pyroute2 object
so that its asyncio transport can never read our datagrams. If pyroute2 cannot be used the socket
is opened directly; ``ProcConnector.socket_source`` says which happened.

Subscription: kernels since about 6.6 accept ``struct proc_input {op, event_type}``
(cn_msg.len == 8) and then multicast only the chosen types to this socket. A request for *all*
types is ACKed, a narrower one is not (the ACK itself is an event of type NONE and is filtered),
so we probe with "all", and on an ACK narrow it down. Older kernels ignore an 8-byte request
entirely; then we send the legacy 4-byte op and receive every event type.

Loss: when the receive queue overflows the kernel drops events and the next ``recv`` fails once
with ENOBUFS (NETLINK_NO_ENOBUFS stays off: we want to know). Every event also carries a per-CPU
sequence number, so a gap on one CPU counts events that never reached us. Under the event filter
the kernel still numbers the events it filtered out for us, so there gaps are not loss and we do
not look at them.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Protocol

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_NONE = 0x0
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_UID = 0x4
PROC_EVENT_GID = 0x40
PROC_EVENT_SID = 0x80
PROC_EVENT_PTRACE = 0x100
PROC_EVENT_COMM = 0x200
PROC_EVENT_NONZERO_EXIT = 0x20000000
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000
PROC_EVENT_ALL = (
    PROC_EVENT_FORK
    | PROC_EVENT_EXEC
    | PROC_EVENT_UID
    | PROC_EVENT_GID
    | PROC_EVENT_SID
    | PROC_EVENT_PTRACE
    | PROC_EVENT_COMM
    | PROC_EVENT_NONZERO_EXIT
    | PROC_EVENT_COREDUMP
    | PROC_EVENT_EXIT
)
DEFAULT_EVENTS = PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_EXIT

EVENT_NAMES = {
    PROC_EVENT_NONE: "none",
    PROC_EVENT_FORK: "fork",
    PROC_EVENT_EXEC: "exec",
    PROC_EVENT_UID: "uid",
    PROC_EVENT_GID: "gid",
    PROC_EVENT_SID: "sid",
    PROC_EVENT_PTRACE: "ptrace",
    PROC_EVENT_COMM: "comm",
    PROC_EVENT_COREDUMP: "coredump",
    PROC_EVENT_EXIT: "exit",
}

MSG_SIZE = 76
# nlmsghdr: len, type, flags, seq, pid
_NLHDR = struct.Struct("=IHHII")
# cn_msg: idx, val, seq, ack, len, flags
_CNHDR = struct.Struct("=IIIIHH")
# From cn_msg.seq (offset 24) to the end of the proc_event union, skipping ack/len/flags:
# seq, what, cpu, timestamp_ns, six u32 of event data.
_EVENT = struct.Struct("=I8xIIQIIIIII")
_EVENT_OFFSET = 24
_ACK_FIELD = struct.Struct("=I")  # cn_msg.ack at offset 28
_ACK_OFFSET = 28

FILTER_EVENTS = "event-filter"
FILTER_LEGACY = "legacy-all"

# Receive-buffer slot for one datagram; anything longer than an event is not ours to parse.
_BUF_SIZE = 4096


class ProcConnectorUnavailable(OSError):
    """The proc connector cannot be used here (not the initial net/pid namespace, no
    CAP_NET_ADMIN, no connector in the kernel). The agent should fall back to sampling."""


class EventSink(Protocol):
    """Receives decoded events. ``ts_ns`` is the kernel's CLOCK_MONOTONIC time of the event."""

    def on_fork(self, ts_ns: int, parent_pid: int, parent_tgid: int, child_pid: int, child_tgid: int) -> None: ...

    def on_exec(self, ts_ns: int, pid: int, tgid: int) -> None: ...

    def on_exit(self, ts_ns: int, pid: int, tgid: int, exit_code: int, exit_signal: int) -> None: ...

    def on_loss(self, reason: str) -> None: ...


@dataclass
class ConnectorStats:
    received: int = 0  # datagrams decoded (every type, ACKs excluded)
    forks: int = 0
    execs: int = 0
    exits: int = 0
    other: int = 0
    lost_enobufs: int = 0  # ENOBUFS reports (each stands for an unknown number of events)
    lost_seq_estimate: int = 0  # events missing from per-CPU sequence gaps (legacy mode only)
    seq_gaps: int = 0
    filter_mode: str = ""
    rcvbuf: int = 0  # effective SO_RCVBUF as the kernel reports it (twice what was asked)
    socket_source: str = ""

    def as_dict(self) -> dict[str, int | str]:
        """Flat counters, plus the names the status and metrics views use: ``mode``,
        ``enobufs`` and ``lost`` -- a lower bound of events lost: the sequence-gap estimate
        plus one per ENOBUFS report (whose size the kernel does not tell)."""
        d: dict[str, int | str] = dict(self.__dict__)
        d["mode"] = self.filter_mode
        d["enobufs"] = self.lost_enobufs
        d["lost"] = self.lost_enobufs + self.lost_seq_estimate
        return d


def _control_message(payload: bytes, ack: int, portid: int) -> bytes:
    cn = _CNHDR.pack(CN_IDX_PROC, CN_VAL_PROC, 0, ack, len(payload), 0)
    return _NLHDR.pack(16 + len(cn) + len(payload), NLMSG_DONE, 0, 0, portid) + cn + payload


def _open_with_pyroute2() -> socket.socket:
    from pyroute2.netlink.connector.cn_proc import ProcEventSocket

    ps = ProcEventSocket()
    try:
        ps.bind()
        # pyroute2 registers the socket with its own event loop, which would consume datagrams if
        # that loop ever ran; a duplicate descriptor keeps the bound socket and membership.
        fd = os.dup(ps.asyncore.socket.fileno())
    finally:
        ps.close()
    return socket.socket(fileno=fd)


def _open_plain() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        sock.bind((0, CN_IDX_PROC))
    except OSError:
        sock.close()
        raise
    return sock


class ProcConnector:
    """A subscribed proc-connector socket, read without blocking by :meth:`read`."""

    def __init__(
        self,
        rcvbuf: int = 32 << 20,
        filter_events: bool = True,
        events: int = DEFAULT_EVENTS,
        use_pyroute2: bool = True,
        ack_timeout_s: float = 0.25,
    ):
        self.stats = ConnectorStats()
        self._buf = bytearray(_BUF_SIZE)
        self._early: list[bytes] = []  # events read while waiting for the subscription ACK
        self._seq: dict[int, int] = {}
        self._sock = self._open(use_pyroute2)
        try:
            self.set_rcvbuf(rcvbuf)
            self._sock.setblocking(False)
            self.stats.filter_mode = self._subscribe(filter_events, events, ack_timeout_s)
        except BaseException:
            self._sock.close()
            raise

    # -- setup -----------------------------------------------------------------------------
    def _open(self, use_pyroute2: bool) -> socket.socket:
        errors = []
        if use_pyroute2:
            try:
                sock = _open_with_pyroute2()
                self.stats.socket_source = "pyroute2"
                return sock
            except Exception as e:  # pyroute2 raises its own types; fall back to the syscall
                errors.append(f"pyroute2: {e!r}")
        try:
            sock = _open_plain()
            self.stats.socket_source = "socket"
            return sock
        except OSError as e:
            errors.append(f"socket: {e}")
        raise ProcConnectorUnavailable(errno.EPERM, "cannot open the proc connector: " + "; ".join(errors))

    def set_rcvbuf(self, size: int) -> int:
        """Ask for ``size`` bytes of receive queue; as root SO_RCVBUFFORCE ignores rmem_max."""
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        self.stats.rcvbuf = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        return self.stats.rcvbuf

    def _send_control(self, payload: bytes) -> int:
        # A random ack value tells our ACK apart from ACKs to other listeners, which the kernel
        # multicasts to everyone in the group.
        ack = random.randrange(1, 1 << 31)
        portid = self._sock.getsockname()[0]
        try:
            self._sock.send(_control_message(payload, ack, portid))
        except OSError as e:
            # ECONNREFUSED: no connector kernel socket in this network namespace.
            raise ProcConnectorUnavailable(e.errno, f"proc connector: sending the subscription failed: {e.strerror}") from None
        return ack

    def _await_ack(self, ack: int, timeout_s: float) -> int | None:
        """The error code of the kernel's ACK to ``ack``, or None if none came in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                select.select([self._sock], [], [], left)
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.stats.lost_enobufs += 1
                    continue
                raise
            if n < MSG_SIZE:
                continue
            what = _EVENT.unpack_from(self._buf, _EVENT_OFFSET)[1]
            if what == PROC_EVENT_NONE:
                if _ACK_FIELD.unpack_from(self._buf, _ACK_OFFSET)[0] == ack + 1:
                    return _EVENT.unpack_from(self._buf, _EVENT_OFFSET)[4]  # event_data.ack.err
                continue
            # Real events that raced the ACK: keep them for the first read().
            if len(self._early) < 65536:
                self._early.append(bytes(self._buf[:n]))

    def _subscribe(self, filter_events: bool, events: int, timeout_s: float) -> str:
        if filter_events:
            ack = self._send_control(struct.pack("=II", PROC_CN_MCAST_LISTEN, PROC_EVENT_ALL))
            err = self._await_ack(ack, timeout_s)
            if err is not None:
                if err:
                    raise ProcConnectorUnavailable(err, f"proc connector refused the subscription: {os.strerror(err)}")
                # Narrowing is not ACKed (the ACK is a NONE event, which the filter now drops).
                self._send_control(struct.pack("=II", PROC_CN_MCAST_LISTEN, events & PROC_EVENT_ALL))
                return FILTER_EVENTS
        ack = self._send_control(struct.pack("=I", PROC_CN_MCAST_LISTEN))
        err = self._await_ack(ack, timeout_s)
        if err is None:
            raise ProcConnectorUnavailable(
                errno.ETIMEDOUT,
                "proc connector did not acknowledge the subscription "
                "(not in the initial user/pid namespace?)",
            )
        if err:
            raise ProcConnectorUnavailable(err, f"proc connector refused the subscription: {os.strerror(err)}")
        return FILTER_LEGACY

    # -- reading ---------------------------------------------------------------------------
    @property
    def filter_mode(self) -> str:
        return self.stats.filter_mode

    @property
    def socket_source(self) -> str:
        return self.stats.socket_source

    def fileno(self) -> int:
        return self._sock.fileno()

    def stats_dict(self) -> dict[str, int | str]:
        return self.stats.as_dict()

    def read(self, sink: EventSink, max_events: int = 8192) -> int:
        """Drain up to ``max_events`` queued datagrams into ``sink`` without blocking.

        Returns how many were handled (events of every type, loss reports included), so a
        caller that gets ``max_events`` back knows the queue may hold more.
        """
        handled = 0
        if self._early:
            early, self._early = self._early, []
            for data in early:
                self._buf[: len(data)] = data
                handled += self._dispatch(sink, len(data))
        recv_into = self._sock.recv_into
        buf = self._buf
        unpack = _EVENT.unpack_from
        on_fork, on_exec, on_exit = sink.on_fork, sink.on_exec, sink.on_exit
        track_seq = self.stats.filter_mode == FILTER_LEGACY
        seqs = self._seq
        forks = execs = exits = other = 0
        try:
            while handled < max_events:
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    # The kernel dropped events; the queue works again from here on.
                    self.stats.lost_enobufs += 1
                    sink.on_loss("enobufs")
                    handled += 1
                    continue
                if n < MSG_SIZE:
                    continue
                seq, what, cpu, ts, a, b, c, d, e, f = unpack(buf, _EVENT_OFFSET)
                handled += 1
                if track_seq and what:
                    last = seqs.get(cpu)
                    seqs[cpu] = seq
                    if last is not None:
                        gap = (seq - last - 1) & 0xFFFFFFFF
                        # A huge "gap" is reordering or a counter reset, not loss.
                        if 0 < gap < 0x80000000:
                            self.stats.seq_gaps += 1
                            self.stats.lost_seq_estimate += gap
                            sink.on_loss("seq-gap")
                if what == PROC_EVENT_FORK:
                    forks += 1
                    on_fork(ts, a, b, c, d)
                elif what == PROC_EVENT_EXIT:
                    exits += 1
                    on_exit(ts, a, b, c, d)
                elif what == PROC_EVENT_EXEC:
                    execs += 1
                    on_exec(ts, a, b)
                elif what != PROC_EVENT_NONE:
                    other += 1
        finally:
            st = self.stats
            st.forks += forks
            st.execs += execs
            st.exits += exits
            st.other += other
            st.received += forks + execs + exits + other
        return handled

    def _dispatch(self, sink: EventSink, n: int) -> int:
        """Slow path for the few datagrams stashed during subscription."""
        if n < MSG_SIZE:
            return 0
        what = _deliver(sink, _EVENT.unpack_from(self._buf, _EVENT_OFFSET))
        st = self.stats
        if what != PROC_EVENT_NONE:
            st.received += 1
            if what == PROC_EVENT_FORK:
                st.forks += 1
            elif what == PROC_EVENT_EXEC:
                st.execs += 1
            elif what == PROC_EVENT_EXIT:
                st.exits += 1
            else:
                st.other += 1
        return 1

    def wait(self, timeout_s: float | None) -> bool:
        """Block until a datagram is queued or ``timeout_s`` passed; True if readable."""
        r, _, _ = select.select([self._sock], [], [], timeout_s)
        return bool(r)

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        try:
            # Lowers the kernel's listener count so it stops building events if nobody else listens.
            self._sock.send(_control_message(struct.pack("=I", PROC_CN_MCAST_IGNORE), 0, self._sock.getsockname()[0]))
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> "ProcConnector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _deliver(sink: EventSink, fields: tuple) -> int:
    """Hand one decoded event to ``sink``; returns its type."""
    _seq, what, _cpu, ts, a, b, c, d, _e, _f = fields
    if what == PROC_EVENT_FORK:
        sink.on_fork(ts, a, b, c, d)
    elif what == PROC_EVENT_EXIT:
        sink.on_exit(ts, a, b, c, d)
    elif what == PROC_EVENT_EXEC:
        sink.on_exec(ts, a, b)
    return what
