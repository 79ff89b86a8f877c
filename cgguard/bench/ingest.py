"""Benchmark: what the proc-connector reader ingests at the kernel's fork rates (not runtime)."""

from __future__ import annotations

import errno
import time

from cgguard.kernel.procconn import EventSink, ProcConnector
from cgguard.testkit.corpus import compile_c

_FORK_LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* argv: mode (vfork|fork), count, and optionally a rate in forks/s (default: as fast as
   possible). Bounded by construction: exactly n children, each waited. */
int main(int argc, char **argv) {
    int use_vfork = argc > 1 && strcmp(argv[1], "vfork") == 0;
    long n = argc > 2 ? atol(argv[2]) : 10000;
    long rate = argc > 3 ? atol(argv[3]) : 0;
    long step_ns = rate > 0 ? 1000000000L / rate : 0;
    struct timespec a, b, next;
    clock_gettime(CLOCK_MONOTONIC, &a);
    next = a;
    for (long i = 0; i < n; i++) {
        if (step_ns) {
            next.tv_nsec += step_ns;
            while (next.tv_nsec >= 1000000000L) { next.tv_nsec -= 1000000000L; next.tv_sec++; }
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        }
        pid_t p = use_vfork ? vfork() : fork();
        if (p == 0) _exit(0);
        if (p < 0) { perror("fork"); return 1; }
        waitpid(p, NULL, 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%ld %ld\n", n, (long)((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec)));
    return 0;
}
"""


def compile_fork_loop(workdir: str) -> str:
    """Compile the bounded C fork loop into ``workdir``; returns the binary's path."""
    return compile_c(_FORK_LOOP_C, "forkloop", workdir)


class _CountingSink:
    """Counts the events of one workload (forks by ``parent``, exits of those children) and
    passes every event on to ``inner`` if given."""

    __slots__ = ("parent", "children", "forks", "exits", "losses", "total", "inner")

    def __init__(self, inner: EventSink | None = None) -> None:
        self.parent = -1
        self.children: set[int] = set()
        self.forks = self.exits = self.total = 0
        self.losses: list[str] = []
        self.inner = inner

    def on_fork(self, ts_ns, parent_pid, parent_tgid, child_pid, child_tgid):
        self.total += 1
        if parent_tgid == self.parent:
            self.forks += 1
            self.children.add(child_tgid)
        if self.inner is not None:
            self.inner.on_fork(ts_ns, parent_pid, parent_tgid, child_pid, child_tgid)

    def on_exec(self, ts_ns, pid, tgid):
        self.total += 1
        if self.inner is not None:
            self.inner.on_exec(ts_ns, pid, tgid)

    def on_exit(self, ts_ns, pid, tgid, exit_code, exit_signal):
        self.total += 1
        if tgid in self.children:
            self.children.discard(tgid)
            self.exits += 1
        if self.inner is not None:
            self.inner.on_exit(ts_ns, pid, tgid, exit_code, exit_signal)

    def on_loss(self, reason):
        self.losses.append(reason)
        if self.inner is not None:
            self.inner.on_loss(reason)


def _run_loop(sb, exe: str, mode: str, n: int, conn: ProcConnector | None, sink: _CountingSink | None, label: str) -> dict:
    import subprocess

    cg = sb.cgroup(f"ingest-{mode}-{label}")
    w = sb.spawn([exe, mode, str(n)], cg, deadline_s=10.0, cap=16, stdout=subprocess.PIPE)
    if sink is not None:
        sink.parent = w.proc.pid  # the enter script execs the loop: same pid
    cpu0 = time.thread_time()
    t0 = time.monotonic()
    while w.proc.poll() is None:
        if conn is not None and sink is not None:
            if conn.wait(0.05):
                conn.read(sink, 1 << 16)
        else:
            time.sleep(0.01)
    t_end = time.monotonic()
    if conn is not None and sink is not None:
        # Drain what is still queued: the loop's last events and any backlog.
        idle = 0
        while idle < 3:
            if conn.read(sink, 1 << 16) == 0:
                idle += 1
                conn.wait(0.02)
    out = w.proc.stdout.read().decode().split() if w.proc.stdout else []
    if len(out) != 2:
        raise RuntimeError(f"fork loop ({mode}) failed: {out!r}")
    done, ns = int(out[0]), int(out[1])
    res = {"forks": done, "loop_s": ns / 1e9, "forks_per_s": round(done / (ns / 1e9))}
    if conn is not None and sink is not None:
        wall = t_end - t0
        res.update(
            seen_forks=sink.forks,
            seen_exits=sink.exits,
            events_total=sink.total,
            reader_cpu_s=round(time.thread_time() - cpu0, 3),
            events_per_s=round(sink.total / wall) if wall > 0 else 0,
            lost_enobufs=sum(1 for r in sink.losses if r == "enobufs"),
            complete=sink.forks == done and sink.exits == done,
        )
    return res


def measure_ingest(n_forks: int = 20000, rcvbuf: int = 32 << 20) -> dict:
    """Kernel fork rates of a bounded C loop (vfork+_exit and fork+waitpid), without and with
    this reader attached, and what the reader ingests meanwhile (events/s, loss, CPU): into a
    counting sink, and for vfork also into a LineageTree that tracks every child.

    Also measures the pure drain rate: the loop runs while nobody reads, then the queued backlog
    is decoded in one go. Every loop runs inside a contained Sandbox (cap 16, deadline 10 s).
    """
    import tempfile

    from cgguard.state.lineage import LineageTree
    from cgguard.testkit.sandbox import Sandbox

    out: dict = {"n_forks": n_forks}
    with tempfile.TemporaryDirectory(prefix="cgguard-forkloop-") as tmp:
        exe = compile_fork_loop(tmp)
        sb = Sandbox.create(prefix="cgguard-bench", cap=64)
        try:
            for mode in ("vfork", "fork"):
                out[f"{mode}_no_listener"] = _run_loop(sb, exe, mode, n_forks, None, None, "off")
                with ProcConnector(rcvbuf=rcvbuf) as conn:
                    r = _run_loop(sb, exe, mode, n_forks, conn, _CountingSink(), "reader")
                    r["filter_mode"] = conn.filter_mode
                    r["recv_path"] = conn.stats.recv_path
                    r["lost_seq_estimate"] = conn.stats.lost_seq_estimate
                    out[f"{mode}_with_reader"] = r
            with ProcConnector(rcvbuf=rcvbuf) as conn:
                tree = LineageTree(in_scope=lambda cg: cg == sb.name or cg.startswith(sb.name + "/"))
                r = _run_loop(sb, exe, "vfork", n_forks, conn, _CountingSink(tree), "tree")
                r["tree_records_left"] = tree.stats.records
                out["vfork_with_tree"] = r
            # Drain throughput: queue the events unread, then decode the backlog.
            with ProcConnector(rcvbuf=max(rcvbuf, 64 << 20)) as conn:
                cg = sb.cgroup("ingest-drain")
                w = sb.spawn([exe, "vfork", str(n_forks)], cg, deadline_s=10.0, cap=16)
                w.proc.wait(timeout=10)
                sink = _CountingSink()
                sink.parent = w.proc.pid
                t0 = time.perf_counter()
                c0 = time.thread_time()
                while conn.read(sink, 1 << 16):
                    pass
                dt = time.perf_counter() - t0
                out["drain"] = {
                    "events": sink.total,
                    "seen_forks": sink.forks,
                    "seconds": round(dt, 4),
                    "events_per_s": round(sink.total / dt) if dt else 0,
                    "cpu_s_per_100k": round((time.thread_time() - c0) / max(sink.total, 1) * 1e5, 3),
                    "lost_enobufs": conn.stats.lost_enobufs,
                }
        finally:
            left = sb.close()
    if left:
        raise RuntimeError(f"cgroups left behind: {left}")
    return out


# -- reader variants: batched vs per datagram ------------------------------------------------
class _PerDatagramReader:
    """The reader as it was before batching, kept here only to compare against: one
    ``recv_into`` syscall per datagram, one ``unpack_from`` per event, legacy sequence tracking
    inline. It reads the socket (and updates the stats) of ``conn``."""

    def __init__(self, conn: ProcConnector) -> None:
        self.conn = conn
        self.buf = bytearray(4096)

    def fileno(self) -> int:
        return self.conn.fileno()

    def read(self, sink: EventSink, max_events: int = 8192) -> int:
        from cgguard.kernel.procconn_abi import (
            _EVENT,
            _EVENT_OFFSET,
            FILTER_LEGACY,
            MSG_SIZE,
        )

        conn = self.conn
        handled = 0
        recv_into = conn._sock.recv_into
        buf = self.buf
        unpack = _EVENT.unpack_from
        on_fork, on_exec, on_exit = sink.on_fork, sink.on_exec, sink.on_exit
        track_seq = conn.stats.filter_mode == FILTER_LEGACY
        seqs = conn._seq
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
                    conn.stats.lost_enobufs += 1
                    sink.on_loss("enobufs")
                    handled += 1
                    continue
                if n < MSG_SIZE:
                    continue
                seq, what, cpu, ts, a, b, c, d, _e, _f = unpack(buf, _EVENT_OFFSET)
                handled += 1
                if track_seq and what:
                    last = seqs.get(cpu)
                    seqs[cpu] = seq
                    if last is not None:
                        gap = (seq - last - 1) & 0xFFFFFFFF
                        if 0 < gap < 0x80000000:
                            conn.stats.seq_gaps += 1
                            conn.stats.lost_seq_estimate += gap
                            sink.on_loss("seq-gap")
                if what == 1:
                    forks += 1
                    on_fork(ts, a, b, c, d)
                elif what == 0x80000000:
                    exits += 1
                    on_exit(ts, a, b, c, d)
                elif what == 2:
                    execs += 1
                    on_exec(ts, a, b)
                elif what:
                    other += 1
        finally:
            st = conn.stats
            st.forks += forks
            st.execs += execs
            st.exits += exits
            st.other += other
            st.received += forks + execs + exits + other
        return handled


class _NullSink:
    """Takes every event and does nothing: what is left is the reader's own cost."""

    def on_fork(self, ts_ns, parent_pid, parent_tgid, child_pid, child_tgid):
        pass

    def on_exec(self, ts_ns, pid, tgid):
        pass

    def on_exit(self, ts_ns, pid, tgid, exit_code, exit_signal):
        pass

    def on_loss(self, reason):
        pass


# name -> (ProcConnector keyword arguments, read through the old per-datagram reader)
READER_VARIANTS: dict[str, tuple[dict, bool]] = {
    "before": ({"use_recvmmsg": False}, True),
    "recv_into": ({"use_recvmmsg": False}, False),
    "recvmmsg": ({}, False),
}


def _open_variant(name: str, rcvbuf: int):
    kw, old = READER_VARIANTS[name]
    conn = ProcConnector(rcvbuf=rcvbuf, **kw)
    return conn, (_PerDatagramReader(conn) if old else conn)


def _agent_loop(conn: ProcConnector, reader, sink, proc, coalesce_ns: int = 2_000_000, max_events: int = 8192) -> dict:
    """Read the way the agent does until ``proc`` exits, then drain the rest: wait for the socket,
    coalesce wake-ups to one per ``coalesce_ns``, read up to ``max_events`` per wake-up."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(conn.fileno(), selectors.EVENT_READ)
    clock, cpu = time.monotonic_ns, time.thread_time_ns
    last = wakes = read_ns = 0
    r0 = conn.stats.received
    c0, t0 = cpu(), clock()
    try:
        while proc.poll() is None:
            if not sel.select(0.05):
                continue
            wait = last + coalesce_ns - clock()
            if wait > 0:
                time.sleep(wait / 1e9)
            last = clock()
            c = cpu()
            reader.read(sink, max_events)
            read_ns += cpu() - c
            wakes += 1
        t_end = clock()
        idle = 0
        while idle < 3:
            c = cpu()
            n = reader.read(sink, max_events)
            read_ns += cpu() - c
            if n == 0:
                idle += 1
                sel.select(0.02)
    finally:
        sel.close()
    events = conn.stats.received - r0
    wall = (t_end - t0) / 1e9
    return {
        "events": events,
        "events_per_s": round(events / wall) if wall > 0 else 0,
        "wakeups": wakes,
        "events_per_wakeup": round(events / max(wakes, 1), 1),
        "loop_cpu_us_per_event": round((cpu() - c0) / 1e3 / max(events, 1), 3),
        "read_cpu_us_per_event": round(read_ns / 1e3 / max(events, 1), 3),
        "lost_enobufs": conn.stats.lost_enobufs,
    }


def _fork_output(w) -> tuple[int, float]:
    out = w.proc.stdout.read().decode().split()
    if len(out) != 2:
        err = w.proc.stderr.read().decode().strip() if w.proc.stderr else ""
        raise RuntimeError(f"fork loop failed (exit {w.proc.wait()}): {out!r} {err}")
    return int(out[0]), int(out[1]) / 1e9


def _drain_trial(sb, exe: str, variant: str, n_forks: int) -> dict:
    import subprocess

    conn, reader = _open_variant(variant, 64 << 20)
    with conn:
        w = sb.spawn([exe, "vfork", str(n_forks)], sb.cgroup(f"drain-{variant}"), deadline_s=10.0, cap=16, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        w.proc.wait(timeout=10)
        _fork_output(w)
        sink = _NullSink()
        t0, c0 = time.perf_counter(), time.thread_time()
        while reader.read(sink, 1 << 16):
            pass
        dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
        ev = conn.stats.received
        return {
            "events": ev,
            "complete": conn.stats.forks >= n_forks and conn.stats.exits >= n_forks,
            "events_per_s": round(ev / dt) if dt else 0,
            "cpu_us_per_event": round(cpu / max(ev, 1) * 1e6, 3),
            "lost_enobufs": conn.stats.lost_enobufs,
        }


def _live_trial(sb, exe: str, variant: str, n_forks: int, rate: int, rcvbuf: int) -> dict:
    import subprocess

    conn, reader = _open_variant(variant, rcvbuf)
    with conn:
        args = [exe, "vfork", str(n_forks)] + ([str(rate)] if rate else [])
        w = sb.spawn(args, sb.cgroup(f"live-{variant}"), deadline_s=10.0 + (n_forks / rate if rate else 0), cap=16,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        r = _agent_loop(conn, reader, _NullSink(), w.proc)
        done, secs = _fork_output(w)
        r["forks_per_s"] = round(done / secs) if secs else 0
        r["complete"] = conn.stats.forks >= done and conn.stats.exits >= done and conn.stats.lost_enobufs == 0
        return r


def _injector(conn: ProcConnector):
    """A second NETLINK_CONNECTOR socket whose datagrams go straight to ``conn``'s port (as root
    one may unicast to another netlink socket): synthetic events with no process behind them."""
    import socket

    from cgguard.kernel.procconn_abi import NETLINK_CONNECTOR

    tx = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    tx.bind((0, 0))
    return tx, (conn._sock.getsockname()[0], 0)


def measure_read_cost(k_values: tuple[int, ...] = (1, 2, 5, 64, 4096), reps: int = 1000,
                      variants: tuple[str, ...] = tuple(READER_VARIANTS)) -> dict:
    """Warm CPU cost of one read() call that finds ``k`` datagrams queued (injected into the
    socket), per variant: what a wake-up costs the reader itself, without the cold caches and
    scheduler noise of the live trials. Variants alternate call by call so that they share the
    machine's noise; the median of ``reps`` calls is reported (fewer for large ``k``)."""
    import contextlib
    import statistics

    from cgguard.testkit.cnproc import encode_event

    sink = _NullSink()
    with contextlib.ExitStack() as stack:
        opened = []
        for v in variants:
            conn, reader = _open_variant(v, 64 << 20)
            stack.enter_context(conn)
            tx, dest = _injector(conn)
            stack.enter_context(tx)
            opened.append((v, reader, tx, dest))
        out: dict = {v: {} for v in variants}
        for k in k_values:
            msgs = [encode_event(1 if i % 2 == 0 else 0x80000000, 10**12 + i, (5_000_000 + i,) * 4) for i in range(k)]
            samples: dict[str, list[int]] = {v: [] for v in variants}
            for _ in range(max(5, reps * 4 // max(4, k))):
                for v, reader, tx, dest in opened:
                    while reader.read(sink, 1 << 16):  # host events that came meanwhile
                        pass
                    for m in msgs:
                        tx.sendto(m, dest)
                    c0 = time.thread_time_ns()
                    reader.read(sink, 1 << 16)
                    samples[v].append(time.thread_time_ns() - c0)
            for v in variants:
                per_call = statistics.median(samples[v]) / 1e3
                out[v][k] = {"us_per_call": round(per_call, 2), "us_per_event": round(per_call / k, 3)}
    return out


def compare_readers(
    rounds: int = 3,
    drain_forks: int = 50_000,
    peak_forks: int = 50_000,
    trickle_rate: int = 300,
    trickle_s: float = 3.0,
    variants: tuple[str, ...] = tuple(READER_VARIANTS),
    log=print,
) -> dict:
    """Per-event reader CPU and events/s of each reader variant in three regimes: draining a
    backlog (``drain_forks`` fork+exit pairs queued unread), live at the kernel's peak rate (a C
    vfork loop) and a trickle (``trickle_rate`` forks/s, each fork and exit an event), read the
    way the agent reads (2 ms coalescing, up to 8192 events per wake-up), into a sink that does
    nothing. Variants run interleaved, ``rounds`` times; the median of each figure is reported.
    Counts include whatever else the host forks meanwhile."""
    import statistics
    import tempfile

    from cgguard.testkit.sandbox import Sandbox

    trials: dict[str, dict[str, list[dict]]] = {v: {"drain": [], "peak": [], "trickle": []} for v in variants}
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cgguard-forkloop-") as tmp:
        exe = compile_fork_loop(tmp)
        sb = Sandbox.create(prefix="cgguard-bench", cap=64)
        try:
            for rnd in range(rounds):
                for v in variants:
                    t = trials[v]
                    for regime, run in (
                        ("drain", lambda v=v: _drain_trial(sb, exe, v, drain_forks)),
                        ("peak", lambda v=v: _live_trial(sb, exe, v, peak_forks, 0, 32 << 20)),
                        ("trickle", lambda v=v: _live_trial(sb, exe, v, int(trickle_rate * trickle_s), trickle_rate, 32 << 20)),
                    ):
                        try:
                            t[regime].append(run())
                        except (RuntimeError, OSError) as e:  # a starved or killed loop: skip it
                            errors.append(f"round {rnd + 1} {v} {regime}: {e}")
                            log(errors[-1])
                            continue
                        log(f"round {rnd + 1} {v} {regime}: {t[regime][-1]}")
        finally:
            left = sb.close()
    if left:
        raise RuntimeError(f"cgroups left behind: {left}")
    out: dict = {"rounds": rounds, "drain_forks": drain_forks, "peak_forks": peak_forks, "trickle_rate": trickle_rate,
                 "errors": errors}
    for v, per in trials.items():
        out[v] = {}
        for regime, rs in per.items():
            if not rs:
                continue
            out[v][regime] = {
                k: (statistics.median(r[k] for r in rs) if not isinstance(rs[0][k], bool) else all(r[k] for r in rs))
                for k in rs[0]
            }
    return out


def format_comparison(res: dict) -> str:
    """A Markdown table of :func:`compare_readers`' medians."""
    head = ("| variant | drain µs/ev | drain ev/s | peak µs/ev (read) | peak ev/s | peak lost | "
            "trickle µs/ev (read) | trickle µs/ev (loop) | trickle ev/wake |")
    rows = [head, "|" + "---|" * 9]
    for v in READER_VARIANTS:
        if v not in res:
            continue
        if len(res[v]) < 3:
            continue
        d, p, t = res[v]["drain"], res[v]["peak"], res[v]["trickle"]
        rows.append(
            f"| {v} | {d['cpu_us_per_event']:.3f} | {d['events_per_s']:.0f} | {p['read_cpu_us_per_event']:.3f} | "
            f"{p['events_per_s']:.0f} | {p['lost_enobufs']:.0f} | {t['read_cpu_us_per_event']:.3f} | "
            f"{t['loop_cpu_us_per_event']:.3f} | {t['events_per_wakeup']:.1f} |"
        )
    return "\n".join(rows)


def format_read_cost(res: dict) -> str:
    """A Markdown table of :func:`measure_read_cost`: µs per read() call (and per event)."""
    ks = list(next(iter(res.values())))
    rows = ["| variant | " + " | ".join(f"{k} queued" for k in ks) + " |", "|" + "---|" * (len(ks) + 1)]
    for v, per in res.items():
        rows.append(f"| {v} | " + " | ".join(f"{per[k]['us_per_call']:.1f} ({per[k]['us_per_event']:.2f}/ev)" for k in ks) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    # python -m cgguard.bench.ingest [rounds]: the reader variants side by side (as root).
    import json
    import sys

    cost = measure_read_cost()
    res = compare_readers(rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    print(json.dumps({"read_cost": cost, "regimes": res}, indent=1))
    print(format_read_cost(cost))
    print(format_comparison(res))
