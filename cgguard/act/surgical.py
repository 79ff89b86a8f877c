"""The surgical kill: remove one lineage from a cgroup it shares with innocent processes.

Freeze the cgroup (frozen tasks cannot fork), decide membership from the lineage records and
the frozen ppid links, move the members into a quarantine child (frozen too: it inherits its
parent's freeze), ``cgroup.kill`` it, wait for ``populated 0``, remove it, thaw. A child forked
during the move cannot escape: nothing forks while frozen.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable

from cgguard.act.cgroup import (
    QUARANTINE_PREFIX,
    SWEEP_AFTER_S,
    ActionResult,
    count_tasks,
    frozen1,
    kill_cgroup,
    kill_exited_leaders,
    populated0,
    wait_events,
)
from cgguard.kernel.cgroupfs import CgroupError, CgroupFS, CgroupGone
from cgguard.kernel.procfs import ProcStat, read_stat, same_process

Classify = Callable[[int, ProcStat], "bool | None"]


def bomb_members(
    procs: list[int],
    members: frozenset[tuple[int, int]],
    classify: Classify | None = None,
    origin_start_ns: int | None = None,
    stats: dict[int, ProcStat | None] | None = None,
    why: dict[str, int] | None = None,
) -> tuple[set[int], int]:
    """Which of ``procs`` (a frozen cgroup's processes) belong to the bomb; and how many of them
    were taken without a lineage record.

    ``classify(pid, stat)`` (the lineage tree, asked after the freeze) says True (descends from
    the origin), False (does not) or None (unknown). Without it, a pid is a member if it is one of
    ``members`` with the same start time -- never a bare pid: a record's pid may have been reused
    by an innocent. Unknown processes are members if their parent chain inside the cgroup reaches
    a member, or if they are orphans (parent outside the cgroup, as a bomb's are once their
    parents exit) started after the origin. ``why``, if given, counts the non-members by reason
    (for the incident: an operator sees on what ground a process was spared).
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
        elif why is not None:
            older = origin_start_ns is not None and st.start_ns < origin_start_ns
            key = "older than the origin" if older else "recorded ancestry outside the lineage"
            why[key] = why.get(key, 0) + 1
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
    for pid, st in unknown.items():
        if origin_start_ns is not None and st.ppid not in stat_of and st.start_ns >= origin_start_ns:
            out.add(pid)
            guessed += 1
        elif why is not None:
            # Ancestry unknown (no record, or one too close to the origin's start to tell).
            key = "unknown ancestry, parent not a member" if st.ppid in stat_of else "unknown ancestry, older than the origin"
            why[key] = why.get(key, 0) + 1
    return out, guessed


def _thaw(fs: CgroupFS, rel: str) -> None:
    try:
        fs.freeze(rel, False)
    except CgroupError:
        pass


def _freeze(fs: CgroupFS, rel: str, timeout_s: float) -> str | None:
    """Freeze ``rel`` and wait for ``frozen 1``: None when frozen, "gone", or why not."""
    try:
        fs.freeze(rel, True)
    except CgroupGone:
        return "gone"
    except CgroupError as e:
        return f"freeze failed: {e}"
    frozen = wait_events(fs, rel, frozen1, min(2.0, timeout_s))
    if frozen is None:
        return "gone"
    return None if frozen else "cgroup did not report frozen 1 within 2 s"


def _quarantine(fs: CgroupFS, rel: str, bomb: set[int], timeout_s: float, res: ActionResult) -> str | None:
    """Move ``bomb`` into a fresh child of the frozen ``rel``, kill it and wait for it to empty;
    thaw ``rel`` and remove the child whatever happens. None when done, or why it could not start."""
    q = f"{rel}/{QUARANTINE_PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        fs.mkdir(q)
    except CgroupError as e:
        return f"cannot create quarantine cgroup: {e}"
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
        done = wait_events(fs, q, populated0, min(SWEEP_AFTER_S, timeout_s))
        if done is False and kill_exited_leaders(fs, q):
            res.notes.append("thread groups whose main thread had exited killed by pid")
        if done is False:
            done = wait_events(fs, q, populated0, timeout_s)
        if done is False:
            res.notes.append("quarantine still populated, killing again")
            try:
                fs.kill(q)
            except CgroupError:
                pass
            done = wait_events(fs, q, populated0, timeout_s)
        res.survivors = 0 if done is not False else count_tasks(fs, q)
        res.result = "removed" if done is not False else "timeout"
    finally:
        # Thaw first: rmdir of the quarantine needs it empty, and innocents must run again even
        # if something above failed.
        _thaw(fs, rel)
        for _ in range(20):
            if fs.rmdir(q):
                break
            time.sleep(0.01)
        else:
            res.notes.append(f"quarantine {q} could not be removed")
    return None


def _whole(fs: CgroupFS, rel: str, timeout_s: float, res: ActionResult, t0: float) -> ActionResult:
    """The lineage is the whole cgroup after all: the atomic kill is simpler and complete."""
    kc = kill_cgroup(fs, rel, timeout_s)
    _thaw(fs, rel)
    kc.notes = res.notes + ["the lineage is the whole cgroup: killed the cgroup"] + kc.notes
    kc.innocents = 0
    kc.tasks_before = res.tasks_before
    kc.remove_ms = (time.monotonic() - t0) * 1000
    return kc


def _sort(
    procs: list[int], members: frozenset[tuple[int, int]], classify: Classify | None, origin_start_ns: int | None,
    res: ActionResult,
) -> set[int]:
    """The bomb's processes among the frozen cgroup's; the incident says how the rest were spared."""
    spared: dict[str, int] = {}
    bomb, guessed = bomb_members(procs, members, classify, origin_start_ns, why=spared)
    if guessed:
        res.notes.append(f"{guessed} processes without a lineage record taken as members (orphans or children of members)")
    res.innocents = len(procs) - len(bomb)
    if spared:
        res.notes.append("spared: " + ", ".join(f"{n} {k}" for k, n in sorted(spared.items())))
    return bomb


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
    """Surgical removal of one lineage from a cgroup it shares with innocent processes.

    ``fallback`` (usually the whole-cgroup kill) is used when the surgery cannot be done; with
    ``unmatched_fallback`` false, a lineage not found in the cgroup kills nothing instead.
    """
    t0 = time.monotonic()
    res = ActionResult("kill-lineage", "failed", tasks_before=count_tasks(fs, rel))

    def fall_back(why: str) -> ActionResult:
        res.notes.append(why)
        _thaw(fs, rel)
        if fallback is None:
            res.result = "failed"
            return res
        fb = fallback(rel)
        fb.notes = res.notes + [f"fell back to {fb.action}"] + fb.notes
        return fb

    why = _freeze(fs, rel, timeout_s)
    if why is None and settle is not None:
        settle()  # let the lineage tree catch up with the forks that happened before the freeze
    try:
        procs = fs.procs(rel) if why is None else []
    except CgroupGone:
        why = "gone"
    if why == "gone":
        res.result, res.survivors = "gone", 0
        return res
    if why is not None:
        return fall_back(why)
    bomb = _sort(procs, members, classify, origin_start_ns, res)
    if not bomb:
        if unmatched_fallback:
            return fall_back("no live member of the lineage found in the frozen cgroup")
        # The lineage is not (or no longer) in this cgroup: killing the cgroup instead would
        # kill only processes nobody has shown to be the bomb.
        res.notes.append("no live member of the lineage found in the frozen cgroup: nothing killed")
        _thaw(fs, rel)
        res.result, res.survivors = "not-found", 0
        return res
    if res.innocents == 0:
        return _whole(fs, rel, timeout_s, res, t0)
    why = _quarantine(fs, rel, bomb, timeout_s, res)
    if why is not None:
        return fall_back(why)
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
