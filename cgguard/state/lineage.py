"""The lineage tree: one record per process in the watched cgroups, fed by proc-connector events.

This is the 2011 mm_record tracker (see ../shared/seed) rebuilt in userspace. :class:`LineageTree`
is the event sink and keeps the tree's shape; the rest lives beside it:

* :mod:`~cgguard.state.lineage_record` -- the record of a process (placeholders, the ``(tgid,
  start_ns)`` identity) and the per-cgroup counters (tasks, births, abandonments);
* :mod:`~cgguard.state.lineage_store` -- the records and the cgroup index, and the queries;
* :mod:`~cgguard.state.lineage_proc` -- the /proc reads: placing a process first met, the
  negative families of processes outside the watched cgroups, and what a process runs;
* :mod:`~cgguard.state.lineage_aging` -- the seed's ``reset_mm_tracking`` (:meth:`LineageTree.age`);
* :mod:`~cgguard.state.lineage_walk` -- walks and the seed killer's score;
* :mod:`~cgguard.state.lineage_scan` -- loading and resyncing from /proc.

The agent hears every fork, exec and exit on the host, so the cost per event is the agent's cost
on a busy node. The event handlers therefore read nothing from /proc except once for a parent
never seen before; a child inherits its parent's cgroup; what a process runs (comm, command line)
is read only for records that fork after an exec -- the ones that can be the origin of a family
-- in a batch after each burst of events (:meth:`LineageTree.flush`), under a rate budget. Events
of processes outside the watched cgroups cost two dictionary operations (the *negative
families*), and are re-checked every ``RESIGHT_EVERY`` forks so that a process moved into a
watched cgroup after its fork is found.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping

from cgguard.kernel.cgroupns import own_cgroup
from cgguard.kernel.clock import S
from cgguard.state import lineage_aging, lineage_proc
from cgguard.state.lineage_aging import CalmCheck, nr_processes, read_vmstat
from cgguard.state.lineage_proc import RESIGHT_EVERY, Family, ProcFS, resight, sight_parent
from cgguard.state.lineage_record import FORGOTTEN, FREED, FROM_PROC, IDENTITY_TOLERANCE_NS, IMAGE_QUEUED, STALE, Record
from cgguard.state.lineage_store import RecordStore, TreeStats

ABANDON_WALK = 16  # ancestors looked at to find how many abandoning generations led here


class LineageTree(RecordStore):
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
        super().__init__()
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
        self._neg: dict[int, Family] = {}
        self._images: list[Record] = []  # records whose image flush() reads
        self._tokens = float(image_reads_per_s)
        self._tokens_ts = 0
        self._calm = CalmCheck()
        self.loss_pending = False
        # Newest abandonment anywhere: lets the agent skip the lineage check after a burst of
        # events when nothing abandoned within the window.
        self.last_abandon_ns = -(1 << 62)

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
                    if fam.forks >= RESIGHT_EVERY and resight(self, child_tgid, fam):
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
                    if fam.forks < RESIGHT_EVERY or not resight(self, parent_tgid, fam):
                        return
                    self._neg.pop(child_tgid, None)
                    parent = live.get(parent_tgid)
                else:
                    del self._neg[parent_tgid]
            if parent is None:
                if not self.tracking_enabled:
                    return
                parent = sight_parent(self, parent_tgid, child_tgid, ts_ns)
                if parent is None:
                    return
        if not self.tracking_enabled:
            return  # the seed's knob: no new records; existing ones still age and exit
        rec = Record(child_tgid, ts_ns, parent, parent.cg)  # linked as the parent's newest child
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
            self._neg[tgid] = Family(first=True)

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

    def _free(self, rec: Record, move_to: Record | None = None) -> None:
        """Free a childless non-live record and every ancestor placeholder left childless.

        The seed's scan mode frees only the record itself and relies on its post-order walk to
        reach the parent next; freeing the emptied placeholders here keeps the invariant that
        every placeholder has children, whatever order callers free in.

        With ``move_to``, ``rec`` (and its subtree) is moved under that record instead of being
        freed (:meth:`_relink`). The unlinking is shared rather than a method of its own: it is
        on the exit path, which must not pay one call more per event.
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
            if move_to is not None:
                self._graft(rec, p, move_to)
                move_to = None
            else:
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
        """Move ``rec`` under ``parent``, its true parent, freeing the placeholder it leaves
        childless."""
        self._free(rec, move_to=parent)

    @staticmethod
    def _graft(rec: Record, old: Record | None, parent: Record) -> None:
        """Make ``rec``, already unlinked from ``old``, the newest child of ``parent``."""
        if old is not None:
            old.nforks -= 1
            old.nlive -= 1 if rec.alive else 0
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

    def move(self, rec: Record, cgroup: str) -> None:
        cg = rec.cg
        cg.members.discard(rec)
        cg.tasks -= rec.threads if rec.alive else 0
        new = self.cgstat(cgroup)
        rec.cg = new
        new.members.add(rec)
        new.tasks += rec.threads if rec.alive else 0

    # -- after each burst of events ----------------------------------------------------------
    def flush(self) -> None:
        """Read the images queued by the last burst, under the rate budget (``lineage_proc``)."""
        lineage_proc.flush_images(self)

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
        return lineage_aging.age(self, now, nr, vm)

    # -- queries that need the event state or /proc ---------------------------------------------
    def describe(self, rec: Record) -> tuple[str | None, str | None]:
        """(comm, cmdline) of what ``rec`` runs, read from /proc if it was not yet (a clone takes
        its parent's; see :func:`~cgguard.state.lineage_proc.describe`)."""
        return lineage_proc.describe(self, rec)

    @property
    def stats(self) -> TreeStats:
        s = self._stats
        s.records = self._nrec
        s.live = len(self._live)
        s.placeholders = self._nrec - s.live
        s.negative_cache = len(self._neg)
        s.incomplete = tuple(sorted(self.incomplete))
        return s

