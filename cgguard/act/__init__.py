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

from cgguard.kernel.cgroupfs import CgroupError, CgroupFS, CgroupGone, parse_flat_keyed
from cgguard.kernel.procfs import ProcStat, read_stat, same_process

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


Classify = Callable[[int, ProcStat], "bool | None"]


def bomb_members(
    procs: list[int],
    members: frozenset[tuple[int, int]],
    classify: Classify | None = None,
    origin_start_ns: int | None = None,
    stats: dict[int, ProcStat | None] | None = None,
) -> tuple[set[int], int]:
    """Which of ``procs`` (a frozen cgroup's processes) belong to the bomb; and how many of them
    were taken without a lineage record.

    ``classify(pid, stat)`` (the lineage tree, asked after the freeze) says True (descends from
    the origin), False (does not) or None (unknown). Without it, a pid is a member if it is one of
    ``members`` with the same start time -- never a bare pid: a record's pid may have been reused
    by an innocent. Unknown processes are members if their parent chain inside the cgroup reaches
    a member, or if they are orphans (parent outside the cgroup, as a bomb's are once their
    parents exit) started after the origin.
    """
    starts: dict[int, list[int]] = {}
    for tgid, start in members:
        starts.setdefault(tgid, []).append(start)
    stat_of = stats if stats is not None else {pid: read_stat(pid) for pid in procs}
    out: set[int] = set()
    unknown: dict[int, ProcStat] = {}
    for pid in procs:
        st = stat_of.get(pid)
        if st is None:
            continue  # exited meanwhile
        verdict = classify(pid, st) if classify is not None else None
        if verdict is None and pid in starts and any(same_process(st, s) for s in starts[pid]):
            verdict = True
        if verdict is True:
            out.add(pid)
        elif verdict is None:
            unknown[pid] = st
    guessed = 0
    changed = True
    while changed:
        changed = False
        for pid, st in list(unknown.items()):
            if st.ppid in out:
                out.add(pid)
                del unknown[pid]
                changed = True
                guessed += 1
    if origin_start_ns is not None:
        for pid, st in unknown.items():
            if st.ppid not in stat_of and st.start_ns >= origin_start_ns:
                out.add(pid)
                guessed += 1
    return out, guessed


def kill_lineage(
    fs: CgroupFS,
    rel: str,
    members: frozenset[tuple[int, int]],
    timeout_s: float = 5.0,
    fallback: Callable[[str], ActionResult] | None = None,
    classify: Classify | None = None,
    origin_start_ns: int | None = None,
    settle: Callable[[], None] | None = None,
    unmatched_fallback: bool = True,
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
    if settle is not None:
        # Let the lineage tree catch up with the forks that happened before the freeze.
        settle()
    try:
        procs = fs.procs(rel)
    except CgroupGone:
        res.result, res.survivors = "gone", 0
        return res
    bomb, guessed = bomb_members(procs, members, classify, origin_start_ns)
    if guessed:
        res.notes.append(f"{guessed} processes without a lineage record taken as members (orphans or children of members)")
    res.innocents = len(procs) - len(bomb)
    if not bomb:
        if not unmatched_fallback:
            # The lineage is not (or no longer) in this cgroup: killing the cgroup instead would
            # kill only processes nobody has shown to be the bomb.
            res.notes.append("no live member of the lineage found in the frozen cgroup: nothing killed")
            try:
                fs.freeze(rel, False)
            except CgroupError:
                pass
            res.result = "not-found"
            res.survivors = 0
            return res
        return fall_back("no live member of the lineage found in the frozen cgroup")
    if res.innocents == 0:
        # The lineage is the whole cgroup after all: the atomic kill is simpler and complete.
        kc = kill_cgroup(fs, rel, timeout_s)
        try:
            fs.freeze(rel, False)
        except CgroupError:
            pass
        kc.notes = res.notes + ["the lineage is the whole cgroup: killed the cgroup"] + kc.notes
        kc.innocents = 0
        kc.tasks_before = res.tasks_before
        kc.remove_ms = (time.monotonic() - t0) * 1000
        return kc
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
        left = bomb_members(fs.procs(rel), members, classify)[0] if res.result == "removed" else set()
    except CgroupGone:
        left = set()
    if left:
        res.survivors = (res.survivors or 0) + len(left)
        res.notes.append(f"{len(left)} lineage members still in {rel}")
    res.remove_ms = (time.monotonic() - t0) * 1000
    return res
