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


def rescan(w) -> list:
    """A whole rescan, as the agent's loop carries it out slice by slice: what it reports."""
    w.start_rescan()
    out = []
    while w.rescanning:
        out += w.rescan_step()
    return out


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
        assert (n, "added") in rescan(w)
        assert n.populated
        # nothing changed since: a second rescan returns nothing
        assert rescan(w) == []
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


def test_rescan_after_an_overflow_runs_in_slices_and_new_cgroups_do_not_wait_for_it(cgfs, sandbox):
    """Thousands of cgroups made to overflow the queue take seconds to walk: the rescan is carried
    out a step at a time between the loop's other work, and a cgroup made meanwhile is watched
    from its own CREATE event, not when the walk gets there."""
    from inotify_simple import Event, flags

    base = sandbox.cgroup("sliced")
    burst = f"{base}/burst"
    os.mkdir(cgfs.abspath(burst))
    w = watcher(cgfs, [f"{base}/**"])
    w.start()
    try:
        gone = f"{base}/gone"
        os.mkdir(cgfs.abspath(gone))
        w.handle_inotify()
        assert gone in w.nodes
        names = [f"{burst}/b{i:03d}" for i in range(40)]
        for rel in names:
            os.mkdir(cgfs.abspath(rel))
        os.rmdir(cgfs.abspath(gone))
        # Their events are lost with an overflow (the kernel drops what does not fit).
        real_read = w.inotify.read
        w.inotify.read = lambda timeout=0: [Event(wd=-1, mask=flags.Q_OVERFLOW, cookie=0, name="")]  # type: ignore[method-assign]
        w.rescan_slice_ns = 0  # one step per slice
        out = w.handle_inotify()
        w.inotify.read = real_read  # type: ignore[method-assign]
        real_read(timeout=0)  # the events that stood for the lost ones
        assert w.overflows == 1 and w.rescanning
        assert len(out) <= 1, "a slice is one step"
        # A cgroup made while the walk is under way: watched from its own event.
        late = f"{base}/late"
        os.mkdir(cgfs.abspath(late))
        assert wait_for(lambda: bool(w.handle_inotify()) or late in w.nodes)
        assert late in w.nodes and w.nodes[late].watched and w.rescanning
        added = [n.rel for n, kind in out if kind == "added"]
        steps = 1
        while w.rescanning:
            added += [n.rel for n, kind in w.rescan_step() if kind == "added"]
            steps += 1
        assert sorted(names) == sorted(r for r in added if r.startswith(burst + "/"))
        assert all(w.nodes[r].watched and w.nodes[r].events_wd is not None for r in names)
        assert gone not in w.nodes, "the walk drops what vanished"
        assert steps > len(names), steps
        # A full rescan afterwards finds nothing new.
        assert rescan(w) == []
    finally:
        w.close()


def test_without_an_inotify_watch_new_cgroups_are_found_by_periodic_rescans(cgfs, sandbox):
    """max_user_watches reached: the kernel refuses a directory watch (ENOSPC). The tree degrades
    to rescans every DEGRADED_RESCAN_NS rather than miss the cgroups made below it."""
    import errno

    from cgguard.state import watch_tree

    base = sandbox.cgroup("degraded")
    w = watcher(cgfs, [f"{base}/**"])
    real_add = w.inotify.add_watch

    def refuse_base(path, mask):
        if path == cgfs.abspath(base):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(path, mask)

    w.inotify.add_watch = refuse_base  # type: ignore[method-assign]
    w.start()
    try:
        assert w.missing_watches == 1 and w.nodes[base].dir_wd is None
        new = f"{base}/new"
        os.mkdir(cgfs.abspath(new))
        w.handle_inotify()
        assert new not in w.nodes, "no watch on its parent: no event"
        now = w.clock()
        w.maybe_rescan_degraded(now)
        assert w.rescanning
        found = []
        while w.rescanning:
            found += w.rescan_step()
        assert (w.nodes[new], "added") in found
        # Not again before the interval is out.
        w.maybe_rescan_degraded(now + 1)
        assert not w.rescanning
        w.maybe_rescan_degraded(now + watch_tree.DEGRADED_RESCAN_NS)
        assert w.rescanning
    finally:
        w.close()
