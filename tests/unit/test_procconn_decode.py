"""The batch decoder of the proc-connector reader, fed synthetic datagrams through a real
datagram socket (a socketpair: no root, no connector), on both receive paths."""

from __future__ import annotations

import socket
import struct

import pytest

from cgguard.kernel.procconn import (
    _SLOT,
    _SLOT_EVENT,
    _SLOT_SEQ,
    BATCH_SLOTS,
    RECV_PER_DATAGRAM,
    RECV_RECVMMSG,
    ProcConnector,
    deliver,
)
from cgguard.kernel.procconn_abi import (
    _EVENT,
    _EVENT_OFFSET,
    FILTER_LEGACY,
    MSG_SIZE,
    PROC_EVENT_COMM,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    PROC_EVENT_NONE,
)
from cgguard.testkit.cnproc import encode_event
from connector import ListSink


@pytest.fixture(params=[RECV_RECVMMSG, RECV_PER_DATAGRAM])
def pair(request):
    """(reader, sender): a reader on one end of a datagram socketpair, on the receive path
    the test is parametrized with."""
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tx.setblocking(False)  # a full queue must fail the test, not hang it
    # The send buffer bounds what is queued (about 280 events by default); doubled rmem_max
    # (what a non-root process gets at most) holds more than two batches.
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    made: list[ProcConnector] = []

    def make(mode: str = "event-filter") -> ProcConnector:
        conn = ProcConnector.over_socket(rx, mode, use_recvmmsg=request.param == RECV_RECVMMSG)
        if conn.stats.recv_path != request.param:
            reason = f"no recvmmsg here: the reader uses {conn.stats.recv_path}"
            print(reason)
            pytest.skip(reason)
        made.append(conn)
        return conn

    yield make, tx
    for c in made:
        c.close()
    rx.close()
    tx.close()


def fork(i: int, seq: int = 0, cpu: int = 0) -> bytes:
    return encode_event(PROC_EVENT_FORK, 1_000 + i, (100, 100, 1_000 + i, 1_000 + i), seq=seq, cpu=cpu)


def expected_fork(i: int) -> tuple:
    return ("fork", 1_000 + i, 100, 100, 1_000 + i, 1_000 + i)


def test_mixed_stream_decodes_in_order_and_counts(pair):
    make, tx = pair
    conn = make()
    stream = [
        encode_event(PROC_EVENT_FORK, 10, (1, 1, 2, 2)),
        encode_event(PROC_EVENT_EXEC, 20, (2, 2)),
        encode_event(PROC_EVENT_NONE, 25, (0, 0)),  # an ACK to someone else's subscription
        encode_event(PROC_EVENT_COMM, 30, (2, 2)),
        encode_event(PROC_EVENT_FORK, 40, (2, 2, 3, 2)),  # a thread of 2
        encode_event(PROC_EVENT_EXIT, 50, (3, 2, 0, 17, 1, 1)),
        encode_event(PROC_EVENT_EXIT, 60, (2, 2, 256, 17, 1, 1)),
    ]
    for d in stream:
        tx.send(d)
    sink = ListSink()
    assert conn.read(sink) == len(stream)  # every datagram counts, NONE included
    assert sink.events == [
        ("fork", 10, 1, 1, 2, 2),
        ("exec", 20, 2, 2),
        ("fork", 40, 2, 2, 3, 2),
        ("exit", 50, 3, 2, 0, 17),
        ("exit", 60, 2, 2, 256, 17),
    ]
    s = conn.stats
    assert (s.forks, s.execs, s.exits, s.other, s.received) == (2, 1, 2, 1, 6)
    assert conn.read(sink) == 0 and not sink.losses


def test_more_than_one_batch_and_max_events_keep_order(pair):
    make, tx = pair
    conn = make()
    n = BATCH_SLOTS + 150  # more than one batch, below the socketpair's datagram queue limit
    for i in range(n):
        tx.send(fork(i))
    sink = ListSink()
    assert conn.read(sink, 100) == 100  # stops at max_events mid-queue
    assert conn.read(sink, 1 << 16) == n - 100
    assert sink.events == [expected_fork(i) for i in range(n)]
    assert conn.stats.forks == conn.stats.received == n


def test_short_datagrams_are_skipped_and_long_ones_decoded(pair):
    make, tx = pair
    conn = make()
    tx.send(fork(0))
    tx.send(b"\x01" * 20)  # not an event: skipped, not counted as handled
    tx.send(fork(1))
    tx.send(fork(2) + b"\xff" * 300)  # longer than a slot: only its first 76 bytes matter
    tx.send(fork(3)[: MSG_SIZE - 1])
    tx.send(fork(4))
    sink = ListSink()
    assert conn.read(sink) == 4
    assert sink.events == [expected_fork(i) for i in (0, 1, 2, 4)]


def test_legacy_mode_counts_sequence_gaps_per_cpu(pair):
    make, tx = pair
    conn = make(FILTER_LEGACY)
    for d in (
        fork(0, seq=10, cpu=0),
        fork(1, seq=500, cpu=1),
        fork(2, seq=11, cpu=0),
        # An ACK from a kernel before 5.x echoes the sender's seq with cpu -1: not in the sequence.
        encode_event(PROC_EVENT_NONE, 5, seq=99, cpu=0xFFFFFFFF),
        # Newer kernels number ACKs like events (seen on 6.18): this one is not a gap.
        encode_event(PROC_EVENT_NONE, 5, seq=12, cpu=0),
        fork(3, seq=16, cpu=0),  # 13, 14, 15 lost
        fork(4, seq=501, cpu=1),
        fork(5, seq=3, cpu=1),  # backwards: a reset or reordering, not loss
        fork(6, seq=4, cpu=1),
    ):
        tx.send(d)
    sink = ListSink()
    conn.read(sink)
    assert [e[1] for e in sink.events] == [1_000 + i for i in range(7)]
    assert conn.stats.seq_gaps == 1 and conn.stats.lost_seq_estimate == 3
    assert sink.losses == ["seq-gap"]
    tx.send(fork(7, seq=7, cpu=1))  # the gap tracking carries over to the next read
    conn.read(sink)
    assert conn.stats.seq_gaps == 2 and conn.stats.lost_seq_estimate == 5


def test_filtered_mode_ignores_sequence_numbers(pair):
    make, tx = pair
    conn = make()
    tx.send(fork(0, seq=1))
    tx.send(fork(1, seq=1000))  # the kernel numbers the events its filter dropped, too
    sink = ListSink()
    conn.read(sink)
    assert len(sink.events) == 2 and conn.stats.lost_seq_estimate == 0 and not sink.losses


def test_early_datagrams_come_first_once_and_in_order(pair):
    make, tx = pair
    conn = make()
    # As if they had raced the subscription ACK: more than a batch, one of them too short.
    conn._early.extend(fork(i) for i in range(BATCH_SLOTS + 10))
    conn._early.insert(5, b"\x00" * 40)
    tx.send(fork(BATCH_SLOTS + 10))
    sink = ListSink()
    assert conn.read(sink, 200) == 200
    assert conn.read(sink) == 67  # the other 66 early ones, then the socket
    assert conn.read(sink) == 0
    assert sink.events == [expected_fork(i) for i in range(BATCH_SLOTS + 11)]
    assert conn.stats.forks == BATCH_SLOTS + 11
    # Nothing usable stashed: the socket is read all the same.
    conn._early.append(b"\x00" * 10)
    tx.send(fork(BATCH_SLOTS + 11))
    assert conn.read(sink) == 1 and sink.events[-1] == expected_fork(BATCH_SLOTS + 11)


def test_sink_exception_propagates_and_the_counters_stay_right(pair):
    make, tx = pair
    conn = make()
    for i in range(5):
        tx.send(fork(i))

    class Failing(ListSink):
        def on_fork(self, *a):
            if len(self.events) == 2:
                raise RuntimeError("sink broke")
            super().on_fork(*a)

    with pytest.raises(RuntimeError):
        conn.read(Failing())
    assert conn.stats.forks == 3  # two delivered, and the one the sink failed on


def test_closed_reader_fails_instead_of_reading_a_reused_descriptor(pair):
    make, _tx = pair
    conn = make()
    conn.close()
    with pytest.raises(OSError):
        conn.read(ListSink())


def test_replay_deliver_matches_the_reader(pair):
    make, tx = pair
    conn = make()
    stream = [fork(0), encode_event(PROC_EVENT_EXEC, 5, (7, 7)), encode_event(PROC_EVENT_EXIT, 6, (7, 7, 9, 17))]
    for d in stream:
        tx.send(d)
    live, replayed = ListSink(), ListSink()
    conn.read(live)
    whats = [deliver(replayed, _EVENT.unpack_from(d, _EVENT_OFFSET)) for d in stream]
    assert replayed.events == live.events and whats == [PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT]


def test_slot_layout_matches_the_kernel_struct():
    # The slot decoder and the fixed-offset decoder agree on every field a sink gets.
    d = encode_event(PROC_EVENT_EXIT, 123456789012, (11, 12, 13, 14, 15, 16), seq=77, cpu=3)
    seq, what, cpu, ts, a, b, c, dd, _e, _f = _EVENT.unpack_from(d, _EVENT_OFFSET)

    slot = d + bytes(_SLOT - len(d))
    assert _SLOT_EVENT.unpack(slot) == (what, ts, a, b, c, dd) == (PROC_EVENT_EXIT, 123456789012, 11, 12, 13, 14)
    assert _SLOT_SEQ.unpack(slot) == (seq, what, cpu) == (77, PROC_EVENT_EXIT, 3)
    assert struct.calcsize("=IHHII") + struct.calcsize("=IIIIHH") + 40 == MSG_SIZE


class ScriptedSocket:
    """A socket whose recv_into plays a script of datagrams and errors: the kernel's ENOBUFS
    cannot be caused on demand, so the per-datagram path's handling of it is tested here."""

    family = socket.AF_UNIX

    def __init__(self, script: list):
        self.script = list(script)

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def recv_into(self, buf) -> int:
        if not self.script:
            raise BlockingIOError(11, "empty")
        item = self.script.pop(0)
        if isinstance(item, int):
            raise OSError(item, "scripted")
        buf[: len(item)] = item
        return len(item)

    def close(self) -> None:
        pass


def test_enobufs_in_the_middle_of_a_batch_is_reported_in_place():
    import errno

    order: list = []

    class Sink(ListSink):
        def on_fork(self, ts_ns, *a):
            order.append(ts_ns)

        def on_loss(self, reason):
            order.append(reason)

    sock = ScriptedSocket([fork(0), fork(1), errno.ENOBUFS, fork(2), errno.ENOBUFS, errno.ENOBUFS, fork(3)])
    conn = ProcConnector.over_socket(sock, use_recvmmsg=False)
    assert conn.read(Sink()) == 7  # four events and three loss reports
    assert order == [1_000, 1_001, "enobufs", 1_002, "enobufs", "enobufs", 1_003]
    assert conn.stats.lost_enobufs == 3 and conn.stats.forks == 4
    # Any other error ends the read, after the datagrams that came before it.
    sock.script = [fork(4), errno.EBADF]
    with pytest.raises(OSError):
        conn.read(Sink())
    assert order[-1] == 1_004
