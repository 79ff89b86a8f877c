"""Whole-cgroup actions and the waits they share with the surgical kill."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from inotify_simple import INotify, flags

from cgguard.kernel.cgroupfs import CgroupError, CgroupFS, CgroupGone, parse_flat_keyed
from cgguard.kernel.procfs import read_stat, same_process

log = logging.getLogger("cgguard.act")

QUARANTINE_PREFIX = "cgguard-quarantine-"


@dataclass
class ActionResult:
    action: str  # kill-cgroup | kill-lineage | freeze | report
    result: str  # removed | frozen | reported | gone | timeout | failed | dry-run | refused
    remove_ms: float | None = None
    survivors: int | None = None
    tasks_before: int | None = None
    moved: int | None = None
    innocents: int | None = None
    notes: list[str] = field(default_factory=list)


def wait_events(fs: CgroupFS, rel: str, pred: Callable[[dict[str, int]], bool], timeout_s: float) -> bool | None:
    """Wait until ``pred(cgroup.events)`` holds. True: it did; False: timed out; None: cgroup gone.

    Uses inotify on cgroup.events (the kernel raises a modify event on every populated/frozen
    change), re-checking after arming the watch so a change between read and arm is not lost.
    """
    path = os.path.join(fs.abspath(rel), "cgroup.events")
    deadline = time.monotonic() + timeout_s
    with INotify() as ino:
        try:
            ino.add_watch(path, flags.MODIFY)
        except OSError:
            return None
        while True:
            try:
                if pred(parse_flat_keyed(fs.read(rel, "cgroup.events"))):
                    return True
            except CgroupGone:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # Short cap on each wait: a missed notification then costs 50 ms, not the timeout.
            ino.read(timeout=int(min(left, 0.05) * 1000))


def populated0(ev: dict[str, int]) -> bool:
    return ev.get("populated", 0) == 0


def frozen1(ev: dict[str, int]) -> bool:
    return ev.get("frozen", 0) == 1


def count_tasks(fs: CgroupFS, rel: str) -> int:
    try:
        return fs.task_count(rel).tasks
    except CgroupError:
        return 0


# How long after cgroup.kill a cgroup may stay populated before its exited leaders are killed by
# pid. A kill's populated 0 normally comes within milliseconds; thousands of exiting tasks on a
# loaded node take longer, and the sweep is harmless then.
SWEEP_AFTER_S = 0.1


def kill_exited_leaders(fs: CgroupFS, rel: str, limit: int = 65536) -> int:
    """SIGKILL, through a pidfd, every thread group of ``rel``'s subtree whose main thread has
    exited while its other threads run. Returns how many were signalled.

    ``cgroup.kill`` sends SIGKILL to each listed process's leader; a leader that already exited
    (``pthread_exit()`` in ``main``) is a zombie that never acts on it, so a thread bomb built that
    way survives the cgroup's kill (seen on 6.1 and 6.18). ``kill(2)`` on the thread group does
    reach its live threads. Identity is (pid, start time): the pid is only signalled through a
    pidfd opened after a matching start time was read, so a reused pid is never hit.
    """
    sent = 0
    try:
        cgroups = fs.walk(rel)
    except CgroupError:
        return 0
    for cg in cgroups:
        try:
            procs = fs.procs(cg)
        except CgroupError:
            continue
        for pid in procs[:limit]:
            st = read_stat(pid)
            if st is None or st.state != "Z":
                continue  # a live leader took the cgroup's kill itself
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if not same_process(read_stat(pid), st.start_ns):
                    continue  # the pid was reused in between
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                sent += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return sent


def kill_cgroup(fs: CgroupFS, rel: str, timeout_s: float = 5.0, retries: int = 3) -> ActionResult:
    t0 = time.monotonic()
    res = ActionResult("kill-cgroup", "failed", tasks_before=count_tasks(fs, rel))
    for attempt in range(retries):
        try:
            fs.kill(rel)
        except CgroupGone:
            res.result = "gone"
            res.remove_ms = (time.monotonic() - t0) * 1000
            res.survivors = 0
            return res
        except CgroupError as e:
            res.notes.append(str(e))
            res.result = "failed"
            return res
        done = wait_events(fs, rel, populated0, min(SWEEP_AFTER_S, timeout_s / retries))
        if done is False:
            swept = kill_exited_leaders(fs, rel)
            if swept:
                res.notes.append(f"{swept} thread groups whose main thread had exited killed by pid")
            done = wait_events(fs, rel, populated0, max(0.0, timeout_s / retries - SWEEP_AFTER_S))
        if done is None or done:
            res.result = "removed" if done else "gone"
            res.remove_ms = (time.monotonic() - t0) * 1000
            res.survivors = 0
            return res
        res.notes.append(f"populated still 1 after {timeout_s / retries:.1f}s (attempt {attempt + 1}), killing again")
    res.result = "timeout"
    res.survivors = count_tasks(fs, rel)
    res.remove_ms = (time.monotonic() - t0) * 1000
    return res


def freeze(fs: CgroupFS, rel: str, timeout_s: float = 2.0) -> ActionResult:
    t0 = time.monotonic()
    res = ActionResult("freeze", "failed", tasks_before=count_tasks(fs, rel))
    try:
        fs.freeze(rel, True)
    except CgroupGone:
        res.result = "gone"
        return res
    except CgroupError as e:
        res.notes.append(str(e))
        return res
    ok = wait_events(fs, rel, frozen1, timeout_s)
    res.remove_ms = (time.monotonic() - t0) * 1000
    res.result = {True: "frozen", False: "timeout", None: "gone"}[ok]
    res.survivors = res.tasks_before if ok else None
    return res
