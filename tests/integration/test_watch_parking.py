"""Empty cgroups are parked (not sampled) and woken by the kernel's "populated 1", also when that
event was lost with an inotify overflow."""

from __future__ import annotations

import os
import time

from cgguard.config import Sampling
from cgguard.kernel.files import FileCache
from cgguard.state.budget import Budgets
from cgguard.state.watch import PARKED, Watcher


def watcher(cgfs, globs) -> Watcher:
    files = FileCache(256)
    return Watcher(cgfs, list(globs), [], Sampling(), Budgets(cgfs, files, 4096), files)


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.005)
    return None


def test_empty_cgroup_is_parked_until_populated(cgfs, sandbox):
    base = sandbox.cgroup("park")
    cg = f"{base}/c"
    os.mkdir(cgfs.abspath(cg))
    w = watcher(cgfs, [f"{base}/*"])
    w.start()
    wl = None
    try:
        n = w.nodes[cg]
        assert n.events_wd is not None and not n.populated
        s = w.sample(n, w.clock())
        assert s.tasks == 0
        assert n.due_ns == PARKED and w.next_due_ns() is None and w.due(w.clock() + 3600 * 10**9) == []
        wl = sandbox.spawn(["sleep", "30"], cg, deadline_s=40, cap=8)
        # the kernel's populated 1 arrives through inotify; the agent then calls hint_active
        got = wait_for(lambda: [x for x, kind in w.handle_inotify() if x is n and kind == "events" and x.populated])
        assert got, "no populated 1 from inotify"
        now = w.clock()
        w.hint_active(n, now)
        # sampled at once (or one fast interval after the last sample, if that was very recent)
        fast = Sampling().fast_interval_ms * 10**6
        due = w.next_due_ns()
        assert due is not None and due <= now + fast
        assert n in w.due(due)
        s = w.sample(n, due)
        assert s.tasks >= 1 and n.due_ns != PARKED
    finally:
        if wl is not None:
            sandbox.kill(wl)
        w.close()


def test_rescan_wakes_a_parked_cgroup_whose_populated_event_was_lost(cgfs, sandbox):
    base = sandbox.cgroup("lost")
    cg = f"{base}/c"
    os.mkdir(cgfs.abspath(cg))
    w = watcher(cgfs, [f"{base}/*"])
    w.start()
    wl = None
    try:
        n = w.nodes[cg]
        w.sample(n, w.clock())
        assert n.due_ns == PARKED
        wl = sandbox.spawn(["sleep", "30"], cg, deadline_s=40, cap=8)
        assert wait_for(lambda: cgfs.populated(cg))
        # the inotify event is never read (as if lost with a queue overflow): the rescan that
        # follows an overflow finds the cgroup populated and hands it back to be sampled
        assert n in w.rescan()
        assert n.populated
        # nothing changed since: a second rescan returns nothing
        assert w.rescan() == []
    finally:
        if wl is not None:
            sandbox.kill(wl)
        w.close()
