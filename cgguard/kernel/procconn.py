"""Kernel edge: reading the proc connector (NETLINK_CONNECTOR, group CN_IDX_PROC).

The datagram layout and constants are in :mod:`cgguard.kernel.procconn_abi`; opening the socket
(in a pyroute2 helper process, or directly) and the subscription handshake (event filter or
legacy) in :mod:`cgguard.kernel.procconn_socket`. This module reads and dispatches.

Reading: one recvmmsg(2) call (:mod:`cgguard.kernel.recvmmsg`) fills up to ``BATCH_SLOTS``
fixed-size slots of a preallocated buffer, and one ``struct.iter_unpack`` over the filled slots
feeds the single dispatch loop (:func:`_dispatch`), which is also the path for events that
arrived during the subscription and for replayed recordings (:func:`deliver`). Without recvmmsg
the same slots are filled with one ``recv_into`` per datagram. Measured on a 2-core VM (kernel
6.18; python -m cgguard.bench.ingest), reader CPU against the old loop (one recv_into and one
unpack_from per datagram): draining a 100k backlog 1.24 us/event instead of 1.85 (800k events/s
instead of 530k; most of what is left is the kernel's per-datagram work inside recvmmsg); live at
the C vfork loop's peak 1.57 instead of 2.75 us/event; a wake-up that finds 1 / 2 / 5 datagrams
3.9-5.4 / 4.7-7.2 / 6.7-10.3 us instead of 5.0-7.3 / 6.4-10.5 / 10.1-16.6 us, because the
empty-queue recv (an exception in Python) is gone. Batching pays in every regime, so there is
one path.

Loss: when the receive queue overflows the kernel drops events and the next ``recv`` fails once
with ENOBUFS (NETLINK_NO_ENOBUFS stays off: we want to know). Every event also carries a per-CPU
sequence number, so a gap on one CPU counts events that never reached us. Under the event filter
the kernel still numbers the events it filtered out for us, so there gaps are not loss and we do
not look at them.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from cgguard.kernel.procconn_abi import (
    DEFAULT_EVENTS,
    FILTER_EVENTS,
    FILTER_LEGACY,
    MSG_SIZE,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
)

# The constructor raises it: callers catch it from here.
from cgguard.kernel.procconn_abi import ProcConnectorUnavailable as ProcConnectorUnavailable
from cgguard.kernel.procconn_socket import open_socket, send_control, set_rcvbuf, subscribe, unsubscribe
from cgguard.kernel.recvmmsg import recvmmsg_fill

# Batched reading: every datagram goes into its own fixed-size slot of one preallocated buffer,
# so that a whole batch decodes with a single ``struct.iter_unpack`` and the sink gets tuples
# straight from it. A slot holds an event (76 bytes) with room to spare; a longer datagram is
# truncated, which is harmless: only the first 76 bytes are ever decoded.
_SLOT = 128
BATCH_SLOTS = 256
# The fields a sink needs, from one slot: what (36), [cpu], timestamp_ns (44), data[0..3] (52).
_SLOT_EVENT = struct.Struct(f"=36xI4xQIIII{_SLOT - 68}x")
# Legacy mode only: seq (24), what (36), cpu (40).
_SLOT_SEQ = struct.Struct(f"=24xI8xII{_SLOT - 44}x")
# What every datagram's length is, compared per batch: a batch that differs takes the slow path.
_EXPECTED_LENS = memoryview(bytearray(struct.pack("=I", MSG_SIZE) * BATCH_SLOTS)).cast("I")

RECV_RECVMMSG = "recvmmsg"
RECV_PER_DATAGRAM = "recv_into"


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
        sock, self.stats.socket_source = open_socket(use_pyroute2)
        try:
            self._init_reader(sock, use_recvmmsg)
            self.set_rcvbuf(rcvbuf)
            self._sock.setblocking(False)
            # The datagrams read while waiting for the ACK go to the first read().
            mode, enobufs = subscribe(self._sock, self._send_control, filter_events, events, ack_timeout_s, self._early)
            self.stats.filter_mode = mode
            self.stats.lost_enobufs += enobufs
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
        self._early: list[bytes] = []  # events read while waiting for the subscription ACK
        self._seq: dict[int, int] = {}
        self._slots = bytearray(_SLOT * BATCH_SLOTS)
        self._view = memoryview(self._slots)
        self._pending: OSError | None = None  # an error that came after a batch's datagrams
        # recv_into sees the EAGAIN itself, so its short batch always means an empty queue.
        self._confirm_short = False
        batched = recvmmsg_fill(self._sock.fileno(), self._slots, _SLOT, BATCH_SLOTS) if use_recvmmsg else None
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

    def set_rcvbuf(self, size: int) -> int:
        """Ask for ``size`` bytes of receive queue; as root SO_RCVBUFFORCE ignores rmem_max."""
        self.stats.rcvbuf = set_rcvbuf(self._sock, size)
        return self.stats.rcvbuf

    def _send_control(self, payload: bytes) -> int:
        # A method, so that a test can queue datagrams just before the subscription goes out.
        return send_control(self._sock, payload)

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
            unsubscribe(self._sock)
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
