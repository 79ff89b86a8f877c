"""State: what the lineage tree reads from /proc -- where a process first met belongs, and what
a process runs.

The event handlers read /proc only once for a parent never seen before (:func:`sight_parent`).
Events of processes outside the watched cgroups then cost two dictionary operations: they share a
*negative family* (:class:`Family`), which is re-checked every ``RESIGHT_EVERY`` forks
(:func:`resight`) so that a process moved into a watched cgroup after its fork is found.

What a process runs (comm, command line) is read only for records that fork after an exec, in a
batch after each burst of events (:func:`flush_images`), under a rate budget; or when a detector
asks (:func:`describe`).

These functions are the tree's own (they change its maps): the handlers in
:mod:`cgguard.state.lineage` and the scans in :mod:`cgguard.state.lineage_scan` call them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from cgguard.kernel import procfs
from cgguard.kernel.cmdline_reader import CmdlineReader
from cgguard.kernel.procfs import ProcStat
from cgguard.state.lineage_record import FREED, FROM_PROC, IDENTITY_TOLERANCE_NS, IMAGE_QUEUED, STALE, Record
from cgguard.state.lineage_walk import walk

if TYPE_CHECKING:
    from cgguard.state.lineage import LineageTree

CMDLINE_MAX = 1024
RESIGHT_EVERY = 256  # forks of an untracked family between two checks of where it is now


class ProcFS:
    """The /proc reads the tree needs (cgguard.kernel.procfs). Injectable for tests."""

    def stat(self, pid: int) -> ProcStat | None:
        return procfs.read_stat(pid)

    def __init__(self) -> None:
        self._cmdlines: CmdlineReader | None = None

    def cmdline(self, pid: int) -> str | None:
        # Off the loop thread with a bounded wait: a forking process's mmap_lock can stall it.
        if self._cmdlines is None:
            self._cmdlines = CmdlineReader(lambda pid: procfs.read_cmdline(pid, CMDLINE_MAX))
        return self._cmdlines.read(pid)


class Family:
    """Processes known to be outside the watched cgroups share one of these: counting their forks
    and a validity flag costs no per-process state beyond a dict entry."""

    __slots__ = ("forks", "valid", "first")

    def __init__(self, first: bool = False) -> None:
        # first: made at an exec, so its first fork is checked and nothing was missed before it
        self.forks = RESIGHT_EVERY - 1 if first else 0
        self.valid = True
        self.first = first


def neg_add(tree: LineageTree, tgid: int, fam: Family) -> None:
    neg = tree._neg
    if len(neg) >= tree.negative_cache_size:
        del neg[next(iter(neg))]
    neg[tgid] = fam


def resight(tree: LineageTree, tgid: int, fam: Family) -> bool:
    """Every RESIGHT_EVERY forks of an untracked family, check where its forking member is:
    a container runtime moves processes into their cgroup after forking them. True if it
    is in scope now (the whole family is then looked at again, member by member)."""
    fam.forks = 0
    first, fam.first = fam.first, False
    tree._stats.resights += 1
    tree._stats.proc_reads += 1
    cg = tree.cgroup_of(tgid)
    if cg is None or not tree.in_scope(cg):
        return False
    fam.valid = False
    tree._neg.pop(tgid, None)
    st = tree.proc.stat(tgid)
    if st is not None:
        # From here on its events count its threads: /proc would count the ones whose
        # creation events are still queued a second time.
        from_stat(tree, st, cg, threads=1)
        if not first:  # forks of the family before this check went unseen
            tree.incomplete.add(cg)
    return True


def sight_parent(tree: LineageTree, ptgid: int, ctgid: int, ts_ns: int) -> Record | None:
    """A fork by a parent never seen: place it once via /proc. Returns its new record, a root
    record for the child if the parent is gone but the child is watched, or None (outside)."""
    tree._stats.proc_reads += 1
    cg = tree.cgroup_of(ptgid)
    if cg is not None and not tree.in_scope(cg):
        # Children start in their parent's cgroup: both are outside until one is moved.
        fam = Family()
        neg_add(tree, ptgid, fam)
        neg_add(tree, ctgid, fam)
        return None
    st = tree.proc.stat(ptgid) if cg is not None else None
    if st is None or cg is None:
        cg = tree.cgroup_of(ctgid)
        if cg is None or not tree.in_scope(cg):
            neg_add(tree, ctgid, Family())
            return None
        # The parent is gone but the child is watched: the child becomes a root.
        rec = Record(ctgid, ts_ns, None, tree.cgstat(cg))
        rec.flags = STALE | IMAGE_QUEUED
        tree._images.append(rec)
        tree._add(rec)
        return None
    return from_stat(tree, st, cg, threads=1)


def from_stat(tree: LineageTree, st: ProcStat, cgroup: str, threads: int | None = None) -> Record:
    """A live record for a process first seen in /proc, linked to its parent if tracked.

    Its image is read at once: sightings are rare (start-up, adoption, an unknown parent's
    first fork), and such a process may be a family's origin that exits any moment.
    """
    parent = tree._live.get(st.ppid)
    if parent is not None and parent.start_ns > st.start_ns + IDENTITY_TOLERANCE_NS:
        parent = None  # started after it: a process that reused the parent's pid
    rec = Record(st.pid, st.start_ns, parent, tree.cgstat(cgroup))
    rec.cg.loaded_start = max(rec.cg.loaded_start, st.start_ns)
    rec.flags = FROM_PROC
    cmd = tree.proc.cmdline(st.pid)
    rec.image = _image(st.comm, cmd)
    rec.threads = st.num_threads if threads is None else threads
    rec.exec_ns = -1  # unknown: it may run its parent's image or another
    tree._add(rec)
    return rec


def _image(comm: str, cmd: str | None) -> tuple[str, str | None]:
    # Short command lines are interned: a bomb's thousand copies share one string.
    return (comm, sys.intern(cmd) if cmd is not None and len(cmd) <= 256 else cmd)


def flush_images(tree: LineageTree) -> None:
    """Read the images queued by the last burst, as far as the rate budget allows (an exec
    storm degrades to unnamed records, never to a /proc read per event)."""
    if not tree._images:
        return
    todo, tree._images = tree._images, []
    now = tree.clock()
    rate = tree.image_reads_per_s
    if now > tree._tokens_ts:
        tree._tokens = min(float(rate), tree._tokens + (now - tree._tokens_ts) * rate / 1e9)
        tree._tokens_ts = now
    for rec in todo:
        rec.flags &= ~IMAGE_QUEUED
        if not rec.alive or rec.flags & FREED or not rec.flags & STALE:
            continue
        if tree._tokens < 1.0:
            tree._stats.image_reads_skipped += 1
            continue
        tree._tokens -= 1.0
        read_image(tree, rec)


def read_image(tree: LineageTree, rec: Record) -> bool:
    """Read comm and cmdline of a live record's process, if it is still the same process."""
    st = tree.proc.stat(rec.tgid)
    tree._stats.proc_reads += 1
    if not procfs.same_process(st, rec.start_ns, IDENTITY_TOLERANCE_NS):
        return False
    cmd = tree.proc.cmdline(rec.tgid)
    assert st is not None
    rec.image = _image(st.comm, cmd)
    rec.flags &= ~STALE
    return True


def describe(tree: LineageTree, rec: Record) -> tuple[str | None, str | None]:
    """(comm, cmdline) of what ``rec`` runs, read from /proc if it was not yet.

    A record that never exec'd since its fork runs its parent's image, so it takes its
    parent's answer; a dead record whose image was never read takes a live clone's (a
    bomb's members are copies of its origin, and one of them is alive).
    """
    r = rec
    while r.image is None and r.exec_ns is None and r.parent is not None:
        r = r.parent
    if r.image is None and r.alive and r.flags & STALE:
        read_image(tree, r)
    # A zombie's /proc has its comm but no command line: ask a live clone (a bomb's members
    # are copies of its origin, and one of them is alive).
    if (r.image is None or r.image[1] is None) and not (r.alive and r.image):
        named = r.image
        for c in walk(r, lambda c: c.exec_ns is None):
            if c is not r and c.alive and read_image(tree, c) and c.image:
                if c.image[1]:
                    return c.image
                # A clone that is forking holds its mmap_lock: its command line may not come
                # within the reader's wait, its comm (from stat) does.
                named = named or c.image
        return named or (None, None)
    return r.image or (None, None)
