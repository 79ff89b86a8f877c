"""Proc connector ingestion: decoding, subscription modes, loss, recordings, throughput."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from cgguard.kernel.procconn import (
    RECV_PER_DATAGRAM,
    RECV_RECVMMSG,
    ProcConnector,
    ProcConnectorUnavailable,
)
from cgguard.kernel.procconn_abi import FILTER_EVENTS, FILTER_LEGACY, NETLINK_CONNECTOR, PROC_EVENT_FORK
from cgguard.testkit.cnproc import RecordingSink, encode_event, replay
from connector import ListSink, connector

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


RECV_PATHS = [RECV_RECVMMSG, RECV_PER_DATAGRAM]


def connector_on(path: str, **kw) -> ProcConnector:
    """A connector reading with ``path``; skips if recvmmsg is asked for and missing."""
    conn = connector(use_recvmmsg=path == RECV_RECVMMSG, **kw)
    if conn.stats.recv_path != path:
        conn.close()
        reason = f"no recvmmsg here: the reader uses {conn.stats.recv_path}"
        print(reason)
        pytest.skip(reason)
    return conn


def drain(conn: ProcConnector, sink, until=lambda: False, timeout=3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.wait(0.02)
        conn.read(sink, 1 << 16)
        if until():
            return


# -- the kernel -------------------------------------------------------------------------------
def test_subscription_sees_fork_exec_exit_of_a_child():
    conn = connector()
    try:
        assert conn.filter_mode in (FILTER_EVENTS, FILTER_LEGACY)
        assert conn.socket_source in ("pyroute2", "socket")
        assert conn.stats.rcvbuf >= 32 << 20  # SO_RCVBUFFORCE as root (the kernel doubles it)
        p = subprocess.Popen(["sh", "-c", "exec /bin/true"])
        p.wait()
        sink = ListSink()
        drain(conn, sink, until=lambda: any(e[0] == "exit" for e in sink.of(p.pid)))
        kinds = [e[0] for e in sink.of(p.pid)]
        assert kinds[0] == "fork" and "exec" in kinds and kinds[-1] == "exit", kinds
        fork = sink.of(p.pid)[0]
        assert fork[3] == os.getpid() and fork[4] == fork[5] == p.pid
        assert abs(fork[1] - time.monotonic_ns()) < 5_000_000_000, "timestamps are CLOCK_MONOTONIC"
        assert conn.stats.forks >= 1 and conn.stats.received >= 3
        d = conn.stats_dict()
        assert d["mode"] == conn.filter_mode and d["lost"] >= d["enobufs"] >= 0
    finally:
        conn.close()


def test_pyroute2_binds_in_a_helper_and_the_agent_never_imports_it():
    """The socket comes from pyroute2, yet pyroute2's modules never load in the reading process."""
    code = (
        "import sys, subprocess, os\n"
        "from cgguard.kernel.procconn import ProcConnector\n"
        "c = ProcConnector()\n"
        "p = subprocess.Popen(['/bin/true']); p.wait()\n"
        "seen = []\n"
        "class S:\n"
        "    def on_fork(self, ts, pp, pt, cp, ct): seen.append(ct)\n"
        "    def on_exec(self, *a): pass\n"
        "    def on_exit(self, *a): pass\n"
        "    def on_loss(self, r): pass\n"
        "import time\n"
        "end = time.monotonic() + 10\n"
        "while p.pid not in seen and time.monotonic() < end:\n"
        "    c.wait(0.05); c.read(S(), 4096)\n"
        "print(c.stats.socket_source, p.pid in seen, sorted(m for m in sys.modules if m.startswith('pyroute2'))[:3])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    if "unavailable" in r.stderr:
        pytest.skip(f"proc connector unavailable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["pyroute2", "True", "[]"], r.stdout


def test_without_a_usable_helper_the_socket_is_opened_directly(monkeypatch):
    import cgguard.kernel.procconn_socket as pc

    monkeypatch.setattr(pc.sys, "executable", "")
    conn = connector()
    try:
        assert conn.socket_source == "socket"
        p = subprocess.Popen(["/bin/true"])
        p.wait()
        sink = ListSink()
        drain(conn, sink, until=lambda: any(e[0] == "exit" for e in sink.of(p.pid)))
        assert [e[0] for e in sink.of(p.pid)][-1] == "exit"
    finally:
        conn.close()


def test_legacy_subscription_tracks_sequence_numbers():
    conn = connector(filter_events=False)
    try:
        assert conn.filter_mode == FILTER_LEGACY
        for _ in range(20):
            subprocess.run(["/bin/true"])
        sink = ListSink()
        drain(conn, sink, timeout=0.3)
        assert conn.stats.forks >= 20
        # Sequence gaps mean loss: without an overflow (the host may be busy) there are none.
        if conn.stats.lost_enobufs == 0:
            assert conn.stats.lost_seq_estimate == 0 and not sink.losses
    finally:
        conn.close()


def test_filter_mode_receives_no_other_types():
    conn = connector()
    try:
        if conn.filter_mode != FILTER_EVENTS:
            pytest.skip("kernel has no proc connector event filter")
        # setsid() and a uid change produce SID/UID events that the filter must drop.
        subprocess.run(["setsid", "setpriv", "--reuid=nobody", "/bin/true"])
        sink = ListSink()
        drain(conn, sink, timeout=0.3)
        assert conn.stats.other == 0 and conn.stats.forks >= 1
    finally:
        conn.close()


@pytest.fixture(scope="module")
def fork_loop(tmp_path_factory):
    from cgguard.bench.ingest import compile_fork_loop

    if not __import__("shutil").which("gcc"):
        pytest.skip("no gcc")
    return compile_fork_loop(str(tmp_path_factory.mktemp("forkloop")))


@pytest.mark.parametrize("path", RECV_PATHS)
def test_batched_read_receives_every_event_of_a_c_loop(sandbox, fork_loop, path):
    n = 20_000
    # 40k events need about 33 MB of queue: with 64 MiB (128 as the kernel counts) nothing can
    # be dropped however slowly this test reads, so every event must arrive.
    conn = connector_on(path, rcvbuf=64 << 20)
    try:
        w = sandbox.spawn([fork_loop, "vfork", str(n)], sandbox.cgroup("batched"), deadline_s=10, cap=16)
        parent = w.proc.pid  # the enter script execs the loop: same pid
        forks, children, exits, losses = [0], set(), [0], []

        class Sink:
            def on_fork(self, ts, ppid, ptgid, pid, tgid):
                if ptgid == parent:
                    forks[0] += 1
                    children.add(tgid)

            def on_exec(self, ts, pid, tgid):
                pass

            def on_exit(self, ts, pid, tgid, code, sig):
                if tgid in children:
                    children.discard(tgid)
                    exits[0] += 1

            def on_loss(self, reason):
                losses.append(reason)

        sink = Sink()
        reads = 0
        while w.proc.poll() is None:  # read while the loop runs, as the agent does
            conn.wait(0.01)
            conn.read(sink, 8192)
            reads += 1
        drain(conn, sink, until=lambda: exits[0] == n, timeout=10)
        assert w.proc.returncode == 0
        assert (forks[0], exits[0], losses, conn.stats.lost_enobufs) == (n, n, [], 0)
        assert conn.stats.recv_path == path and reads > 1
    finally:
        conn.close()


@pytest.mark.parametrize("path", RECV_PATHS)
@pytest.mark.parametrize("filter_events", [True, False], ids=["filtered", "legacy"])
def test_overflow_is_reported_and_reading_continues(sandbox, fork_loop, filter_events, path):
    sb = sandbox
    conn = connector_on(path, rcvbuf=4096, filter_events=filter_events)
    try:
        cg = sb.cgroup("overflow")
        w = sb.spawn([fork_loop, "vfork", "3000"], cg, deadline_s=10, cap=16)
        w.proc.wait(timeout=10)  # nobody reads meanwhile: the tiny queue overflows
        sink = ListSink()
        conn.read(sink, 1 << 16)
        assert conn.stats.lost_enobufs >= 1 and "enobufs" in sink.losses
        # The socket keeps working after ENOBUFS (with room for the events that follow). One
        # process per CPU: a sequence gap shows when that CPU's next event arrives.
        conn.set_rcvbuf(1 << 20)
        for cpu in sorted(os.sched_getaffinity(0)):
            p = subprocess.Popen(["/bin/true"], preexec_fn=lambda cpu=cpu: os.sched_setaffinity(0, {cpu}))
            p.wait()
        drain(conn, sink, until=lambda: any(e[0] == "exit" for e in sink.of(p.pid)))
        assert any(e[0] == "exit" for e in sink.of(p.pid))
        if not filter_events:
            # Without the filter the per-CPU sequence numbers show how much was dropped, as
            # soon as the next event of that CPU arrives.
            assert conn.stats.lost_seq_estimate > 1000 and "seq-gap" in sink.losses, conn.stats
    finally:
        conn.close()


def synthetic_fork(i: int) -> bytes:
    # pids above PID_MAX_LIMIT (4194304): no real process can be mistaken for these.
    return encode_event(PROC_EVENT_FORK, i, (5_000_000, 5_000_000, 5_000_000 + i, 5_000_000 + i))


def unicast(conn: ProcConnector, datagrams: list[bytes]) -> None:
    """Queue ``datagrams`` on ``conn``'s socket: as root one may unicast to a netlink port."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR) as tx:
        tx.bind((0, 0))
        for d in datagrams:
            tx.sendto(d, (conn._sock.getsockname()[0], 0))


@pytest.mark.parametrize("path", RECV_PATHS)
def test_early_datagrams_are_delivered_once_and_in_order(path):
    class RacingSubscription(ProcConnector):
        """Events queued before the subscription is sent arrive before its ACK."""

        injected = False

        def _send_control(self, payload):
            if not self.injected:
                self.injected = True
                unicast(self, [synthetic_fork(0), b"\x00" * 30, synthetic_fork(1), synthetic_fork(2)])
            return super()._send_control(payload)

    try:
        conn = RacingSubscription(use_recvmmsg=path == RECV_RECVMMSG)
    except ProcConnectorUnavailable as e:
        print(f"SKIP reason: proc connector unavailable: {e}")
        pytest.skip(f"proc connector unavailable: {e}")
    try:
        if conn.stats.recv_path != path:
            reason = f"no recvmmsg here: the reader uses {conn.stats.recv_path}"
            print(reason)
            pytest.skip(reason)
        assert len(conn._early) >= 3, "the injected events were read while awaiting the ACK"
        unicast(conn, [synthetic_fork(3), b"\x01" * 12, synthetic_fork(4)])
        sink = ListSink()
        drain(conn, sink, until=lambda: len(sink.of(5_000_000)) >= 5, timeout=2)
        drain(conn, sink, timeout=0.1)  # and nothing comes twice
        assert [e[1] for e in sink.of(5_000_000)] == [0, 1, 2, 3, 4]
    finally:
        conn.close()


def test_record_and_replay_a_live_stream(tmp_path):
    conn = connector()
    path = str(tmp_path / "live.cnproc")
    try:
        live = ListSink()
        with open(path, "wb") as f:
            rec = RecordingSink(f, {"what": "live"}, inner=live)
            p = subprocess.Popen(["sh", "-c", "/bin/true; exec /bin/true"])
            p.wait()
            drain(conn, rec, until=lambda: any(e[0] == "exit" for e in live.of(p.pid)))
    finally:
        conn.close()
    again = ListSink()
    replay(path, again)
    assert again.events == live.events and len(live.of(p.pid)) >= 5


def test_measure_ingest_small(fork_loop):
    from cgguard.bench.ingest import measure_ingest

    try:
        ProcConnector().close()
    except ProcConnectorUnavailable as e:
        pytest.skip(f"proc connector unavailable: {e}")
    m = measure_ingest(3000)
    for mode in ("vfork", "fork"):
        r = m[f"{mode}_with_reader"]
        assert r["forks"] == 3000 and r["complete"], r
        assert m[f"{mode}_no_listener"]["forks_per_s"] > 0
    t = m["vfork_with_tree"]
    assert t["complete"] and t["tree_records_left"] == 0, t
    assert m["drain"]["seen_forks"] == 3000 and m["drain"]["events_per_s"] > 50_000
