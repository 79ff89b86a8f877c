"""Benchmark: what the proc-connector reader ingests at the kernel's fork rates (not runtime)."""

from __future__ import annotations

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

/* argv: mode (vfork|fork) and count. Bounded by construction: exactly n children, each waited. */
int main(int argc, char **argv) {
    int use_vfork = argc > 1 && strcmp(argv[1], "vfork") == 0;
    long n = argc > 2 ? atol(argv[2]) : 10000;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
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
