"""The record tree: one record per process in the watched cgroups, fed by proc-connector events.

This is the 2011 mm_record tracker (see ../shared/seed) rebuilt in userspace:

* A record per thread group, identified by ``(tgid, start_ns)`` -- never by a bare pid, which the
  kernel recycles within seconds under a bomb.
* A record stays as a *placeholder* after its process exited while it still has children, so the
  tree of a bomb whose parents exit at once can be walked from its origin. A childless dead record
  is freed at once, and so are its ancestors that thereby become childless placeholders.
* Aging (:meth:`LineageTree.age`) is the seed's ``reset_mm_tracking``: every ``reset_interval`` it
  forgets records older than the interval, only if the system looked calm since the last run (no
  more processes, no kswapd run, no allocation stall).

The agent hears every fork, exec and exit on the host, so the cost per event is the agent's cost
on a busy node. The event handlers therefore read nothing from /proc except once for a parent
never seen before; a child inherits its parent's cgroup; what a process runs (comm, command line)
is read only for records that fork after an exec -- the ones that can be the origin of a family
-- in a batch after each burst of events (:meth:`LineageTree.flush`), under a rate budget. Events
of processes outside the watched cgroups cost two dictionary operations (the *negative
families*), and are re-checked every ``RESIGHT_EVERY`` forks so that a process moved into a
watched cgroup after its fork is found.

Per cgroup, :class:`CgStat` keeps what the detectors read without walking records: tracked tasks
(threads included), task births, and recent *abandonments* -- a process exiting while its
children live, the mark of ``:(){ :|:& };:`` -- with how many abandoning generations led to it.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

from cgguard.kernel import procfs
from cgguard.kernel.cgroupns import own_cgroup
from cgguard.kernel.clock import S
from cgguard.kernel.procfs import ProcStat

# Record.flags
STALE = 1  # exec'd since its image was last read: comm/cmdline unknown until read
FROM_PROC = 2  # made from /proc (start-up, rescan, first sight), not from a FORK event
FORGOTTEN = 4  # detached by aging (or moved out of scope) while the process may still run
FREED = 8  # removed from the tree; a stale reference to it must be ignored
IMAGE_QUEUED = 16  # its image read is queued for flush()

# Two sightings of one process from different sources (a FORK event's timestamp and /proc's
# start time in clock ticks) differ by up to one tick plus scheduling noise.
IDENTITY_TOLERANCE_NS = 3 * procfs.TICK_NS
CMDLINE_MAX = 1024
RESIGHT_EVERY = 256  # forks of an untracked family between two checks of where it is now
ABANDON_WALK = 16  # ancestors looked at to find how many abandoning generations led here


class Record:
    """One thread group. ``alive`` means tracked and not seen exiting; a record that is not
    alive but still has children is a placeholder (the seed's ``mm == NULL``).

    Children form an intrusive doubly linked list (first_child / next_sib / prev_sib) so that
    unlinking is O(1) and a record needs no container of its own.
    """

    __slots__ = (
        "tgid",
        "start_ns",
        "parent",
        "first_child",
        "next_sib",
        "prev_sib",
        "alive",
        "exit_ns",
        "cg",  # CgStat of its cgroup
        "image",  # (comm, cmdline) if read for this very image; None: unknown or inherited
        "threads",
        "depth",
        "nforks",  # process children forked (threads not counted)
        "nlive",  # children alive now
        "last_fork_ns",
        "exec_ns",  # last exec; None while it still runs its parent's image (a clone)
        "abd",  # abandoning generations up to and including it (0: did not abandon)
        "flags",
    )

    def __init__(self, tgid: int, start_ns: int, parent: "Record | None", cg: "CgStat"):
        self.tgid = tgid
        self.start_ns = start_ns
        self.parent = parent
        self.first_child = self.next_sib = self.prev_sib = None
        self.alive = True
        self.exit_ns = 0
        self.cg = cg
        self.image: tuple[str | None, str | None] | None = None
        self.threads = 1
        self.depth = 0
        self.nforks = self.nlive = self.last_fork_ns = self.abd = self.flags = 0
        self.exec_ns: int | None = None

    @property
    def identity(self) -> tuple[int, int]:
        return (self.tgid, self.start_ns)

    @property
    def cgroup(self) -> str:
        return self.cg.path

    def children(self) -> Iterator["Record"]:
        c = self.first_child
        while c is not None:
            nxt = c.next_sib
            yield c
            c = nxt

    def __repr__(self) -> str:
        state = "live" if self.alive else "placeholder"
        return f"<Record {self.tgid}@{self.start_ns} {state} depth={self.depth} {self.cg.path}>"


class CgStat:
    """Per-cgroup counters kept by the event handlers."""

    __slots__ = ("path", "members", "tasks", "births", "abandons", "loaded_start")

    def __init__(self, path: str):
        self.path = path
        self.members: set[Record] = set()
        self.tasks = 0  # threads of its tracked live records
        self.births = 0  # processes and threads created in it, cumulative
        # (time, abandoning generations, record) of recent exits that left live children.
        self.abandons: deque[tuple[int, int, Record]] = deque(maxlen=256)
        # Newest start time of a record made from /proc here: a family younger than that may
        # have members the tree knows without their lineage (orphans seen only by a scan).
        self.loaded_start = 0


class _Family:
    """Processes known to be outside the watched cgroups share one of these: counting their forks
    and a validity flag costs no per-process state beyond a dict entry."""

    __slots__ = ("forks", "valid", "first")

    def __init__(self, first: bool = False) -> None:
        # first: made at an exec, so its first fork is checked and nothing was missed before it
        self.forks = RESIGHT_EVERY - 1 if first else 0
        self.valid = True
        self.first = first


class ProcFS:
    """The /proc reads the tree needs (cgguard.kernel.procfs). Injectable for tests."""

    def stat(self, pid: int) -> ProcStat | None:
        return procfs.read_stat(pid)

    def cmdline(self, pid: int) -> str | None:
        return procfs.read_cmdline(pid, CMDLINE_MAX)


def read_vmstat(path: str = "/proc/vmstat") -> dict[str, int]:
    """/proc/vmstat as a dict (the aging check needs pageoutrun and allocstall*)."""
    out: dict[str, int] = {}
    with open(path, "rb") as f:
        for line in f.read().decode().splitlines():
            k, _, v = line.partition(" ")
            if v:
                out[k] = int(v)
    return out


def nr_processes(proc_root: str = "/proc") -> int:
    """Thread-group leaders in the system, like the kernel's nr_processes()."""
    return sum(1 for n in os.listdir(proc_root) if n.isdigit())


def oom_badness(tgid: int) -> int:
    """The kernel's OOM badness (/proc/PID/oom_score, 0..2000); 0 if the process is gone."""
    try:
        with open(f"/proc/{tgid}/oom_score", "rb") as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0


@dataclass
class TreeStats:
    records: int = 0
    live: int = 0
    placeholders: int = 0
    forgotten_total: int = 0
    aging_runs: int = 0
    losses: int = 0
    pid_reuse: int = 0
    proc_reads: int = 0
    image_reads_skipped: int = 0
    negative_cache: int = 0
    resights: int = 0
    incomplete: tuple[str, ...] = ()


class LineageTree:
    """The records of processes in watched cgroups; an EventSink for the proc connector.

    Injectables: ``in_scope(cgroup)`` says which cgroups are watched; ``cgroup_of(pid)`` and
    ``proc`` read /proc; ``clock``, ``vmstat`` and ``nr_processes`` feed aging.
    """

    def __init__(
        self,
        *,
        in_scope: Callable[[str], bool] = lambda cg: True,
        cgroup_of: Callable[[int], str | None] = own_cgroup,
        proc: ProcFS | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        vmstat: Callable[[], Mapping[str, int]] = read_vmstat,
        nr_processes: Callable[[], int] = nr_processes,
        reset_interval_ns: int = 30 * S,
        tracking_enabled: bool = True,
        image_reads_per_s: int = 1000,
        abandon_window_ns: int = 5 * S,
        negative_cache_size: int = 262144,
    ):
        self.in_scope = in_scope
        self.cgroup_of = cgroup_of
        self.proc = proc or ProcFS()
        self.clock = clock
        self.vmstat_source = vmstat
        self.nr_processes_source = nr_processes
        # Runtime knobs, like the seed's sysfs files: both may change at any time.
        self.reset_interval_ns = reset_interval_ns
        self.tracking_enabled = tracking_enabled
        self.image_reads_per_s = image_reads_per_s
        self.abandon_window_ns = abandon_window_ns
        self.negative_cache_size = negative_cache_size
        self._live: dict[int, Record] = {}
        self._cg: dict[str, CgStat] = {}
        # cgroup -> the CgStats at or below it, in creation order (as _cg): the agent asks for a
        # cgroup's subtree on every sample, and a pass over every tracked cgroup per question
        # made a start with 10,000 watched cgroups, 1,000 of them populated, quadratic.
        self._under: dict[str, dict[str, CgStat]] = {}
        self._neg: dict[int, _Family] = {}
        self._touched: set[CgStat] = set()
        self._images: list[Record] = []  # records whose image flush() reads
        self._nrec = 0
        self._tokens = float(image_reads_per_s)
        self._tokens_ts = 0
        self._last_nr = 0
        self._last_pageout = 0
        self._last_allocstall = 0
        self.incomplete: set[str] = set()
        self.loss_pending = False
        # Newest abandonment anywhere: lets the agent skip the lineage check after a burst of
        # events when nothing abandoned within the window.
        self.last_abandon_ns = -(1 << 62)
        self._stats = TreeStats()

    # -- EventSink -------------------------------------------------------------------------
    def on_fork(self, ts_ns: int, parent_pid: int, parent_tgid: int, child_pid: int, child_tgid: int) -> None:
        live = self._live
        if child_pid != child_tgid:
            # A new thread (the kernel reports the process's parent for CLONE_THREAD).
            rec = live.get(child_tgid)
            if rec is not None:
                rec.threads += 1
                cg = rec.cg
                cg.tasks += 1
                cg.births += 1
                self._touched.add(cg)
            else:
                fam = self._neg.get(child_tgid)
                if fam is not None:
                    fam.forks += 1
                    if fam.forks >= RESIGHT_EVERY and self._resight(child_tgid, fam):
                        self.on_fork(ts_ns, parent_pid, parent_tgid, child_pid, child_tgid)  # now tracked
            return
        old = live.get(child_tgid)
        if old is not None:
            if old.flags & FROM_PROC and abs(old.start_ns - ts_ns) < IDENTITY_TOLERANCE_NS:
                # A /proc scan already saw this very fork. /proc names the parent a process has
                # now -- init, for an orphan whose parent exited -- while the event names the one
                # that forked it: the event is right, so the record moves under it.
                parent = live.get(parent_tgid)
                if parent is not None and old.parent is not parent and parent is not old:
                    self._relink(old, parent)
                return
            # A live record for a pid that is forked again: its exit was lost. Identities never
            # merge; close the old record out.
            self._stats.pid_reuse += 1
            self._end(old, ts_ns)
        parent = live.get(parent_tgid)
        if parent is None:
            fam = self._neg.get(parent_tgid)
            if fam is not None:
                if fam.valid:
                    self._neg[child_tgid] = fam
                    fam.forks += 1
                    if fam.forks < RESIGHT_EVERY or not self._resight(parent_tgid, fam):
                        return
                    self._neg.pop(child_tgid, None)
                    parent = live.get(parent_tgid)
                else:
                    del self._neg[parent_tgid]
            if parent is None:
                if not self.tracking_enabled:
                    return
                parent = self._sight_parent(parent_tgid, child_tgid, ts_ns)
                if parent is None:
                    return
        if not self.tracking_enabled:
            return  # the seed's knob: no new records; existing ones still age and exit
        rec = Record(child_tgid, ts_ns, parent, parent.cg)
        rec.depth = parent.depth + 1
        first = parent.first_child
        if first is not None:
            first.prev_sib = rec
            rec.next_sib = first
        parent.first_child = rec
        parent.nforks += 1
        parent.nlive += 1
        parent.last_fork_ns = ts_ns
        if parent.flags & STALE and not parent.flags & IMAGE_QUEUED:
            # It forks after an exec: it may be a family's origin, so its image is worth a read.
            parent.flags |= IMAGE_QUEUED
            self._images.append(parent)
        live[child_tgid] = rec
        cg = rec.cg
        cg.members.add(rec)
        cg.tasks += 1
        cg.births += 1
        self._touched.add(cg)
        self._nrec += 1

    def on_exec(self, ts_ns: int, pid: int, tgid: int) -> None:
        rec = self._live.get(tgid)
        if rec is not None:
            # What it runs now is read only if it forks (see on_fork); until then, unknown.
            rec.exec_ns = ts_ns
            rec.image = None
            rec.flags = (rec.flags | STALE) & ~IMAGE_QUEUED
            return
        if tgid in self._neg:
            # Runtimes move a process into its cgroup between its fork and its exec (runc init,
            # systemd-run --scope, `docker exec`): an outsider that execs gets a family of its own
            # whose first fork (or thread) checks where it is now. Commands that never fork
            # cost nothing more.
            self._neg[tgid] = _Family(first=True)

    def on_exit(self, ts_ns: int, pid: int, tgid: int, exit_code: int, exit_signal: int) -> None:
        """The leader's exit ends the record. A main thread that calls pthread_exit() while other
        threads run is taken for the process exiting: the kernel reports nothing else to tell
        them apart, and such a process does not fork copies of itself anyway."""
        live = self._live
        if pid != tgid:
            rec = live.get(tgid)
            if rec is not None and rec.threads > 1:
                rec.threads -= 1
                rec.cg.tasks -= 1
            return
        rec = live.get(tgid)
        if rec is None:
            self._neg.pop(tgid, None)
            return
        self._end(rec, ts_ns)

    def on_loss(self, reason: str) -> None:
        """Events were lost: the tree may miss forks and exits until a rescan (the caller runs it
        after the read batch, so a burst of loss reports costs one /proc scan)."""
        self._stats.losses += 1
        self.loss_pending = True

    # -- bookkeeping -----------------------------------------------------------------------
    def _end(self, rec: Record, ts_ns: int) -> None:
        """The process exited (or its exit was missed)."""
        if self._live.get(rec.tgid) is rec:
            del self._live[rec.tgid]
        rec.alive = False
        rec.exit_ns = ts_ns
        cg = rec.cg
        cg.tasks -= rec.threads
        p = rec.parent
        if p is not None:
            p.nlive -= 1
        if rec.nlive > 0:
            self._abandoned(rec, ts_ns)
        elif rec.first_child is None:
            self._free(rec)

    def _abandoned(self, rec: Record, ts_ns: int) -> None:
        """``rec`` exited leaving live children: count the abandoning generations that led here
        (parents that did the same, within the window)."""
        d = 1
        a = rec.parent
        horizon = ts_ns - self.abandon_window_ns
        for _ in range(ABANDON_WALK):
            if a is None:
                break
            if a.abd:
                if a.exit_ns >= horizon:
                    d += a.abd
                break
            a = a.parent
        rec.abd = d
        cg = rec.cg
        cg.abandons.append((ts_ns, d, rec))
        self.last_abandon_ns = max(self.last_abandon_ns, ts_ns)
        self._touched.add(cg)

    def _detach(self, rec: Record) -> None:
        """Stop tracking a live process (aged out, or moved out of scope): seed's mm = NULL."""
        if self._live.get(rec.tgid) is rec:
            del self._live[rec.tgid]
        rec.alive = False
        rec.flags |= FORGOTTEN
        rec.cg.tasks -= rec.threads
        if rec.parent is not None:
            rec.parent.nlive -= 1
        if rec.first_child is None:
            self._free(rec)

    def _free(self, rec: Record) -> None:
        """Free a childless non-live record and every ancestor placeholder left childless.

        The seed's scan mode frees only the record itself and relies on its post-order walk to
        reach the parent next; freeing the emptied placeholders here keeps the invariant that
        every placeholder has children, whatever order callers free in.
        """
        while True:
            p = rec.parent
            if p is not None:
                prv, nxt = rec.prev_sib, rec.next_sib
                if prv is None:
                    p.first_child = nxt
                else:
                    prv.next_sib = nxt
                if nxt is not None:
                    nxt.prev_sib = prv
            cg = rec.cg
            cg.members.discard(rec)
            if not cg.members and not cg.abandons and self._cg.pop(cg.path, None) is not None:
                self._unindex(cg)
            rec.parent = rec.prev_sib = rec.next_sib = None
            rec.flags |= FREED
            self._nrec -= 1
            if p is None or p.alive or p.first_child is not None:
                return
            rec = p

    def _relink(self, rec: Record, parent: Record) -> None:
        p = rec.parent
        if p is not None:
            prv, nxt = rec.prev_sib, rec.next_sib
            if prv is None:
                p.first_child = nxt
            else:
                prv.next_sib = nxt
            if nxt is not None:
                nxt.prev_sib = prv
            p.nforks -= 1
            p.nlive -= 1 if rec.alive else 0
        rec.parent = parent
        rec.prev_sib = None
        rec.depth = parent.depth + 1
        first = parent.first_child
        if first is not None:
            first.prev_sib = rec
        rec.next_sib = first
        parent.first_child = rec
        parent.nforks += 1
        parent.nlive += 1 if rec.alive else 0
        if p is not None and not p.alive and p.first_child is None:
            self._free(p)

    def move(self, rec: Record, cgroup: str) -> None:
        cg = rec.cg
        cg.members.discard(rec)
        cg.tasks -= rec.threads if rec.alive else 0
        new = self.cgstat(cgroup)
        rec.cg = new
        new.members.add(rec)
        new.tasks += rec.threads if rec.alive else 0

    def cgstat(self, cgroup: str) -> CgStat:
        cg = self._cg.get(cgroup)
        if cg is None:
            cg = self._cg[cgroup] = CgStat(sys.intern(cgroup))
            self._index(cg)
        return cg

    @staticmethod
    def _prefixes(path: str) -> Iterator[str]:
        """The cgroup and each of its ancestors, the root ("") last."""
        while path:
            yield path
            path = path.rsplit("/", 1)[0] if "/" in path else ""
        yield ""

    def _index(self, cg: CgStat) -> None:
        for prefix in self._prefixes(cg.path):
            self._under.setdefault(prefix, {})[cg.path] = cg

    def _unindex(self, cg: CgStat) -> None:
        for prefix in self._prefixes(cg.path):
            under = self._under.get(prefix)
            if under is not None:
                under.pop(cg.path, None)
                if not under:
                    del self._under[prefix]

    def _neg_add(self, tgid: int, fam: _Family) -> None:
        neg = self._neg
        if len(neg) >= self.negative_cache_size:
            del neg[next(iter(neg))]
        neg[tgid] = fam

    def _resight(self, tgid: int, fam: _Family) -> bool:
        """Every RESIGHT_EVERY forks of an untracked family, check where its forking member is:
        a container runtime moves processes into their cgroup after forking them. True if it
        is in scope now (the whole family is then looked at again, member by member)."""
        fam.forks = 0
        first, fam.first = fam.first, False
        self._stats.resights += 1
        self._stats.proc_reads += 1
        cg = self.cgroup_of(tgid)
        if cg is None or not self.in_scope(cg):
            return False
        fam.valid = False
        self._neg.pop(tgid, None)
        st = self.proc.stat(tgid)
        if st is not None:
            # From here on its events count its threads: /proc would count the ones whose
            # creation events are still queued a second time.
            self.from_stat(st, cg, threads=1)
            if not first:  # forks of the family before this check went unseen
                self.incomplete.add(cg)
        return True

    def _sight_parent(self, ptgid: int, ctgid: int, ts_ns: int) -> Record | None:
        """A fork by a parent never seen: place it once via /proc. Returns its new record, a root
        record for the child if the parent is gone but the child is watched, or None (outside)."""
        self._stats.proc_reads += 1
        cg = self.cgroup_of(ptgid)
        if cg is not None and not self.in_scope(cg):
            # Children start in their parent's cgroup: both are outside until one is moved.
            fam = _Family()
            self._neg_add(ptgid, fam)
            self._neg_add(ctgid, fam)
            return None
        st = self.proc.stat(ptgid) if cg is not None else None
        if st is None or cg is None:
            cg = self.cgroup_of(ctgid)
            if cg is None or not self.in_scope(cg):
                self._neg_add(ctgid, _Family())
                return None
            # The parent is gone but the child is watched: the child becomes a root.
            rec = Record(ctgid, ts_ns, None, self.cgstat(cg))
            rec.flags = STALE | IMAGE_QUEUED
            self._images.append(rec)
            self._add(rec)
            return None
        return self.from_stat(st, cg, threads=1)

    def _add(self, rec: Record) -> None:
        self._live[rec.tgid] = rec
        cg = rec.cg
        cg.members.add(rec)
        cg.tasks += rec.threads
        self._touched.add(cg)
        self._nrec += 1

    def from_stat(self, st: ProcStat, cgroup: str, threads: int | None = None) -> Record:
        """A live record for a process first seen in /proc, linked to its parent if tracked.

        Its image is read at once: sightings are rare (start-up, adoption, an unknown parent's
        first fork), and such a process may be a family's origin that exits any moment.
        """
        rec = Record(st.pid, st.start_ns, None, self.cgstat(cgroup))
        rec.cg.loaded_start = max(rec.cg.loaded_start, st.start_ns)
        rec.flags = FROM_PROC
        cmd = self.proc.cmdline(st.pid)
        rec.image = (st.comm, sys.intern(cmd) if cmd is not None and len(cmd) <= 256 else cmd)
        rec.threads = st.num_threads if threads is None else threads
        rec.exec_ns = -1  # unknown: it may run its parent's image or another
        parent = self._live.get(st.ppid)
        if parent is not None and parent.start_ns <= st.start_ns + IDENTITY_TOLERANCE_NS:
            rec.parent = parent
            rec.depth = parent.depth + 1
            first = parent.first_child
            if first is not None:
                first.prev_sib = rec
                rec.next_sib = first
            parent.first_child = rec
            parent.nforks += 1
            parent.nlive += 1
        self._add(rec)
        return rec

    # -- after each burst of events ----------------------------------------------------------
    def flush(self) -> None:
        """Read the images queued by the last burst, as far as the rate budget allows (an exec
        storm degrades to unnamed records, never to a /proc read per event)."""
        if not self._images:
            return
        todo, self._images = self._images, []
        now = self.clock()
        rate = self.image_reads_per_s
        if now > self._tokens_ts:
            self._tokens = min(float(rate), self._tokens + (now - self._tokens_ts) * rate / 1e9)
            self._tokens_ts = now
        for rec in todo:
            rec.flags &= ~IMAGE_QUEUED
            if not rec.alive or rec.flags & FREED or not rec.flags & STALE:
                continue
            if self._tokens < 1.0:
                self._stats.image_reads_skipped += 1
                continue
            self._tokens -= 1.0
            self.read_image(rec)

    def read_image(self, rec: Record) -> bool:
        """Read comm and cmdline of a live record's process, if it is still the same process."""
        st = self.proc.stat(rec.tgid)
        self._stats.proc_reads += 1
        if not procfs.same_process(st, rec.start_ns, IDENTITY_TOLERANCE_NS):
            return False
        cmd = self.proc.cmdline(rec.tgid)
        assert st is not None
        rec.image = (st.comm, sys.intern(cmd) if cmd is not None and len(cmd) <= 256 else cmd)
        rec.flags &= ~STALE
        return True

    def abandoned_recently(self, cgroups: Iterable[str], since_ns: int) -> bool:
        """Did any of these cgroups see an abandonment at or after ``since_ns``?"""
        if self.last_abandon_ns < since_ns:
            return False
        for path in cgroups:
            cg = self._cg.get(path)
            if cg is not None and cg.abandons and cg.abandons[-1][0] >= since_ns:
                return True
        return False

    def take_activity(self) -> set[str]:
        """Cgroups whose tracked processes forked, made threads or abandoned children since the
        last call."""
        touched, self._touched = self._touched, set()
        return {cg.path for cg in touched}

    # -- aging -------------------------------------------------------------------------------
    def age(self, now_ns: int | None = None, nr_procs: int | None = None, vmstat: Mapping[str, int] | None = None) -> int:
        """The seed's reset_mm_tracking, to be called every ``reset_interval_ns``.

        Forget only if the number of processes did not grow, kswapd did not run (pageoutrun)
        and no allocation stalled (allocstall*, summed) since the last call; the remembered
        values are updated either way. Forgetting walks the records post-order and drops every
        record that started before ``now - reset_interval``: a live process is detached (its
        later forks are "unknown parent" again), a childless record is freed, a record with
        children stays as a placeholder. Returns the number of records forgotten.
        """
        now = self.clock() if now_ns is None else now_ns
        nr = self.nr_processes_source() if nr_procs is None else nr_procs
        vm = self.vmstat_source() if vmstat is None else vmstat
        forget = nr <= self._last_nr
        self._last_nr = nr
        pageout = int(vm.get("pageoutrun", 0))
        forget = forget and pageout == self._last_pageout
        self._last_pageout = pageout
        stall = sum(int(v) for k, v in vm.items() if k.startswith("allocstall"))
        forget = forget and stall == self._last_allocstall
        self._last_allocstall = stall

        self._stats.aging_runs += 1
        self.incomplete.clear()
        # Scope may have changed and pids were recycled: start the negative families afresh.
        self._neg.clear()
        for cg in list(self._cg.values()):
            while cg.abandons and cg.abandons[0][0] < now - self.abandon_window_ns:
                cg.abandons.popleft()
            if not cg.members and not cg.abandons:
                del self._cg[cg.path]
                self._unindex(cg)
        if not forget:
            return 0
        thresh = now - self.reset_interval_ns
        before = self._nrec
        kept = []  # detached processes whose records stay as placeholders
        for rec in list(postorder(self._all_roots())):
            if rec.flags & FREED or rec.start_ns >= thresh:
                continue
            if rec.alive:
                self._detach(rec)
                kept.append(rec)
            elif rec.first_child is None:
                self._free(rec)
        # Freed records (with the placeholders freed on the way up) and detached ones.
        forgotten = before - self._nrec + sum(1 for r in kept if not r.flags & FREED)
        self._stats.forgotten_total += forgotten
        return forgotten

    def _all_roots(self) -> list[Record]:
        return [r for cg in self._cg.values() for r in cg.members if r.parent is None]

    # -- queries -----------------------------------------------------------------------------
    def get(self, tgid: int) -> Record | None:
        """The live record of ``tgid``, if tracked."""
        return self._live.get(tgid)

    def cgstats(self, cgroup: str, subtree: bool = True) -> list[CgStat]:
        """The CgStats of ``cgroup`` (and, with ``subtree``, below it), in creation order."""
        top = cgroup.strip("/")
        if not subtree:
            cg = self._cg.get(top)
            return [cg] if cg is not None else []
        return list(self._under.get(top, {}).values())

    def records_in(self, cgroup: str, subtree: bool = True) -> Iterator[Record]:
        """Records (live and placeholders) whose cgroup is ``cgroup`` or, with ``subtree``, below it."""
        for cg in self.cgstats(cgroup, subtree):
            yield from list(cg.members)

    def forest(self, cgroup: str, subtree: bool = True) -> tuple[set[Record], list[Record]]:
        """The cgroup's records and their roots (records whose parent is untracked or outside
        the cgroup), oldest root first."""
        members = set(self.records_in(cgroup, subtree))
        return members, sorted((r for r in members if r.parent not in members), key=lambda r: r.start_ns)

    def tasks_in(self, cgroup: str) -> int:
        """Tracked tasks (threads) of the cgroup's subtree, from the event counts."""
        return sum(cg.tasks for cg in self.cgstats(cgroup))

    def births_in(self, cgroup: str) -> int:
        return sum(cg.births for cg in self.cgstats(cgroup))

    def loaded_start(self, cgroup: str) -> int:
        """Newest start time of a process the tree knows only from /proc in the cgroup's subtree:
        a family that began before it may have members whose lineage is lost."""
        return max((cg.loaded_start for cg in self.cgstats(cgroup)), default=0)

    def is_incomplete(self, cgroup: str) -> bool:
        """True if a rescan since the last aging run touched the cgroup, its subtree or an
        ancestor: lineage lost with the events is missing there."""
        return any(within(cgroup, c) or within(c, cgroup) for c in self.incomplete)

    def live_members(self, record: Record) -> list[tuple[int, int]]:
        """Identities of the live processes of ``record``'s subtree, the record itself included."""
        return [r.identity for r in walk(record) if r.alive]

    def describe(self, rec: Record) -> tuple[str | None, str | None]:
        """(comm, cmdline) of what ``rec`` runs, read from /proc if it was not yet.

        A record that never exec'd since its fork runs its parent's image, so it takes its
        parent's answer; a dead record whose image was never read takes a live clone's (a
        bomb's members are copies of its origin, and one of them is alive).
        """
        r = rec
        while r.image is None and r.exec_ns is None and r.parent is not None:
            r = r.parent
        if r.image is None and r.alive and r.flags & STALE:
            self.read_image(r)
        # A zombie's /proc has its comm but no command line: ask a live clone (a bomb's members
        # are copies of its origin, and one of them is alive).
        if (r.image is None or r.image[1] is None) and not (r.alive and r.image):
            for c in walk(r, lambda c: c.exec_ns is None):
                if c is not r and c.alive and self.read_image(c) and c.image and c.image[1]:
                    return c.image
        return r.image or (None, None)

    @property
    def stats(self) -> TreeStats:
        s = self._stats
        s.records = self._nrec
        s.live = len(self._live)
        s.placeholders = self._nrec - s.live
        s.negative_cache = len(self._neg)
        s.incomplete = tuple(sorted(self.incomplete))
        return s


# -- walks and the seed's score (pure) -----------------------------------------------------
def descends_from(rec: Record, origin: Record) -> bool | None:
    """Does ``rec`` descend from ``origin``: True, False, or None when the tree cannot say.

    Links the tree holds are facts (a FORK event, or /proc's parent while it lived). Above a root
    record the ancestry is unknown: a root younger than the origin (a bomb's orphan first seen in
    /proc after its parent exited, or a child whose parent's fork event was lost) may well be
    one of the origin's, so it is None, never a false "innocent". A root older than the origin
    cannot descend from it.
    """
    r = rec
    while True:
        if r is origin:
            return True
        if r.parent is None:
            return False if r.start_ns + IDENTITY_TOLERANCE_NS < origin.start_ns else None
        r = r.parent


def within(cg: str, top: str, subtree: bool = True) -> bool:
    """Is cgroup ``cg`` the cgroup ``top`` or (with ``subtree``) below it? "" is the root."""
    top = top.strip("/")
    return cg == top or (subtree and (not top or cg.startswith(top + "/")))


def walk(root: Record, keep: Callable[[Record], object] | None = None) -> Iterator[Record]:
    """``root`` and its descendants, parents first; ``keep`` prunes children (and their subtrees)."""
    stack = [root]
    while stack:
        r = stack.pop()
        yield r
        c = r.first_child
        while c is not None:
            if keep is None or keep(c):
                stack.append(c)
            c = c.next_sib


def postorder(roots: Iterable[Record], within_set: set[Record] | None = None) -> Iterator[Record]:
    """Children before parents (the seed's scan order), optionally restricted to ``within_set``."""
    for root in roots:
        stack: list[tuple[Record, bool]] = [(root, False)]
        while stack:
            r, expanded = stack.pop()
            if expanded:
                yield r
                continue
            stack.append((r, True))
            c = r.first_child
            while c is not None:
                if within_set is None or c in within_set:
                    stack.append((c, False))
                c = c.next_sib


def seed_scores(
    roots: Iterable[Record], within_set: set[Record] | None, badness: Callable[[int], int] | None
) -> dict[Record, tuple[int, int]]:
    """The seed killer's (score, family) per record: score = own OOM badness (0 for a placeholder,
    or without ``badness``) + children's scores + 1 per live child; family = live processes
    under it. Without badness the score is the number of live descendants."""
    out: dict[Record, tuple[int, int]] = {}
    for r in postorder(roots, within_set):
        score = badness(r.tgid) if (badness is not None and r.alive) else 0
        family = 0
        c = r.first_child
        while c is not None:
            got = out.get(c)
            if got is not None:
                score += got[0] + (1 if c.alive else 0)
                family += got[1] + (1 if c.alive else 0)
            c = c.next_sib
        out[r] = (score, family)
    return out

