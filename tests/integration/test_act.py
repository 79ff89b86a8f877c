"""Shared kill mechanics on real cgroups and real processes."""

import os
import shutil
import time

import psutil
import pytest

from cgguard import act
from cgguard.kernel.procfs import read_stat
from cgguard.testkit.corpus import leaderless_binary


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_kill_cgroup_removes_everything_and_confirms_populated_0(cgfs, sandbox):
    cg = sandbox.cgroup("victim")
    sub = sandbox.cgroup("victim/nested")
    sandbox.spawn("for i in $(seq 50); do sleep 30 & done; wait", cg, deadline_s=30)
    sandbox.spawn("sleep 30 & sleep 30 & wait", sub, deadline_s=30)
    assert wait_for(lambda: cgfs.count_threads_subtree(cg) >= 54)
    res = act.kill_cgroup(cgfs, cg, timeout_s=5)
    assert res.result == "removed" and res.survivors == 0
    assert res.tasks_before >= 54 and res.remove_ms is not None and res.remove_ms < 5000
    assert not cgfs.populated(cg)


def test_kill_cgroup_that_vanished_is_not_an_error(cgfs, sandbox):
    cg = sandbox.cgroup("gone")
    cgfs.rmdir(cg)
    res = act.kill_cgroup(cgfs, cg)
    assert res.result == "gone" and res.survivors == 0


def test_freeze_keeps_processes_frozen(cgfs, sandbox):
    cg = sandbox.cgroup("forensics")
    w = sandbox.spawn(["sleep", "30"], cg, deadline_s=30)
    assert wait_for(lambda: cgfs.populated(cg))
    res = act.freeze(cgfs, cg)
    assert res.result == "frozen"
    assert cgfs.frozen(cg) and w.proc.poll() is None
    cgfs.freeze(cg, False)


def test_kill_lineage_spares_innocents_and_catches_descendants(cgfs, sandbox):
    cg = sandbox.cgroup("shared")
    innocent = sandbox.spawn(["sleep", "60"], cg, deadline_s=60)
    # The "bomb" lineage: a parent whose children fork grandchildren; only the parent is named.
    bomb = sandbox.spawn("for i in 1 2 3; do (sleep 60 & sleep 60 & wait) & done; wait", cg, deadline_s=60)
    assert wait_for(lambda: len(cgfs.procs(cg)) >= 1 + 1 + 3 + 6)
    parent = read_stat(bomb.proc.pid)
    members = frozenset({(parent.pid, parent.start_ns)})
    res = act.kill_lineage(cgfs, cg, members, timeout_s=5)
    assert res.result == "removed", res.notes
    assert res.survivors == 0
    assert res.moved == 10  # the parent, 3 subshells, 6 sleeps
    assert res.innocents == 1
    assert innocent.proc.poll() is None  # alive
    assert psutil.Process(innocent.proc.pid).status() != psutil.STATUS_STOPPED
    assert not cgfs.frozen(cg)  # thawed
    assert cgfs.procs(cg) == [innocent.proc.pid]
    # the quarantine child is gone
    assert [c for c in cgfs.children(cg) if act.QUARANTINE_PREFIX in c] == []


def test_kill_lineage_never_takes_a_reused_pid(cgfs, sandbox):
    cg = sandbox.cgroup("reuse")
    innocent = sandbox.spawn(["sleep", "60"], cg, deadline_s=60)
    assert wait_for(lambda: cgfs.populated(cg))
    st = read_stat(innocent.proc.pid)
    # A record with the innocent's pid but another start time is a different (dead) process.
    stale = frozenset({(st.pid, st.start_ns - 5_000_000_000)})
    fallbacks = []
    res = act.kill_lineage(cgfs, cg, stale, fallback=lambda rel: fallbacks.append(rel) or act.ActionResult("report", "reported"))
    assert fallbacks == [cg]  # nothing matched: fell back, did not kill the innocent
    assert innocent.proc.poll() is None
    assert not cgfs.frozen(cg)
    assert any("no live member" in n for n in res.notes)


def test_wait_events_returns_none_when_cgroup_vanishes(cgfs, sandbox):
    cg = sandbox.cgroup("vanish")
    os.rmdir(cgfs.abspath(cg))
    assert act.wait_events(cgfs, cg, lambda ev: False, 0.2) is None


def test_kill_lineage_without_fallback_never_kills_unmatched_processes(cgfs, sandbox):
    """A lineage verdict whose members are not in the cgroup: nothing there is shown to be the
    bomb, so nothing is killed (a cgroup-level fallback would be a false kill)."""
    cg = sandbox.cgroup("unmatched")
    bystander = sandbox.spawn(["sleep", "60"], cg, deadline_s=60)
    assert wait_for(lambda: cgfs.populated(cg))
    ghost = frozenset({(4_000_000, 1)})
    res = act.kill_lineage(cgfs, cg, ghost, fallback=lambda rel: act.kill_cgroup(cgfs, rel), unmatched_fallback=False)
    assert res.result == "not-found" and res.survivors == 0
    assert bystander.proc.poll() is None and not cgfs.frozen(cg)




def test_kill_cgroup_removes_a_thread_group_whose_main_thread_exited(cgfs, sandbox, tmp_path):
    """cgroup.kill signals each process's leader; a leader that already exited never acts on it,
    and its threads live on. The kill must still end with populated 0."""
    if shutil.which("gcc") is None:
        print("no gcc: cannot build the leaderless thread group")
        pytest.skip("no gcc: cannot build the leaderless thread group")
    prog = leaderless_binary(str(tmp_path))
    cg = sandbox.cgroup("leaderless")
    w = sandbox.spawn([prog, "40", "60"], cg, deadline_s=60, cap=200)
    assert wait_for(lambda: cgfs.count_threads_subtree(cg) >= 40, 30)
    leader = w.proc.pid

    def leaderless() -> bool:
        st = read_stat(leader)
        return st is not None and st.state == "Z" and leader in cgfs.procs(cg)

    assert wait_for(leaderless, 30), "the main thread did not exit while its threads run"
    res = act.kill_cgroup(cgfs, cg, timeout_s=15)
    assert res.result == "removed", (res.result, res.notes, cgfs.count_threads_subtree(cg))
    assert any("main thread had exited" in n for n in res.notes), res.notes
    assert not cgfs.populated(cg)
