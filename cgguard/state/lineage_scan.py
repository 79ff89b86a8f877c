"""State: filling the record tree from /proc -- at start-up, after lost events, and when a watched
cgroup holds processes the tree does not know (moved in after their fork).

A /proc snapshot has no placeholders: lineage through processes that already exited is lost.
Records made this way stamp their cgroup (``CgStat.loaded_start``) and, after a loss, marked
incomplete until the next aging run, so that nothing decides on a family it only partly knows.
"""

from __future__ import annotations

import sys
from typing import Iterable

from cgguard.kernel import procfs
from cgguard.kernel.cgroupfs import CgroupError, CgroupFS
from cgguard.kernel.procfs import ProcStat
from cgguard.state.lineage import LineageTree
from cgguard.state.lineage_proc import from_stat
from cgguard.state.lineage_record import FREED, IDENTITY_TOLERANCE_NS
from cgguard.state.lineage_walk import within


def scan(tree: LineageTree, fs: CgroupFS, cgroups: Iterable[str]) -> tuple[dict[int, tuple[ProcStat, str]], set[str]]:
    """Live processes of the cgroups' subtrees from cgroup.procs and /proc/PID/stat."""
    found: dict[int, tuple[ProcStat, str]] = {}
    walked: set[str] = set()
    for top in cgroups:
        try:
            subtree = fs.walk(top)
        except (CgroupError, OSError):
            continue
        for cg in subtree:
            walked.add(cg)
            try:
                pids = fs.procs(cg)
            except CgroupError:
                continue
            for pid in pids:
                st = tree.proc.stat(pid)
                tree.stats.proc_reads += 1
                if st is not None:
                    found[pid] = (st, cg)
    return found, walked


def _sync(tree: LineageTree, fs: CgroupFS, tops: list[str], mark_gone: bool) -> int:
    now = tree.clock()
    found, walked = scan(tree, fs, tops)
    if mark_gone:
        for cg in walked:
            for rec in list(tree.cgstat(cg).members):
                if not rec.alive or rec.flags & FREED:
                    continue
                hit = found.get(rec.tgid)
                if hit is not None and procfs.same_process(hit[0], rec.start_ns, IDENTITY_TOLERANCE_NS):
                    if hit[1] != rec.cgroup:
                        tree.move(rec, hit[1])
                    continue
                if hit is None:
                    # Not listed here: exited, or moved elsewhere.
                    st = tree.proc.stat(rec.tgid)
                    if procfs.same_process(st, rec.start_ns, IDENTITY_TOLERANCE_NS):
                        cg2 = tree.cgroup_of(rec.tgid)
                        if cg2 is not None and tree.in_scope(cg2):
                            tree.move(rec, sys.intern(cg2))
                        else:
                            tree._detach(rec)
                        continue
                else:
                    tree.stats.pid_reuse += 1
                tree._end(rec, now)
    added = 0
    # Parents start before their children: creating in start order links every pair.
    for st, cg in sorted(found.values(), key=lambda x: x[0].start_ns):
        if st.pid in tree._live or not tree.in_scope(cg):
            continue
        tree._neg.pop(st.pid, None)
        from_stat(tree, st, cg)
        added += 1
    return added


def load(tree: LineageTree, fs: CgroupFS, cgroups: Iterable[str]) -> int:
    """Track the processes already inside ``cgroups`` (and their subtrees) at start-up, linking
    parent and child where both are known. Returns records added."""
    return _sync(tree, fs, list(cgroups), mark_gone=False)


def resync(tree: LineageTree, fs: CgroupFS, cgroups: Iterable[str] | None = None, mark_incomplete: bool = True) -> int:
    """Re-read the live set of ``cgroups`` after loss (default: every cgroup with records).

    Records whose process is gone become dead (placeholders if they have children), unknown
    live processes get records, and the cgroups are marked incomplete until the next aging run.
    Returns records added.
    """
    tops = list(cgroups) if cgroups is not None else _top_cgroups(tree)
    added = _sync(tree, fs, tops, mark_gone=True)
    if mark_incomplete:
        tree.incomplete.update(tops)
        tree.loss_pending = False
    return added


def adopt(tree: LineageTree, fs: CgroupFS, cgroup: str) -> int:
    """Records for the processes of ``cgroup`` the tree does not know: moved in after their fork
    (container runtimes, ``systemd-run --scope``, an operator's echo into cgroup.procs). A
    process whose FORK event is still queued is linked to its true parent when it arrives."""
    return _sync(tree, fs, [cgroup], mark_gone=False)


def _top_cgroups(tree: LineageTree) -> list[str]:
    tops: list[str] = []
    for cg in sorted(tree._cg):
        if not any(within(cg, t) for t in tops):
            tops.append(cg)
    return tops
