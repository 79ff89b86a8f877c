"""Kernel edge: the proc connector (NETLINK_CONNECTOR, group CN_IDX_PROC).

The kernel multicasts one 76-byte datagram per process event: nlmsghdr (16) + cn_msg (20) +
proc_event (40: what, cpu, timestamp_ns, then a 24-byte union). We decode it with one
precompiled ``struct.Struct`` at a fixed offset instead of pyroute2's per-message parser, which
tops out at about 15k events/s -- a quarter of what a C fork loop produces -- and then falls
behind without bound.

The socket is created and bound by pyroute2's ``ProcEventSocket`` (which picks a free netlink
port id and joins the group) in a short-lived helper process, which hands the descriptor back over
a socketpair (SCM_RIGHTS) and exits: importing pyroute2 (with asyncio, sqlite3 and psutil behind
it) costs a process about 11 MiB of RSS that dropping its modules does not give back (35 -> 46 MiB
measured for the agent), and the agent lives for months. A netlink socket belongs to its open
file, not to the process that bound it, so it keeps its port id and membership. If the helper
cannot run (no pyroute2, no interpreter to start) the socket is opened directly; the syscalls
are the same. ``ProcConnector.socket_source`` says which happened; ``use_pyroute2=False`` skips
the helper.

Reading: one recvmmsg(2) call (through ctypes) fills up to ``BATCH_SLOTS`` fixed-size slots of a
preallocated buffer, and one ``struct.iter_unpack`` over the filled slots feeds the single
dispatch loop (:func:`_dispatch`), which is also the path for events that arrived during the
subscription and for replayed recordings (:func:`deliver`). Without recvmmsg the same slots are
filled with one ``recv_into`` per datagram. Measured on a 2-core VM (kernel 6.18; python -m
cgguard.bench.ingest), reader CPU against the old loop (one recv_into and one unpack_from per
datagram): draining a 100k backlog 1.24 us/event instead of 1.85 (800k events/s instead of
530k; most of what is left is the kernel's per-datagram work inside recvmmsg); live at the C
vfork loop's peak 1.57 instead of 2.75 us/event; a wake-up that finds 1 / 2 / 5 datagrams
3.9-5.4 / 4.7-7.2 / 6.7-10.3 us instead of 5.0-7.3 / 6.4-10.5 / 10.1-16.6 us, because the
empty-queue recv (an exception in Python) is gone. Batching pays in every regime, so there is
one path.

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
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
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

# Receive buffer for the subscription handshake (one datagram at a time).
_BUF_SIZE = 4096

# Batched reading: every datagram goes into its own fixed-size slot of one preallocated buffer,
# so that a whole batch decodes with a single ``struct.iter_unpack`` and the sink gets tuples
# straight from it. A slot holds an event (76 bytes) with room to spare; a longer datagram is
# truncated, which is harmless: only the first 76 bytes are ever decoded.
_SLOT = 128
BATCH_SLOTS = 256
MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
# The fields a sink needs, from one slot: what (36), [cpu], timestamp_ns (44), data[0..3] (52).
_SLOT_EVENT = struct.Struct(f"=36xI4xQIIII{_SLOT - 68}x")
# Legacy mode only: seq (24), what (36), cpu (40).
_SLOT_SEQ = struct.Struct(f"=24xI8xII{_SLOT - 44}x")
# What every datagram's length is, compared per batch: a batch that differs takes the slow path.
_EXPECTED_LENS = memoryview(bytearray(struct.pack("=I", MSG_SIZE) * BATCH_SLOTS)).cast("I")

RECV_RECVMMSG = "recvmmsg"
RECV_PER_DATAGRAM = "recv_into"


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
    recv_path: str = ""  # recvmmsg (batched) or recv_into (one syscall per datagram)

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


class ProcConnector:
    """A subscribed proc-connector socket, read without blocking by :meth:`read`."""

    def __init__(
        self,
        rcvbuf: int = 32 << 20,
        filter_events: bool = True,
        events: int = DEFAULT_EVENTS,
        use_pyroute2: bool = True,
        ack_timeout_s: float = 0.25,
        use_recvmmsg: bool = True,
    ):
        self.stats = ConnectorStats()
        sock = self._open(use_pyroute2)
        try:
            self._init_reader(sock, use_recvmmsg)
            self.set_rcvbuf(rcvbuf)
            self._sock.setblocking(False)
            self.stats.filter_mode = self._subscribe(filter_events, events, ack_timeout_s)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def over_socket(cls, sock: socket.socket, filter_mode: str = FILTER_EVENTS, use_recvmmsg: bool = True) -> ProcConnector:
        """A reader of datagrams in the proc connector's layout from ``sock``, which the caller
        opened (and subscribed, if it is a connector socket): e.g. a socketpair in tests.
        ``filter_mode`` FILTER_LEGACY turns on the sequence-gap accounting."""
        self = cls.__new__(cls)
        self.stats = ConnectorStats(filter_mode=filter_mode, socket_source="given")
        sock.setblocking(False)
        self._init_reader(sock, use_recvmmsg)
        return self

    # -- setup -----------------------------------------------------------------------------
    def _init_reader(self, sock: socket.socket, use_recvmmsg: bool) -> None:
        self._sock = sock
        self._buf = bytearray(_BUF_SIZE)
        self._early: list[bytes] = []  # events read while waiting for the subscription ACK
        self._seq: dict[int, int] = {}
        self._slots = bytearray(_SLOT * BATCH_SLOTS)
        self._view = memoryview(self._slots)
        self._pending: OSError | None = None  # an error that came after a batch's datagrams
        # recv_into sees the EAGAIN itself, so its short batch always means an empty queue.
        self._confirm_short = False
        batched = _recvmmsg_fill(self._sock.fileno(), self._slots, BATCH_SLOTS) if use_recvmmsg else None
        if batched is not None:
            self._fill, self._lens = batched
            self._confirm_short = True
            self.stats.recv_path = RECV_RECVMMSG
        else:
            self._fill = self._fill_recv_into
            self._slot_views = [self._view[i * _SLOT : (i + 1) * _SLOT] for i in range(BATCH_SLOTS)]
            # This fill skips short datagrams itself, so every filled slot is a whole event.
            self._lens = memoryview(bytearray(_EXPECTED_LENS)).cast("I")
            self.stats.recv_path = RECV_PER_DATAGRAM

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
            # Everything queued before the ACK goes to the first read(), ACKs included: they take
            # sequence numbers too (below), and skipping one would look like a lost event.
            if len(self._early) < 65536:
                self._early.append(bytes(self._buf[:n]))
            what = _EVENT.unpack_from(self._buf, _EVENT_OFFSET)[1]
            if what == PROC_EVENT_NONE and _ACK_FIELD.unpack_from(self._buf, _ACK_OFFSET)[0] == ack + 1:
                return _EVENT.unpack_from(self._buf, _EVENT_OFFSET)[4]  # event_data.ack.err

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
        caller that gets ``max_events`` back knows the queue may hold more. An exception from
        ``sink`` drops the rest of the batch it came from (up to ``BATCH_SLOTS`` events).
        """
        handled = 0
        st = self.stats
        view, lens = self._view, self._lens
        track_seq = st.filter_mode == FILTER_LEGACY
        early = bool(self._early)
        fill = self._fill_early if early else self._fill
        backlog = False
        while handled < max_events:
            want = min(max_events - handled, BATCH_SLOTS)
            n = fill(want)
            if n > 0:
                handled += n
                if lens[:n] == _EXPECTED_LENS[:n]:
                    events = view[: n * _SLOT]
                else:
                    events = self._compact(n)
                    handled -= n - len(events) // _SLOT
                if track_seq:
                    self._track_seq(sink, events)
                _dispatch(sink, _SLOT_EVENT.iter_unpack(events), st)
                if early:
                    if not self._early:
                        early, fill = False, self._fill
                elif n == want:
                    backlog = self._confirm_short
                elif not backlog and self._pending is None:
                    # A short batch means the queue was empty -- or that recvmmsg stopped at an
                    # error (ENOBUFS) that the next call reports. Only while draining a backlog,
                    # where an overflow during the call is plausible, is a short batch confirmed
                    # by one more call; at low rates that call would cost 1.1-1.8 us per wake-up
                    # (measured: 3.9-5.4 us per read() of 1 datagram, 5.2-7.3 with it).
                    break
            elif n < 0:
                # The kernel dropped events; the queue works again from here on.
                st.lost_enobufs += 1
                sink.on_loss("enobufs")
                handled += 1
            elif early:
                early, fill = False, self._fill
            else:
                break
        return handled

    # Fill functions put up to ``vlen`` datagrams into the slots (their lengths into
    # ``self._lens``, or MSG_SIZE for one known to be a whole event) and return how many, 0 when
    # the queue is empty, or -1 for one ENOBUFS.
    def _fill_early(self, vlen: int) -> int:
        early, lens, buf = self._early, self._lens, self._slots
        i = j = 0
        while i < vlen and j < len(early):
            data = early[j][:_SLOT]
            j += 1
            if len(data) >= MSG_SIZE:
                buf[i * _SLOT : i * _SLOT + len(data)] = data
                lens[i] = MSG_SIZE  # a whole event, whatever its length
                i += 1
        del early[:j]
        return i

    def _fill_recv_into(self, vlen: int) -> int:
        """Fallback without recvmmsg: one recv per datagram, still decoded as one batch."""
        if self._pending is not None:
            e, self._pending = self._pending, None
            if e.errno == errno.ENOBUFS:
                return -1
            raise e
        recv_into, slots = self._sock.recv_into, self._slot_views
        i = 0
        while i < vlen:
            try:
                n = recv_into(slots[i])
            except BlockingIOError:
                break
            except OSError as e:
                if i:
                    # The datagrams before the error go out first; recvmmsg does the same.
                    self._pending = e
                    break
                if e.errno == errno.ENOBUFS:
                    return -1
                raise
            if n >= MSG_SIZE:  # a shorter datagram is no event: its slot is taken again
                i += 1
        return i

    def _compact(self, n: int) -> memoryview:
        """The slow path for a batch with a datagram of unusual length: drop the short ones
        (not events) and return the rest packed into slots."""
        lens, buf = self._lens, self._slots
        keep = [i for i in range(n) if lens[i] >= MSG_SIZE]
        for j, i in enumerate(keep):
            if i != j:
                buf[j * _SLOT : (j + 1) * _SLOT] = buf[i * _SLOT : (i + 1) * _SLOT]
        return self._view[: len(keep) * _SLOT]

    def _track_seq(self, sink: EventSink, events: memoryview) -> None:
        """Legacy mode: a gap in a CPU's sequence numbers counts events the kernel dropped."""
        seqs = self._seq
        gaps = lost = 0
        for seq, what, cpu in _SLOT_SEQ.iter_unpack(events):
            # ACKs (PROC_EVENT_NONE) to any listener's control message take a number of the
            # CPU's sequence since Linux 5.x, which also sets their cpu; older kernels echo the
            # sender's seq with cpu -1, which must not enter the sequence.
            if what or cpu != 0xFFFFFFFF:
                last = seqs.get(cpu)
                seqs[cpu] = seq
                if last is not None:
                    gap = (seq - last - 1) & 0xFFFFFFFF
                    # A huge "gap" is reordering or a counter reset, not loss.
                    if 0 < gap < 0x80000000:
                        gaps += 1
                        lost += gap
                        sink.on_loss("seq-gap")
        self.stats.seq_gaps += gaps
        self.stats.lost_seq_estimate += lost

    def wait(self, timeout_s: float | None) -> bool:
        """Block until a datagram is queued or ``timeout_s`` passed; True if readable."""
        r, _, _ = select.select([self._sock], [], [], timeout_s)
        return bool(r)

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        if self._sock.family == socket.AF_NETLINK:
            try:
                # Lowers the kernel's listener count so it stops building events if nobody else listens.
                self._sock.send(_control_message(struct.pack("=I", PROC_CN_MCAST_IGNORE), 0, self._sock.getsockname()[0]))
            except OSError:
                pass
        self._sock.close()
        # The recvmmsg path holds the bare descriptor number, which the process may reuse.
        self._fill = _closed_fill

    def __enter__(self) -> "ProcConnector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _closed_fill(vlen: int) -> int:
    raise OSError(errno.EBADF, "proc connector is closed")


def _dispatch(sink: EventSink, events: Iterable[tuple[int, int, int, int, int, int]], stats: ConnectorStats) -> None:
    """The one place that hands events to a sink: ``events`` yields (what, ts, a, b, c, d)."""
    on_fork, on_exec, on_exit = sink.on_fork, sink.on_exec, sink.on_exit
    FORK, EXEC, EXIT = PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT
    forks = execs = exits = other = 0
    try:
        for what, ts, a, b, c, d in events:
            if what == FORK:
                forks += 1
                on_fork(ts, a, b, c, d)
            elif what == EXIT:
                exits += 1
                on_exit(ts, a, b, c, d)
            elif what == EXEC:
                execs += 1
                on_exec(ts, a, b)
            elif what:
                other += 1
    finally:
        stats.forks += forks
        stats.execs += execs
        stats.exits += exits
        stats.other += other
        stats.received += forks + execs + exits + other


def deliver(sink: EventSink, fields: tuple) -> int:
    """Hand one event decoded with ``_EVENT`` (a replayed recording) to ``sink`` the way
    :meth:`ProcConnector.read` does; returns its type."""
    _seq, what, _cpu, ts, a, b, c, d, _e, _f = fields
    _dispatch(sink, ((what, ts, a, b, c, d),), ConnectorStats())
    return what


def _recvmmsg_fill(fd: int, slots: bytearray, nslots: int) -> tuple[Callable[[int], int], memoryview] | None:
    """A fill function that receives up to ``vlen`` datagrams into the slots of ``slots`` with
    one recvmmsg(2), and its view of the kernel's per-datagram lengths (msg_len). None if libc
    or the kernel has no recvmmsg."""
    try:
        import ctypes
    except ImportError:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    c_void_p, c_size_t = ctypes.c_void_p, ctypes.c_size_t

    class iovec(ctypes.Structure):
        _fields_ = [("iov_base", c_void_p), ("iov_len", c_size_t)]

    class msghdr(ctypes.Structure):
        _fields_ = [
            ("msg_name", c_void_p),
            ("msg_namelen", ctypes.c_uint32),
            ("msg_iov", c_void_p),
            ("msg_iovlen", c_size_t),
            ("msg_control", c_void_p),
            ("msg_controllen", c_size_t),
            ("msg_flags", ctypes.c_int),
        ]

    class mmsghdr(ctypes.Structure):
        _fields_ = [("msg_hdr", msghdr), ("msg_len", ctypes.c_uint)]

    if ctypes.sizeof(mmsghdr) % 4 or mmsghdr.msg_len.offset % 4:
        return None
    data = (ctypes.c_char * len(slots)).from_buffer(slots)
    base = ctypes.addressof(data)
    iovs = (iovec * nslots)()
    hdr_bytes = bytearray(ctypes.sizeof(mmsghdr) * nslots)
    hdrs = (mmsghdr * nslots).from_buffer(hdr_bytes)
    for i in range(nslots):
        iovs[i].iov_base = base + i * _SLOT
        iovs[i].iov_len = _SLOT
        hdrs[i].msg_hdr.msg_iov = ctypes.addressof(iovs[i])
        hdrs[i].msg_hdr.msg_iovlen = 1
    words = ctypes.sizeof(mmsghdr) // 4
    lens = memoryview(hdr_bytes).cast("I")[mmsghdr.msg_len.offset // 4 :: words]
    # vlen 0 receives nothing but tells whether the syscall exists (old kernel, seccomp).
    if recvmmsg(fd, hdrs, 0, MSG_DONTWAIT, None) != 0:
        return None
    get_errno = ctypes.get_errno
    EAGAIN, ENOBUFS, EINTR = errno.EAGAIN, errno.ENOBUFS, errno.EINTR

    def fill(vlen: int, _keep=(data, iovs)) -> int:
        # No argtypes: ctypes' default conversion (int -> C int, array -> pointer, None ->
        # NULL) is about 0.45 us cheaper per call than argtypes converters. The kernel writes
        # into ``data`` through the iovecs: ``_keep`` holds both for as long as ``fill`` lives.
        while True:
            n = recvmmsg(fd, hdrs, vlen, MSG_DONTWAIT, None)
            if n >= 0:
                return n
            err = get_errno()
            if err == EAGAIN:
                return 0
            if err == ENOBUFS:
                return -1
            if err != EINTR:
                raise OSError(err, os.strerror(err))

    return fill, lens
