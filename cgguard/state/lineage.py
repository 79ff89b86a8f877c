"""The record tree: one record per process, fed by proc-connector events (state, not policy).

This is the 2011 mm_record tracker (see ../shared/seed) rebuilt in userspace:

* A record per thread group, identified by ``(tgid, start_ns)`` -- never by a bare pid, which the
  kernel recycles within seconds under a bomb (pid_max is often 32768).
* A record stays as a *placeholder* after its process exited while it still has children, so the
  tree of a bomb whose parents exit at once can still be walked from its origin. A childless dead
  record is freed at once, and so are its ancestors that thereby become childless placeholders.
* Aging (:meth:`LineageTree.age`) mirrors the seed's ``reset_mm_tracking``: every
  ``reset_interval`` it forgets records older than the interval, but only if the system looked
  calm since the last run (no more processes, no kswapd run, no allocation stall).

Costs are kept per event to a few dict operations and one small object: a bash bomb forks
5-10k times a second and a C vfork loop 50k. /proc is never read on a fork of a known parent; a
child inherits comm, cmdline and cgroup from its parent until it execs. Exec re-reads the
process's cgroup, comm and cmdline (processes are commonly moved into their cgroup between fork
and exec), under a rate budget so an exec storm degrades to lazy reads instead of I/O per event.

Kernel and /proc I/O stays at the edges: :class:`ProcFS` (injectable) and the ``cgroup_of``
callable. Timestamps are CLOCK_MONOTONIC nanoseconds, as in the proc connector's events.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

from cgguard.kernel import procfs
from cgguard.kernel.cgroupfs import CgroupError, CgroupFS, find_cgroup2_root
from cgguard.kernel.cgroupns import own_cgroup
from cgguard.kernel.procfs import ProcStat

# Record.flags
STALE = 1  # comm/cmdline not read since the last exec
FROM_PROC = 2  # made from /proc (start-up, resync, first sight), not from a FORK event
FORGOTTEN = 4  # detached by aging while the process may still run
FREED = 8  # removed from the tree; a stale reference to it must be ignored

# Two sightings of one process from different sources (a FORK event's timestamp and /proc's
# start time in clock ticks) differ by up to one tick plus scheduling noise.
IDENTITY_TOLERANCE_NS = 3 * procfs.TICK_NS

CMDLINE_MAX = 1024


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
        "cgroup",
        "comm",
        "cmdline",
        "threads",
        "depth",
        "cdepth",  # clone generations in a row ending here: 0 after an exec into a new image
        "last_fork_ns",  # creation time of the newest child
        "nforks",  # process children forked (threads not counted)
        "exec_ns",  # last exec; None while the process still runs its parent's image
        "flags",
    )

    def __init__(self, tgid: int, start_ns: int, parent: Record | None, cgroup: str, comm: str | None, cmdline: str | None):
        self.tgid = tgid
        self.start_ns = start_ns
        self.parent = parent
        self.first_child = None
        self.next_sib = None
        self.prev_sib = None
        self.alive = True
        self.exit_ns = None
        self.cgroup = cgroup
        self.comm = comm
        self.cmdline = cmdline
        self.threads = 1
        self.depth = 0
        self.cdepth = 0
        self.last_fork_ns = 0
        self.nforks = 0
        self.exec_ns = None
        self.flags = 0

    @property
    def identity(self) -> tuple[int, int]:
        return (self.tgid, self.start_ns)

    @property
    def placeholder(self) -> bool:
        return not self.alive

    def children(self) -> Iterator[Record]:
        c = self.first_child
        while c is not None:
            nxt = c.next_sib
            yield c
            c = nxt

    def cloned(self) -> bool:
        """True if this process runs the same program as its parent: it never exec'd since the
        fork, or it exec'd into the very same comm and cmdline (a script that starts itself).
        A record whose post-exec image is unknown (not read yet) does not count."""
        if self.exec_ns is None:
            return True
        p = self.parent
        if p is None or self.flags & STALE or p.flags & STALE or self.cmdline is None:
            return False
        return self.comm == p.comm and self.cmdline == p.cmdline

    def __repr__(self) -> str:
        state = "live" if self.alive else "placeholder"
        return f"<Record {self.tgid}@{self.start_ns} {self.comm!r} {state} depth={self.depth}>"


# -- /proc edge ----------------------------------------------------------------------------
class ProcFS:
    """The /proc reads the tree needs (cgguard.kernel.procfs). Injectable so tests need no real processes."""

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
    """Thread-group leaders in the system, like the kernel's nr_processes(): the numeric
    entries of /proc (the initial pid namespace sees every process)."""
    return sum(1 for n in os.listdir(proc_root) if n.isdigit())


def oom_badness(tgid: int) -> int:
    """The kernel's OOM badness (/proc/PID/oom_score, 0..2000); 0 if the process is gone."""
    try:
        with open(f"/proc/{tgid}/oom_score", "rb") as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0


# -- the tree ------------------------------------------------------------------------------
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
    exec_reads_skipped: int = 0
    negative_cache: int = 0
    incomplete: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["incomplete"] = list(self.incomplete)
        return d


_OUT = object()  # sentinel: the process is outside the watched cgroups


class LineageTree:
    """Records of the processes in watched cgroups; an EventSink for :class:`ProcConnector`.

    Injectables: ``in_scope(cgroup)`` says which cgroups are watched; ``cgroup_of(pid)`` and
    ``proc`` read /proc; ``fs`` lists cgroup members for start-up and resync; ``clock``,
    ``vmstat`` and ``nr_processes`` feed aging.
    """

    def __init__(
        self,
        *,
        in_scope: Callable[[str], bool] = lambda cg: True,
        cgroup_of: Callable[[int], str | None] = own_cgroup,
        proc: ProcFS | None = None,
        fs: CgroupFS | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        vmstat: Callable[[], Mapping[str, int]] = read_vmstat,
        nr_processes: Callable[[], int] = nr_processes,
        reset_interval_ns: int = 30_000_000_000,
        tracking_enabled: bool = True,
        exec_reads_per_s: int = 2000,
        negative_cache_size: int = 16384,
        hot_clone_depth: int = 5,
        wide_clone_depth: int = 3,
    ):
        self.in_scope = in_scope
        self.cgroup_of = cgroup_of
        self.proc = proc or ProcFS()
        self._fs = fs
        self.clock = clock
        self.vmstat_source = vmstat
        self.nr_processes_source = nr_processes
        # Runtime knobs, like the seed's sysfs files: both may change at any time.
        self.reset_interval_ns = reset_interval_ns
        self.tracking_enabled = tracking_enabled
        self.exec_reads_per_s = exec_reads_per_s
        self.negative_cache_size = negative_cache_size
        # Forks at this many clone generations are remembered per cgroup (deep_forks_since), so the
        # lineage detector can skip cgroups where no chain got that deep.
        self.hot_clone_depth = hot_clone_depth
        self.wide_clone_depth = wide_clone_depth

        self._live: dict[int, Record] = {}
        self._members: dict[str, set[Record]] = {}
        self._neg: dict[int, None] = {}  # tgids known to be outside the watched cgroups
        self._touched: set[str] = set()  # cgroups that forked since the last take_activity()
        # When a fork in a cgroup last reached hot_clone_depth clone generations ...
        self.deep_fork_ns: dict[str, int] = {}
        # ... and when one last reached wide_clone_depth (for wide, shallow replication).
        self.wide_fork_ns: dict[str, int] = {}
        self._nrec = 0
        self._tokens = float(exec_reads_per_s)
        self._tokens_ts = 0
        self._last_nr = 0
        self._last_pageout = 0
        self._last_allocstall = 0
        self.incomplete: set[str] = set()
        self.loss_pending = False
        self._stats = TreeStats()

    # -- EventSink ---------------------------------------------------------------------------
    def on_fork(self, ts_ns: int, parent_pid: int, parent_tgid: int, child_pid: int, child_tgid: int) -> None:
        live = self._live
        if child_pid != child_tgid:
            # A new thread. The kernel reports the *process's* parent as parent for CLONE_THREAD,
            # so the thread belongs to child_tgid.
            rec = live.get(child_tgid)
            if rec is not None:
                rec.threads += 1
            return
        old = live.get(child_tgid)
        if old is not None:
            if old.flags & FROM_PROC and abs(old.start_ns - ts_ns) < IDENTITY_TOLERANCE_NS:
                return  # the /proc scan already saw this very fork
            # A live record for a pid that is forked again: its exit was lost. Identities never
            # merge; close the old record out.
            self._stats.pid_reuse += 1
            self._end(old, ts_ns)
        parent = live.get(parent_tgid)
        if not self.tracking_enabled:
            return
        if parent is None:
            if parent_tgid in self._neg:
                self._neg_add(child_tgid)
                return
            found = self._sight_parent(parent_tgid, child_tgid)
            if found is _OUT:
                return
            if isinstance(found, str):
                # The parent is gone but the child is watched: it becomes a root.
                rec = Record(child_tgid, ts_ns, None, found, None, None)
                rec.flags = STALE
                self._add(rec)
                return
            parent = found  # type: ignore[assignment]
        # A child runs its parent's image, in its parent's cgroup, until it execs.
        cg = parent.cgroup
        rec = Record(child_tgid, ts_ns, parent, cg, parent.comm, parent.cmdline)
        rec.flags = parent.flags & STALE
        rec.cdepth = parent.cdepth + 1
        self._link(rec, parent)
        self._add(rec)
        self._touched.add(cg)

    def on_exec(self, ts_ns: int, pid: int, tgid: int) -> None:
        rec = self._live.get(tgid)
        if rec is None:
            if self.tracking_enabled:
                # Exec is where a process moved into a watched cgroup after its fork shows up.
                self._sight_exec(tgid, ts_ns)
            return
        rec.exec_ns = ts_ns
        if not self._take_token(ts_ns):
            # Over budget: the new image is read on demand (describe), if the process still runs.
            self._forget_image(rec)
            self._stats.exec_reads_skipped += 1
            return
        st = self.proc.stat(tgid)
        cg = self.cgroup_of(tgid)
        self._stats.proc_reads += 1
        if st is None or cg is None:
            # Gone already; what it exec'd is lost. Its exit event follows.
            self._forget_image(rec)
            return
        if not procfs.same_process(st, rec.start_ns, IDENTITY_TOLERANCE_NS):
            # Not the process we knew: the exit and the fork of this pid were both lost.
            self._stats.pid_reuse += 1
            self._end(rec, ts_ns)
            self._sight_exec(tgid, ts_ns)
            return
        rec.comm = st.comm
        rec.cmdline = self._intern_cmdline(self.proc.cmdline(tgid))
        rec.flags &= ~STALE
        # exec leaves one thread; /proc may already count threads whose events are still queued.
        rec.threads = 1
        p = rec.parent
        rec.cdepth = p.cdepth + 1 if p is not None and rec.cloned() else 0
        if cg != rec.cgroup:
            if not self.in_scope(cg):
                self._detach(rec)
                self._neg_add(tgid)
                return
            self._move(rec, sys.intern(cg))

    @staticmethod
    def _forget_image(rec: Record) -> None:
        # The inherited comm/cmdline describe the image before exec: wrong from now on.
        rec.comm = rec.cmdline = None
        rec.flags |= STALE
        rec.cdepth = 0

    def on_exit(self, ts_ns: int, pid: int, tgid: int, exit_code: int, exit_signal: int) -> None:
        """The leader's exit ends the record. A main thread that calls pthread_exit() while other
        threads run is taken for the process exiting: the kernel reports nothing else to tell
        them apart, and such a process does not fork copies of itself anyway."""
        if pid != tgid:
            rec = self._live.get(tgid)
            if rec is not None and rec.threads > 1:
                rec.threads -= 1
            return
        rec = self._live.get(tgid)
        if rec is None:
            self._neg.pop(tgid, None)
            return
        self._end(rec, ts_ns)

    def on_loss(self, reason: str) -> None:
        """Events were lost: the tree may miss forks and exits until :meth:`resync` runs.

        Resync is deferred to the caller (after the read batch) so that a burst of loss reports
        costs one /proc scan, not one per report.
        """
        self._stats.losses += 1
        self.loss_pending = True

    # -- record bookkeeping ------------------------------------------------------------------
    def _link(self, rec: Record, parent: Record) -> None:
        rec.parent = parent
        rec.depth = parent.depth + 1
        first = parent.first_child
        if first is not None:
            first.prev_sib = rec
            rec.next_sib = first
        parent.first_child = rec
        if rec.start_ns > parent.last_fork_ns:
            parent.last_fork_ns = rec.start_ns
        parent.nforks += 1

    def _add(self, rec: Record) -> None:
        """Index a new live record (already linked to its parent, if any)."""
        self._live[rec.tgid] = rec
        self._nrec += 1
        members = self._members.get(rec.cgroup)
        if members is None:
            members = self._members[rec.cgroup] = set()
        members.add(rec)
        if rec.cdepth >= self.wide_clone_depth:
            self.wide_fork_ns[rec.cgroup] = rec.start_ns
            if rec.cdepth >= self.hot_clone_depth:
                self.deep_fork_ns[rec.cgroup] = rec.start_ns

    def _end(self, rec: Record, ts_ns: int) -> None:
        """The process exited (or its exit was missed): keep a placeholder only for children."""
        if self._live.get(rec.tgid) is rec:
            del self._live[rec.tgid]
        rec.alive = False
        rec.exit_ns = ts_ns
        if rec.first_child is None:
            self._free(rec)

    def _detach(self, rec: Record) -> None:
        """Stop tracking a live process (aged out, or moved out of scope): seed's mm = NULL."""
        if self._live.get(rec.tgid) is rec:
            del self._live[rec.tgid]
        rec.alive = False
        rec.flags |= FORGOTTEN
        if rec.first_child is None:
            self._free(rec)

    def _free(self, rec: Record) -> None:
        """Free a childless non-live record and every ancestor placeholder left childless.

        The seed's scan mode frees only the record itself and relies on its post-order walk to
        reach the parent next; freeing the emptied placeholders here keeps the invariant that
        every placeholder has children, whatever order callers free in.
        """
        members = self._members
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
            s = members.get(rec.cgroup)
            if s is not None:
                s.discard(rec)
                if not s:
                    del members[rec.cgroup]
            rec.parent = rec.prev_sib = rec.next_sib = None
            rec.flags |= FREED
            self._nrec -= 1
            if p is None or p.alive or p.first_child is not None:
                return
            rec = p

    def _move(self, rec: Record, cg: str) -> None:
        s = self._members.get(rec.cgroup)
        if s is not None:
            s.discard(rec)
            if not s:
                del self._members[rec.cgroup]
        rec.cgroup = cg
        self._members.setdefault(cg, set()).add(rec)

    def _neg_add(self, tgid: int) -> None:
        neg = self._neg
        if len(neg) >= self.negative_cache_size:
            del neg[next(iter(neg))]
        neg[tgid] = None

    def clear_negative_cache(self) -> None:
        """Forget which processes were found outside the watched cgroups (after a scope change)."""
        self._neg.clear()

    def _take_token(self, ts_ns: int) -> bool:
        rate = self.exec_reads_per_s
        if rate <= 0:
            return False
        if ts_ns > self._tokens_ts:
            self._tokens = min(float(rate), self._tokens + (ts_ns - self._tokens_ts) * rate / 1e9)
            self._tokens_ts = ts_ns
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    @staticmethod
    def _intern_cmdline(cmdline: str | None) -> str | None:
        # Short command lines repeat a lot (a build runs the same compiler line shapes).
        return sys.intern(cmdline) if cmdline is not None and len(cmdline) <= 256 else cmdline

    def _from_stat(self, st: ProcStat, cg: str, cmdline: str | None) -> Record:
        """A live record for a process first seen in /proc, linked to its parent if tracked."""
        rec = Record(st.pid, st.start_ns, None, sys.intern(cg), st.comm, self._intern_cmdline(cmdline))
        rec.flags = FROM_PROC
        rec.threads = st.num_threads
        rec.exec_ns = -1  # unknown: only a same-image comparison can call it a clone
        parent = self._live.get(st.ppid)
        if parent is not None and parent.start_ns <= st.start_ns + IDENTITY_TOLERANCE_NS:
            self._link(rec, parent)
            rec.cdepth = parent.cdepth + 1 if rec.cloned() else 0
        self._add(rec)
        return rec

    def _sight_parent(self, ptgid: int, ctgid: int) -> Record | str | object:
        """A fork by an unknown parent: place it once via /proc. Returns the parent's new
        record; the child's cgroup if the parent is gone but the child is watched; or _OUT."""
        self._stats.proc_reads += 1
        cg = self.cgroup_of(ptgid)
        if cg is not None and not self.in_scope(cg):
            # Children start in their parent's cgroup: both are outside until one execs.
            self._neg_add(ptgid)
            self._neg_add(ctgid)
            return _OUT
        st = self.proc.stat(ptgid) if cg is not None else None
        if st is None:
            cg = self.cgroup_of(ctgid)
            if cg is None or not self.in_scope(cg):
                self._neg_add(ctgid)
                return _OUT
            return sys.intern(cg)
        return self._from_stat(st, cg, self.proc.cmdline(ptgid))

    def _sight_exec(self, tgid: int, ts_ns: int) -> None:
        self._stats.proc_reads += 1
        cg = self.cgroup_of(tgid)
        if cg is None or not self.in_scope(cg):
            self._neg_add(tgid)
            return
        self._neg.pop(tgid, None)
        st = self.proc.stat(tgid)
        if st is None:
            # Exited between the two reads. Its forks may still be queued behind this event:
            # a record from the event alone (start unknown, so the exec time) keeps them linked.
            rec = Record(tgid, ts_ns, None, sys.intern(cg), None, None)
            rec.exec_ns = ts_ns
            self._add(rec)
            return
        rec = self._from_stat(st, cg, self.proc.cmdline(tgid))
        rec.exec_ns = ts_ns
        rec.threads = 1  # as in on_exec

    # -- start-up and resync -----------------------------------------------------------------
    @property
    def fs(self) -> CgroupFS:
        if self._fs is None:
            self._fs = CgroupFS(find_cgroup2_root())
        return self._fs

    def _scan(self, cgroups: Iterable[str]) -> tuple[dict[int, tuple[ProcStat, str]], set[str]]:
        """Live processes of the cgroups' subtrees from cgroup.procs and /proc/PID/stat."""
        found: dict[int, tuple[ProcStat, str]] = {}
        walked: set[str] = set()
        for top in cgroups:
            try:
                subtree = self.fs.walk(top)
            except (CgroupError, OSError):
                continue
            for cg in subtree:
                walked.add(cg)
                try:
                    pids = self.fs.procs(cg)
                except CgroupError:
                    continue
                for pid in pids:
                    st = self.proc.stat(pid)
                    self._stats.proc_reads += 1
                    if st is not None:
                        found[pid] = (st, cg)
        return found, walked

    def load_from_proc(self, cgroups: Iterable[str]) -> int:
        """Track the processes already inside ``cgroups`` (and their subtrees) at start-up,
        linking parent and child where both are known. Returns records added."""
        return self._sync(list(cgroups), mark_gone=False)

    def resync(self, cgroups: Iterable[str] | None = None, mark_incomplete: bool = True) -> int:
        """Re-read the live set of ``cgroups`` after loss (default: every cgroup with records).

        Records whose process is gone become dead (placeholders if they have children), unknown
        live processes get records, and the cgroups are marked incomplete until the next aging
        run: lineage lost with the events cannot be recovered from /proc. Returns records added.
        """
        tops = list(cgroups) if cgroups is not None else self._top_cgroups()
        added = self._sync(tops, mark_gone=True)
        if mark_incomplete:
            self.incomplete.update(tops)
            self.loss_pending = False
        return added

    def _top_cgroups(self) -> list[str]:
        cgs = sorted(self._members)
        tops: list[str] = []
        for cg in cgs:
            if not any(_within(cg, t) for t in tops):
                tops.append(cg)
        return tops

    def _sync(self, tops: list[str], mark_gone: bool) -> int:
        now = self.clock()
        found, walked = self._scan(tops)
        if mark_gone:
            for cg in walked:
                for rec in list(self._members.get(cg, ())):
                    if not rec.alive or rec.flags & FREED:
                        continue
                    hit = found.get(rec.tgid)
                    if hit is not None and procfs.same_process(hit[0], rec.start_ns, IDENTITY_TOLERANCE_NS):
                        rec.threads = hit[0].num_threads
                        if hit[1] != rec.cgroup:
                            self._move(rec, sys.intern(hit[1]))
                        continue
                    if hit is None:
                        # Not listed here: exited, or moved elsewhere.
                        st = self.proc.stat(rec.tgid)
                        if procfs.same_process(st, rec.start_ns, IDENTITY_TOLERANCE_NS):
                            cg2 = self.cgroup_of(rec.tgid)
                            if cg2 is not None and self.in_scope(cg2):
                                self._move(rec, sys.intern(cg2))
                            else:
                                self._detach(rec)
                            continue
                    else:
                        self._stats.pid_reuse += 1
                    self._end(rec, now)
        added = 0
        # Parents start before their children: creating in start order links every pair.
        for st, cg in sorted(found.values(), key=lambda x: x[0].start_ns):
            if st.pid in self._live or not self.in_scope(cg):
                continue
            self._neg.pop(st.pid, None)
            self._from_stat(st, cg, self.proc.cmdline(st.pid))
            added += 1
        return added

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
        forget = True
        if nr > self._last_nr:
            forget = False
        self._last_nr = nr
        pageout = int(vm.get("pageoutrun", 0))
        if pageout != self._last_pageout:
            forget = False
        self._last_pageout = pageout
        stall = sum(int(v) for k, v in vm.items() if k.startswith("allocstall"))
        if stall != self._last_allocstall:
            forget = False
        self._last_allocstall = stall

        self._stats.aging_runs += 1
        self.incomplete.clear()
        # Scope may have changed and pids were recycled: start the negative cache afresh.
        self._neg.clear()
        forgotten = 0
        if forget:
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
        for table in (self.deep_fork_ns, self.wide_fork_ns):
            for cg in [cg for cg in table if cg not in self._members]:
                del table[cg]
        return forgotten

    def _all_roots(self) -> list[Record]:
        return [r for s in self._members.values() for r in s if r.parent is None]

    # -- queries -----------------------------------------------------------------------------
    def get(self, tgid: int) -> Record | None:
        """The live record of ``tgid``, if tracked."""
        return self._live.get(tgid)

    def records_in(self, cgroup: str, subtree: bool = True) -> Iterator[Record]:
        """Records (live and placeholders) whose cgroup is ``cgroup`` or, with ``subtree``, below it."""
        for cg, recs in list(self._members.items()):
            if _within(cg, cgroup, subtree):
                yield from list(recs)

    def forest(self, cgroup: str, subtree: bool = True) -> tuple[set[Record], list[Record]]:
        """The cgroup's records and their roots (records whose parent is untracked or outside
        the cgroup), oldest root first."""
        members = set(self.records_in(cgroup, subtree))
        return members, sorted((r for r in members if r.parent not in members), key=lambda r: r.start_ns)

    def roots(self, cgroup: str, subtree: bool = True) -> list[Record]:
        return self.forest(cgroup, subtree)[1]

    def is_incomplete(self, cgroup: str) -> bool:
        """True if a resync since the last aging run touched the cgroup, its subtree or an
        ancestor: lineage lost with the events is missing there."""
        return any(_within(cgroup, c) or _within(c, cgroup) for c in self.incomplete)

    def live_members(self, record: Record) -> list[tuple[int, int]]:
        """Identities of the live processes of ``record``'s subtree, the record itself included."""
        return [r.identity for r in walk(record) if r.alive]

    def take_activity(self) -> set[str]:
        """Cgroups whose processes forked since the last call."""
        touched, self._touched = self._touched, set()
        return touched

    def deep_forks_since(self, cgroup: str, subtree: bool = True) -> int | None:
        """When a fork in the cgroup (subtree) last reached ``hot_clone_depth`` clone
        generations, or None if none did while its records were kept."""
        ts = [t for cg, t in self.deep_fork_ns.items() if _within(cg, cgroup, subtree)]
        return max(ts) if ts else None

    def wide_forks_since(self, cgroup: str, subtree: bool = True) -> int | None:
        """When a fork in the cgroup (subtree) last reached ``wide_clone_depth`` clone generations."""
        ts = [t for cg, t in self.wide_fork_ns.items() if _within(cg, cgroup, subtree)]
        return max(ts) if ts else None

    def count_in(self, cgroup: str, subtree: bool = True) -> int:
        """Records (live and placeholders) kept for the cgroup (subtree), without walking them."""
        return sum(len(m) for cg, m in self._members.items() if _within(cg, cgroup, subtree))

    def describe(self, rec: Record) -> tuple[str | None, str | None]:
        """(comm, cmdline), read from /proc once if the record exec'd and was not read yet.

        A record that never exec'd runs its parent's image, so it takes its parent's answer.
        """
        if not rec.flags & STALE:
            return rec.comm, rec.cmdline
        # Clone chains of a bomb run thousands of generations deep: walk up, not recurse.
        chain = [rec]
        top = rec
        while top.flags & STALE and top.exec_ns is None and top.parent is not None:
            top = top.parent
            chain.append(top)
        if top.flags & STALE:
            if top.alive:
                st = self.proc.stat(top.tgid)
                if procfs.same_process(st, top.start_ns, IDENTITY_TOLERANCE_NS):
                    top.comm = st.comm
                    top.cmdline = self._intern_cmdline(self.proc.cmdline(top.tgid))
            top.flags &= ~STALE
        for r in chain:
            r.comm, r.cmdline = top.comm, top.cmdline
            r.flags &= ~STALE
        return rec.comm, rec.cmdline

    @property
    def stats(self) -> TreeStats:
        s = self._stats
        s.records = self._nrec
        s.live = len(self._live)
        s.placeholders = self._nrec - s.live
        s.negative_cache = len(self._neg)
        s.incomplete = tuple(sorted(self.incomplete))
        return s

    def stats_dict(self) -> dict:
        return self.stats.as_dict()


# -- walks and the seed's score (pure) -----------------------------------------------------
def _within(cg: str, top: str, subtree: bool = True) -> bool:
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


def postorder(roots: Iterable[Record], within: set[Record] | None = None) -> Iterator[Record]:
    """Children before parents (the seed's scan order), optionally restricted to ``within``."""
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
                if within is None or c in within:
                    stack.append((c, False))
                c = c.next_sib


def seed_scores(
    roots: Iterable[Record], within: set[Record] | None, badness: Callable[[int], int] | None
) -> dict[Record, tuple[int, int]]:
    """The seed killer's (score, family) per record: score = own OOM badness (0 for a
    placeholder) + children's scores + 1 per live child; family = live processes under it."""
    out: dict[Record, tuple[int, int]] = {}
    for r in postorder(roots, within):
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
