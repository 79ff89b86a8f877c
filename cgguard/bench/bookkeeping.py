"""Benchmark: per-event cost and memory of the lineage tree on synthetic streams (not runtime)."""

from __future__ import annotations

import time

from cgguard.kernel.procfs import ProcStat
from cgguard.state.lineage import LineageTree


class _BenchProc:
    """A /proc that knows one process: the origin of the synthetic stream."""

    def stat(self, pid: int) -> ProcStat | None:
        return ProcStat(pid, "bench", "S", 1, 0, 1) if pid == 1 else None

    def cmdline(self, pid: int) -> str | None:
        return "bench --origin" if pid == 1 else None


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_bookkeeping(n: int = 100_000) -> dict:
    """Per-event cost of the tree and memory per record, on a synthetic stream of ``n`` forks
    shaped like a bomb (every record forks two children), then ``n`` exits; plus fork+exit
    churn (an xargs-like parent). Bytes per record come from tracemalloc in a separate pass,
    RSS from /proc/self/status with ``n`` live records held."""
    import gc
    import tracemalloc

    def build() -> tuple[LineageTree, list[int], float]:
        tree = LineageTree(in_scope=lambda cg: True, cgroup_of=lambda pid: "bench", proc=_BenchProc())  # type: ignore[arg-type]
        tree.on_exec(1, 1, 1)
        pids = list(range(2, n + 2))
        on_fork = tree.on_fork
        t0 = time.perf_counter()
        for i, pid in enumerate(pids):
            parent = 1 if i < 2 else pids[(i - 2) // 2]
            on_fork(1000 + i, parent, parent, pid, pid)
        return tree, pids, time.perf_counter() - t0

    gc.collect()
    rss0 = _rss_bytes()
    tree, pids, t_fork = build()
    gc.collect()
    rss1 = _rss_bytes()
    records = tree.stats.records
    on_exit = tree.on_exit
    t0 = time.perf_counter()
    for i, pid in enumerate(pids):
        on_exit(10**9 + i, pid, pid, 0, 17)
    t_exit = time.perf_counter() - t0
    left = tree.stats.records
    del tree
    gc.collect()

    churn = LineageTree(in_scope=lambda cg: True, cgroup_of=lambda pid: "bench", proc=_BenchProc())  # type: ignore[arg-type]
    churn.on_exec(1, 1, 1)
    t0 = time.perf_counter()
    for i in range(n):
        pid = 2 + i % 30000
        churn.on_fork(2000 + 2 * i, 1, 1, pid, pid)
        churn.on_exit(2001 + 2 * i, pid, pid, 0, 17)
    t_churn = time.perf_counter() - t0

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tree, _, _ = build()
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del tree
    gc.collect()
    return {
        "n": n,
        "records": records,
        "us_per_fork": round(t_fork / n * 1e6, 3),
        "us_per_exit": round(t_exit / n * 1e6, 3),
        "us_per_churn_event": round(t_churn / (2 * n) * 1e6, 3),
        "records_after_exits": left,
        "bytes_per_record": round(traced / n),
        "rss_delta_bytes": rss1 - rss0,
        "rss_bytes_with_records": rss1,
    }
