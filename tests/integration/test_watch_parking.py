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


def test_overflow_batch_rescans_once_and_reports_lost_populated_0(cgfs, sandbox):
    """A batch with a queue overflow: one rescan adds what appeared (not once more per CREATE event
    of the batch), and a cgroup that emptied meanwhile (a kill's end) is reported as an event."""
    from inotify_simple import Event, flags

    base = sandbox.cgroup("ovf")
    busy = f"{base}/busy"
    os.mkdir(cgfs.abspath(busy))
    wl = sandbox.spawn(["sleep", "30"], busy, deadline_s=40, cap=8)
    try:
        assert wait_for(lambda: cgfs.populated(busy))
        w = watcher(cgfs, [f"{base}/*"])
        w.start()
        try:
            n = w.nodes[busy]
            assert n.populated
            os.mkdir(cgfs.abspath(f"{base}/new1"))
            sandbox.kill(wl)
            assert wait_for(lambda: not cgfs.populated(busy))
            # the CREATE and the populated 0, as the kernel queues them (cgroup.events notifies
            # from a work item: a little later)
            real: list = []
            assert wait_for(lambda: real.extend(w.inotify.read(timeout=0)) or any(ev.wd == n.events_wd for ev in real))
            dir_wd = w.nodes[base].dir_wd
            # the populated 0 of busy is among the events the overflow lost
            batch = [ev for ev in real if ev.wd != n.events_wd] + [Event(wd=-1, mask=flags.Q_OVERFLOW, cookie=0, name="")]
            w.inotify.read = lambda timeout=0: batch  # type: ignore[method-assign]
            added = []
            orig_add = w._add

            def counting_add(rel, parent):
                added.append(rel)
                return orig_add(rel, parent)

            w._add = counting_add  # type: ignore[method-assign]
            out = w.handle_inotify()
            assert any(ev.wd == dir_wd for ev in real), "the CREATE event was queued"
            assert added.count(f"{base}/new1") == 1
            assert (w.nodes[f"{base}/new1"], "added") in out
            assert (n, "events") in out and not n.populated
            assert w.overflows == 1
        finally:
            w.close()
    finally:
        sandbox.kill(wl)
