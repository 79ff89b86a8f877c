"""The lineage detector: bomb shapes are found well before 256 tasks, parallel work is spared.

Unit tests drive synthetic event streams through a LineageTree (see ``Sim`` in
tests/lineage_sim.py) and call the detector the way the agent does: the cheap pre-check after every
batch of events, a full evaluation when it says so. Benign shapes are also evaluated after
every batch regardless of the pre-check, so a pre-check that hides a false positive would not
pass. Integration tests run real bombs inside a contained Sandbox.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest

from cgguard.config import LineageDetect
from cgguard.detect.lineage import detect_lineage, qualifies
from cgguard.state import lineage_scan
from cgguard.state.lineage import LineageTree

from connector import connector as _connector
from connector import in_sandbox as _in
from connector import pump

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
P = LineageDetect()


# -- real bombs ----------------------------------------------------------------------------------
SEED_BOMB = "D=$((EPOCHSECONDS+4)); f(){ (( EPOCHSECONDS < D )) && { f|f & }; }; f"


def watch_real(conn, tree, fs, cg, until_s: float, stop=lambda: False):
    """Read events and evaluate like the agent until a verdict, ``stop()`` or the deadline."""
    deadline = time.monotonic() + until_s
    while time.monotonic() < deadline:
        conn.wait(0.01)
        conn.read(tree, 65536)
        tree.flush()
        if tree.loss_pending:
            lineage_scan.resync(tree, fs, [cg])
        if (tree.take_activity() and qualifies(tree, cg, time.monotonic_ns(), P)) or stop():
            v = detect_lineage(tree, cg, time.monotonic_ns(), P)
            if v is not None:
                return v
        if stop():
            return None
    return None


@contextlib.contextmanager
def realtime_reader():
    """Run this thread at SCHED_RR 1, as the agent does (config ``realtime``): a reader at normal
    priority shares two cores with the bomb and can lag behind the origin's short life.
    SCHED_RESET_ON_FORK keeps the processes this thread starts (the bomb) at normal priority."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(1))
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def test_real_seed_bomb_is_flagged_with_its_bash_as_origin(sandbox):
    sb = sandbox
    conn = _connector()
    try:
        tree = LineageTree(in_scope=_in(sb))
        cg = sb.cgroup("bomb")
        with realtime_reader():
            w = sb.spawn(["bash", "-c", SEED_BOMB], cg, deadline_s=5, cap=256)
            t0 = time.monotonic()
            v = watch_real(conn, tree, sb.fs, cg, 4.0)
            took = time.monotonic() - t0
            tasks = sb.v1_current(w) if sb.mode == "v1-pids" else sb.fs.task_count(cg).tasks
            assert v is not None, f"bomb not flagged; tree {tree.stats}"
            bash = w.proc.pid
            assert v.origin.pid == bash and v.origin.cmdline == "bash -c " + SEED_BOMB
            assert v.family >= P.min_family and len(v.members) >= P.min_family
            print(f"flagged after {took * 1000:.0f} ms: {v.summary()} (tasks now {tasks})")
            # The bash exits right after its first fork, but under the bomb its exit can come
            # after the verdict; once it has, the origin is a dead placeholder -- and the bomb,
            # pinned at pids.max, is still flagged.
            assert pump(conn, tree, lambda: tree.get(bash) is None, timeout=2.0), "the bash never exited"
            v2 = detect_lineage(tree, cg, time.monotonic_ns(), P)
        sb.kill(w)
        assert v2 is not None
        assert v2.origin.pid == bash and not v2.origin.alive
        assert v2.origin.cmdline == "bash -c " + SEED_BOMB
        assert (bash, v2.origin.start_ns) not in v2.members
    finally:
        conn.close()


@pytest.mark.parametrize(
    "script",
    [
        "seq 300 | xargs -P 16 -n 1 true",
        "for i in $(seq 300); do sleep 5 & done; wait",
    ],
    ids=["xargs-P16", "300-sleepers"],
)
def test_real_parallel_work_is_not_flagged(sandbox, script):
    sb = sandbox
    conn = _connector()
    try:
        tree = LineageTree(in_scope=_in(sb))
        cg = sb.cgroup("work")
        w = sb.spawn(["bash", "-c", script], cg, deadline_s=8, cap=512)
        started = time.monotonic()

        def settled() -> bool:
            # xargs: finished; sleepers: all 300 started.
            return w.proc.poll() is not None or (
                time.monotonic() - started > 0.5 and sum(1 for r in tree.records_in(cg) if r.alive) >= 301
            )

        v = watch_real(conn, tree, sb.fs, cg, 6.0, stop=settled)
        assert v is None, v.summary()
        assert detect_lineage(tree, cg, time.monotonic_ns(), P) is None
        assert sum(1 for r in tree.records_in(cg) if r.alive) >= 300 or w.proc.poll() is not None
        sb.kill(w)
    finally:
        conn.close()
