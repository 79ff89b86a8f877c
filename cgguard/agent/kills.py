"""Whole-cgroup kills done on the loop: ``cgroup.kill`` returns at once, and the kill's end is the
``populated 0`` that the watcher's inotify watch on ``cgroup.events`` already delivers, so no
thread needs to wait for it. Without that watch (degraded) the loop polls; a cgroup still
populated at each deadline is killed again, up to :data:`KILL_ATTEMPTS` times in all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cgguard.act import SWEEP_AFTER_S, ActionResult, kill_exited_leaders
from cgguard.kernel.cgroupfs import CgroupError, CgroupFS, CgroupGone
from cgguard.kernel.clock import MS
from cgguard.state.watch import Node, Watcher

from .worker import Job

KILL_ATTEMPTS = 3


@dataclass
class PendingKill:
    job: Job
    t0_ns: int
    deadline_ns: int
    tasks_before: int
    attempts: int = 1
    swept: bool = False  # thread groups whose main thread exited were killed by pid


class InlineKills:
    """The kills written and not yet seen to end; each ends in ``finish(job, result)``."""

    def __init__(
        self, fs: CgroupFS, watcher: Watcher, clock: Callable[[], int], remove_timeout_ms: int,
        finish: Callable[[Job, ActionResult], None],
    ):
        self.fs, self.watcher, self.clock = fs, watcher, clock
        self.remove_timeout_ms = remove_timeout_ms
        self._finish = finish
        self._pending: dict[str, PendingKill] = {}

    def write(self, target: Node) -> ActionResult | bool:
        """True once cgroup.kill is written; the result instead if it could not be."""
        try:
            self.fs.kill(target.rel)
            return True
        except CgroupGone:
            return ActionResult("kill-cgroup", "gone", 0.0, 0, target.last_tasks)
        except CgroupError as e:
            return ActionResult("kill-cgroup", "failed", None, None, target.last_tasks, notes=[str(e)])

    def sent(self, target: Node, job: Job, now: int, written: ActionResult | bool) -> None:
        """Wait for the kill's populated 0 through the inotify watch the watcher already has."""
        if isinstance(written, ActionResult):
            self._finish(job, written)
            return
        before = target.last_tasks
        timeout = self.remove_timeout_ms * MS // KILL_ATTEMPTS
        self._pending[target.rel] = PendingKill(job, now, now + timeout, before)
        if target.events_wd is None:  # no inotify watch (degraded): poll in check()
            return
        if not self.fs.populated(target.rel):  # it emptied before the watch could tell
            self._pending.pop(target.rel)
            self._finish(job, ActionResult("kill-cgroup", "removed", (self.clock() - now) / MS, 0, before))

    def emptied(self, node: Node, now: int) -> None:
        """The watch saw ``populated 0``: a kill waiting on it is done."""
        pk = self._pending.pop(node.rel, None)
        if pk is not None:
            self._finish(pk.job, ActionResult("kill-cgroup", "removed", (now - pk.t0_ns) / MS, 0, pk.tasks_before))

    def gone(self, rel: str) -> None:
        """The cgroup vanished: a kill waiting on it is done."""
        pk = self._pending.pop(rel, None)
        if pk is not None:
            self._finish(pk.job, ActionResult("kill-cgroup", "gone", (self.clock() - pk.t0_ns) / MS, 0, pk.tasks_before))

    def check(self, now: int) -> None:
        for rel, pk in list(self._pending.items()):
            node = self.watcher.nodes.get(rel)
            if node is not None and node.events_wd is None and not self.fs.populated(rel):
                del self._pending[rel]
                self._finish(pk.job, ActionResult("kill-cgroup", "removed", (now - pk.t0_ns) / MS, 0, pk.tasks_before))
                continue
            if not pk.swept and now - pk.t0_ns >= SWEEP_AFTER_S * 1e9:
                pk.swept = True
                self._sweep(rel, pk)
            if now < pk.deadline_ns:
                continue
            if pk.attempts < KILL_ATTEMPTS:
                pk.attempts += 1
                pk.deadline_ns = now + self.remove_timeout_ms * MS // KILL_ATTEMPTS
                pk.job.incident.notes.append(f"populated still 1 after attempt {pk.attempts - 1}: killing again")
                try:
                    self.fs.kill(rel)
                except CgroupError:
                    pass
                self._sweep(rel, pk)
                continue
            del self._pending[rel]
            left = node.last_tasks if node else None
            self._finish(pk.job, ActionResult("kill-cgroup", "timeout", (now - pk.t0_ns) / MS, left, pk.tasks_before))

    def _sweep(self, rel: str, pk: PendingKill) -> None:
        """cgroup.kill cannot stop a thread group whose main thread already exited: kill those by
        pid (see act.kill_exited_leaders). Only for a kill still waiting, so normally never."""
        n = kill_exited_leaders(self.fs, rel)
        if n:
            pk.job.incident.notes.append(f"{n} thread groups whose main thread had exited killed by pid")
