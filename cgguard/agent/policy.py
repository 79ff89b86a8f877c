"""Policy: from a verdict and what the agent knows to the action it takes. Pure, no I/O.

The loop asks :func:`decide` once per verdict. Everything the decision rests on comes in as
plain values (:class:`Context`), so the rules below are tested without threads, root or cgroups,
and every refusal or downgrade is written into the incident's notes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

from cgguard.config import Action
from cgguard.detect import Verdict


class KillBudget:
    """At most ``max_actions`` per sliding window: a detector gone wrong cannot empty a node."""

    def __init__(self, max_actions: int, per_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.max_actions = max_actions
        self.per_seconds = per_seconds
        self.clock = clock
        self.times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self.times and self.times[0] <= now - self.per_seconds:
            self.times.popleft()

    def available(self) -> bool:
        self._expire(self.clock())
        return len(self.times) < self.max_actions

    def take(self) -> bool:
        now = self.clock()
        self._expire(now)
        if len(self.times) >= self.max_actions:
            return False
        self.times.append(now)
        return True


@dataclass(frozen=True, slots=True)
class Context:
    """What the agent knows about the target when a verdict arrives."""

    configured: Action  # the action configured for the target (rules, then the default)
    refusal: str | None = None  # why cgguard must not act on the target at all
    dry_run: bool = False
    budget_left: bool = True
    budget_text: str = ""  # "5 per 60s", for the note when it is exhausted
    # The worst-scoring lineage of the target, when tracking knows one (for a surgical kill of
    # a cgroup-level verdict in a shared cgroup).
    worst_lineage: Verdict | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action  # never auto
    verdict: Verdict  # possibly enriched with the lineage to remove
    notes: tuple[str, ...] = field(default_factory=tuple)
    refused: bool = False  # reported because acting is not allowed here (not a dry run or budget)

    @property
    def acts(self) -> bool:
        return self.action != Action.report


def with_lineage(v: Verdict, lin: Verdict) -> Verdict:
    """A cgroup-level verdict enriched with the lineage that holds the tasks (for a surgical kill)."""
    return replace(
        v,
        reasons=v.reasons + lin.reasons,
        origin=lin.origin,
        members=lin.members,
        family=lin.family,
        depth=lin.depth,
        origin_ref=lin.origin_ref,
    )


def decide(verdict: Verdict, ctx: Context) -> Decision:
    if ctx.refusal:
        return Decision(Action.report, verdict, (f"not acting: {ctx.refusal}",), refused=True)
    if ctx.dry_run:
        return Decision(Action.report, verdict, ("dry run: reporting only",))
    action = ctx.configured
    if action != Action.report and not ctx.budget_left:
        return Decision(Action.report, verdict, (f"kill budget exhausted ({ctx.budget_text}): reporting only",))
    notes: list[str] = []
    lin = ctx.worst_lineage
    if action == Action.auto and not verdict.members and lin is not None:
        # A cgroup-level verdict (growth, pids.max) in a cgroup that may be shared: if one
        # lineage holds most of the tasks, remove it surgically and spare the rest.
        if lin.family is not None and lin.family * 2 >= max(verdict.tasks, 1):
            verdict = with_lineage(verdict, lin)
            notes.append(f"one lineage holds {lin.family} of {verdict.tasks} tasks: removing it surgically")
    if action == Action.auto:
        action = Action.kill_lineage if verdict.members else Action.kill_cgroup
    if action == Action.kill_lineage and not verdict.members:
        if lin is None:
            notes.append("no lineage known for this cgroup: killing the cgroup")
            action = Action.kill_cgroup
        else:
            verdict = with_lineage(verdict, lin)
    return Decision(action, verdict, tuple(notes))
