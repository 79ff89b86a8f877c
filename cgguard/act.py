"""Actions: remove a bomb. Shared kill mechanics for every detector (as oomd's plugins share theirs).

* ``kill_cgroup``: ``cgroup.kill`` -- the kernel SIGKILLs the whole subtree and also catches
  children forked while it runs, so it is atomic against a fork bomb. Completion is
  ``populated 0`` in ``cgroup.events`` (watched through inotify), retried on timeout.
* ``kill_lineage``: the bomb shares its cgroup with innocent processes. Freeze the cgroup (frozen
  tasks cannot fork), move the bomb's processes into a quarantine child cgroup (which is frozen
  too: it inherits its parent's freeze), ``cgroup.kill`` the quarantine, wait for
  ``populated 0``, remove it, thaw. Membership is decided while frozen, from the lineage records
  and the frozen ppid links, so a child forked during the move cannot escape.
* ``freeze``: freeze and leave it frozen for forensics.

Everything here tolerates the cgroup vanishing underneath: that is success, not an error.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from inotify_simple import INotify, flags

from cgguard.cgroupfs import CgroupError, CgroupFS, CgroupGone, parse_flat_keyed
from cgguard.procfs import read_stat, same_process

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


def _populated0(ev: dict[str, int]) -> bool:
    return ev.get("populated", 0) == 0


def _frozen1(ev: dict[str, int]) -> bool:
    return ev.get("frozen", 0) == 1


def count_tasks(fs: CgroupFS, rel: str) -> int:
    try:
        return fs.task_count(rel).tasks
    except CgroupError:
        return 0


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
        done = wait_events(fs, rel, _populated0, timeout_s / retries)
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
    ok = wait_events(fs, rel, _frozen1, timeout_s)
    res.remove_ms = (time.monotonic() - t0) * 1000
    res.result = {True: "frozen", False: "timeout", None: "gone"}[ok]
    res.survivors = res.tasks_before if ok else None
    return res


def bomb_members(
    procs: list[int], members: frozenset[tuple[int, int]], stats: dict[int, object] | None = None
) -> set[int]:
    """Which of ``procs`` (a frozen cgroup's processes) belong to the bomb.

    A pid is a member if it is a lineage record still alive with the same start time (never a bare
    pid: the record's pid may have been reused by an innocent), or if its parent chain inside the
    cgroup reaches a member (children forked after the records were last updated).
    """
    starts = {}
    for tgid, start in members:
        starts.setdefault(tgid, []).append(start)
    ppid: dict[int, int] = {}
    out: set[int] = set()
    for pid in procs:
        st = read_stat(pid) if stats is None else stats.get(pid)
        if st is None:
            continue
        ppid[pid] = st.ppid  # type: ignore[attr-defined]
        if pid in starts and any(same_process(st, s) for s in starts[pid]):  # type: ignore[arg-type]
            out.add(pid)
    changed = True
    while changed:
        changed = False
        for pid, pp in ppid.items():
            if pid not in out and pp in out:
                out.add(pid)
                changed = True
    return out


def kill_lineage(
    fs: CgroupFS,
    rel: str,
    members: frozenset[tuple[int, int]],
    timeout_s: float = 5.0,
    fallback: Callable[[str], ActionResult] | None = None,
) -> ActionResult:
    """Surgical removal of one lineage from a cgroup it shares with innocent processes."""
    t0 = time.monotonic()
    res = ActionResult("kill-lineage", "failed", tasks_before=count_tasks(fs, rel))

    def fall_back(why: str) -> ActionResult:
        res.notes.append(why)
        try:
            fs.freeze(rel, False)
        except CgroupError:
            pass
        if fallback is None:
            res.result = "failed"
            return res
        fb = fallback(rel)
        fb.notes = res.notes + [f"fell back to {fb.action}"] + fb.notes
        return fb

    try:
        fs.freeze(rel, True)
    except CgroupGone:
        res.result, res.survivors = "gone", 0
        return res
    except CgroupError as e:
        return fall_back(f"freeze failed: {e}")
    frozen = wait_events(fs, rel, _frozen1, min(2.0, timeout_s))
    if frozen is None:
        res.result, res.survivors = "gone", 0
        return res
    if not frozen:
        return fall_back("cgroup did not report frozen 1 within 2 s")
    try:
        procs = fs.procs(rel)
    except CgroupGone:
        res.result, res.survivors = "gone", 0
        return res
    bomb = bomb_members(procs, members)
    res.innocents = len(procs) - len(bomb)
    if not bomb:
        return fall_back("no live member of the lineage found in the frozen cgroup")
    q = f"{rel}/{QUARANTINE_PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        fs.mkdir(q)
    except CgroupError as e:
        return fall_back(f"cannot create quarantine cgroup: {e}")
    moved = 0
    try:
        for pid in bomb:
            try:
                if fs.move_process(q, pid):
                    moved += 1
            except CgroupGone:
                break
            except CgroupError as e:
                res.notes.append(f"moving {pid}: {e}")
        res.moved = moved
        try:
            fs.kill(q)
        except CgroupError as e:
            res.notes.append(f"quarantine kill: {e}")
        done = wait_events(fs, q, _populated0, timeout_s)
        if done is False:
            res.notes.append("quarantine still populated, killing again")
            try:
                fs.kill(q)
            except CgroupError:
                pass
            done = wait_events(fs, q, _populated0, timeout_s)
        res.survivors = 0 if done is not False else count_tasks(fs, q)
        res.result = "removed" if done is not False else "timeout"
    finally:
        # Thaw first: rmdir of the quarantine needs it empty, and innocents must run again even
        # if something above failed.
        try:
            fs.freeze(rel, False)
        except CgroupError:
            pass
        for _ in range(20):
            if fs.rmdir(q):
                break
            time.sleep(0.01)
        else:
            res.notes.append(f"quarantine {q} could not be removed")
    # Anything of the bomb left in the parent (it escaped the move) counts as a survivor.
    try:
        left = bomb_members(fs.procs(rel), members) if res.result == "removed" else set()
    except CgroupGone:
        left = set()
    if left:
        res.survivors = (res.survivors or 0) + len(left)
        res.notes.append(f"{len(left)} lineage members still in {rel}")
    res.remove_ms = (time.monotonic() - t0) * 1000
    return res
