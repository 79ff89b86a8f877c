"""The record tree fed by the real proc connector, with real processes in a Sandbox."""

from __future__ import annotations

import subprocess
import sys


from cgguard.state import lineage_scan
from cgguard.state.lineage import LineageTree
from cgguard.kernel.procfs import read_stat
from connector import connector as _connector
from connector import in_sandbox as _in
from connector import pump
from lineage_sim import MS, consistent


def test_real_threads_and_exec_are_accounted(sandbox):
    sb = sandbox
    conn = _connector()
    try:
        tree = LineageTree(in_scope=_in(sb))
        cg = sb.cgroup("threads")
        # Five threads for a while, then they end and the process execs: threads 6, then one
        # thread and a new comm.
        code = (
            "import threading, time, os\n"
            "ts = [threading.Thread(target=time.sleep, args=(0.6,)) for _ in range(5)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "os.execvp('sleep', ['sleep', '30'])\n"
        )
        w = sb.spawn([sys.executable, "-c", code], cg, deadline_s=10, cap=64)
        pid = w.proc.pid
        assert pump(conn, tree, lambda: tree.get(pid) is not None and tree.get(pid).threads == 6, batch=1), (
            f"threads: {tree.get(pid) and tree.get(pid).threads}"
        )
        assert tree.describe(tree.get(pid))[0].startswith("python")
        assert pump(conn, tree, lambda: (tree.get(pid).exec_ns or 0) > 0), f"exec not seen: {tree.get(pid)!r}"
        r = tree.get(pid)
        assert pump(conn, tree, lambda: r.threads == 1), r.threads
        assert tree.describe(r) == ("sleep", "sleep 30"), "read from /proc when asked"
        sb.kill(w)
    finally:
        conn.close()


def test_real_loss_is_reported_and_resync_matches_proc(sandbox):
    sb = sandbox
    conn = _connector(rcvbuf=4096)
    try:
        tree = LineageTree(in_scope=_in(sb))
        cg = sb.cgroup("burst")
        # 200 children that stay, plus churn: far more events than a 4 KiB queue holds.
        w = sb.spawn(
            "for i in $(seq 200); do sleep 30 & done; for i in $(seq 300); do /bin/true; done; echo done; wait",
            cg,
            deadline_s=10,
            cap=512,
            stdout=subprocess.PIPE,
        )
        assert w.proc.stdout.readline().strip() == b"done"
        conn.read(tree, 1 << 20)
        st = conn.stats
        assert st.lost_enobufs >= 1, st
        assert tree.loss_pending and tree.stats.losses >= 1
        lineage_scan.resync(tree, sb.fs, [cg])
        assert not tree.loss_pending and cg in tree.stats.incomplete
        consistent(tree)
        procs = set(sb.fs.procs(cg))
        live = {r.tgid for r in tree.records_in(cg) if r.alive}
        assert live == procs
        for r in tree.records_in(cg):
            if r.alive:
                st = read_stat(r.tgid)
                assert st is not None and abs(st.start_ns - r.start_ns) <= 30 * MS
        sb.kill(w)
    finally:
        conn.close()


# -- cost ----------------------------------------------------------------------------------
