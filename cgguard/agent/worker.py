"""The action worker: carries out decisions off the event loop.

A kill waits for ``populated 0`` and a surgical kill freezes, moves and kills; the loop must keep
reading the proc connector meanwhile (a stalled reader overflows it mid-bomb), so actions run
here and report back through a queue and a wake-up of the loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from cgguard import act
from cgguard.config import Action
from cgguard.kernel.cgroupfs import CgroupFS
from cgguard.sinks.incidents import Incident

from .host import raise_thread_priority
from .policy import Decision

log = logging.getLogger("cgguard.agent")


@dataclass
class Job:
    incident: Incident
    target: str  # the cgroup acted on
    decision: Decision
    # From tracking: which frozen processes descend from the bomb's origin, and a barrier that
    # returns once the tree has read every event queued before it was called.
    classify: act.Classify | None = None
    settle: Callable[[], None] | None = None


class ActionWorker:
    def __init__(
        self,
        fs: CgroupFS,
        *,
        remove_timeout_s: float,
        surgical_fallback: Action,
        realtime: bool,
        wake: Callable[[], None],
    ):
        self.fs = fs
        self.remove_timeout_s = remove_timeout_s
        self.surgical_fallback = surgical_fallback
        self.realtime = realtime
        self._wake = wake
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._done: queue.Queue[tuple[Job, act.ActionResult]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="cgguard-act", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def results(self) -> list[tuple[Job, act.ActionResult]]:
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        raise_thread_priority(self.realtime)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                res = self.execute(job)
            except Exception as e:  # an action bug must not kill the agent
                log.exception("action on %s failed", job.target)
                res = act.ActionResult(job.decision.action.value, "failed", notes=[f"internal error: {e!r}"])
            self._done.put((job, res))
            self._wake()

    def execute(self, job: Job) -> act.ActionResult:
        timeout = self.remove_timeout_s
        rel, kind, v = job.target, job.decision.action, job.decision.verdict
        if kind == Action.kill_cgroup:
            return act.kill_cgroup(self.fs, rel, timeout)
        if kind == Action.freeze:
            return act.freeze(self.fs, rel, min(timeout, 2.0))
        if kind == Action.kill_lineage:
            fallback = None
            if self.surgical_fallback == Action.kill_cgroup:
                fallback = lambda r: act.kill_cgroup(self.fs, r, timeout)  # noqa: E731
            return act.kill_lineage(
                self.fs,
                rel,
                v.members or frozenset(),
                timeout,
                fallback=fallback,
                classify=job.classify,
                origin_start_ns=v.origin.start_ns if v.origin else None,
                settle=job.settle,
                # A lineage verdict names the bomb; if none of it is found, the cgroup's other
                # processes are not the bomb. A cgroup-level verdict stands on its own.
                unmatched_fallback=v.detector != "lineage",
            )
        return act.ActionResult(kind.value, "reported")
