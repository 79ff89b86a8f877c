"""Policy: from a verdict and what the agent knows to the action it takes. Pure, no I/O.

The loop asks :func:`decide` once per verdict. Everything the decision rests on comes in as
plain values (:class:`Context`), so the rules below are tested without threads, root or cgroups,
and every refusal, downgrade or escalation is written into the incident's notes.

Fail safe, never fail open:

* A kill budget is per tenant (a pod, a user, a service, a delegated cgroup tree) and per node.
  One tenant's bombs never spend another's. Past either budget the runaway is *frozen* --
  it stops growing and stays for an operator -- and reported; it is never left running.
* When the lineage behind a verdict is only partly known (the agent started after the family,
  or events were lost), ``auto`` spares nothing as "not the bomb": the whole cgroup is removed.
  An explicit ``kill-lineage`` stays surgical (the operator chose it for a shared cgroup); the
  surgical kill then takes processes of unknown ancestry younger than the origin as the bomb's.
* When an earlier action on the same cgroup did not end the runaway (a surgical kill that missed
  members, a lineage not found), the next one removes the whole cgroup.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from cgguard.config import Action
from cgguard.detect import Verdict


class KillBudget:
    """At most ``max_actions`` per sliding window."""

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

    def take(self) -> None:
        self.times.append(self.clock())

    def idle(self) -> bool:
        self._expire(self.clock())
        return not self.times


class Budgets:
    """Kill budgets by tenant, plus one for the node."""

    def __init__(self, per_tenant: int, node: int, per_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.per_tenant, self.per_seconds, self.clock = per_tenant, per_seconds, clock
        self.node = KillBudget(node, per_seconds, clock)
        self.tenants: dict[str, KillBudget] = {}

    def tenant(self, key: str) -> KillBudget:
        b = self.tenants.get(key)
        if b is None:
            if len(self.tenants) > 4096:  # tenants come and go: keep only those with recent kills
                self.tenants = {k: v for k, v in self.tenants.items() if not v.idle()}
            b = self.tenants[key] = KillBudget(self.per_tenant, self.per_seconds, self.clock)
        return b

    def exhausted(self, key: str) -> str | None:
        """Which budget is spent ("tenant" or "node"), or None."""
        if not self.tenant(key).available():
            return "tenant"
        if not self.node.available():
            return "node"
        return None

    def take(self, key: str) -> None:
        self.tenant(key).take()
        self.node.take()


def tenant_key(rel: str, wl: dict[str, Any] | None, top: str) -> str:
    """Whose kill budget an action on ``rel`` spends: a pod, a user, a container or unit, else the
    delegated tree it sits in (the highest watched cgroup above it), so that a tenant who can
    create cgroups cannot multiply its budget by making many."""
    wl = wl or {}
    kind = wl.get("kind")
    if kind == "pod" and wl.get("pod_uid"):
        return f"pod:{wl['pod_uid']}"
    if kind in ("session", "user-service") and wl.get("uid") is not None:
        return f"uid:{wl['uid']}"
    if kind in ("container", "machine", "service", "scope", "unit") and wl.get("base"):
        return f"{kind}:{wl['base']}"
    return f"cgroup:{top}"


@dataclass(frozen=True, slots=True)
class Context:
    """What the agent knows about the target when a verdict arrives."""

    configured: Action  # the action configured for the target (rules, then the default)
    refusal: str | None = None  # why cgguard must not act on the target at all
    dry_run: bool = False
    exhausted: str | None = None  # "tenant" or "node" when a kill budget is spent
    budget_text: str = ""  # "5 per 60s for pod ...", for the note
    # The worst-scoring lineage of the target, when tracking knows one (for a surgical kill of
    # a cgroup-level verdict in a shared cgroup).
    worst_lineage: Verdict | None = None
    escalate: str | None = None  # why an earlier action on this cgroup did not end the runaway
    allowed: str | None = None  # an allow rule that exempts this origin
    relaxed: str | None = None  # an allow rule under which lineage evidence alone does not decide
    # The target holds nothing but the verdict's family (as far as the tree and cgroup.procs
    # tell): the atomic whole-cgroup kill is then the surgical one.
    family_is_whole: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action  # never auto
    verdict: Verdict  # possibly enriched with the lineage to remove
    notes: tuple[str, ...] = field(default_factory=tuple)
    # For an action that leaves the runaway running (report, or a freeze for lack of budget):
    # why, as counted in cgguard_incidents_not_removed_total.
    unremoved: str | None = None
    result: str | None = None  # the result when no action runs: reported, refused, allowed

    @property
    def acts(self) -> bool:
        return self.action != Action.report

    @property
    def kills(self) -> bool:
        return self.action in (Action.kill_cgroup, Action.kill_lineage)


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
        complete=lin.complete,
    )


def _report(v: Verdict, note: str, unremoved: str, result: str) -> Decision:
    return Decision(Action.report, v, (note,), unremoved=unremoved, result=result)


def decide(verdict: Verdict, ctx: Context) -> Decision:
    if ctx.refusal:
        return _report(verdict, f"not acting: {ctx.refusal}", "protected", "refused")
    if ctx.allowed:
        return _report(verdict, f"allowed by {ctx.allowed}: not acting", "allowed", "allowed")
    if ctx.relaxed and verdict.evidence == "lineage":
        return _report(
            verdict, f"allowed by {ctx.relaxed}: lineage alone does not decide here (budget rules still apply)", "allowed", "allowed"
        )
    if ctx.dry_run:
        return _report(verdict, "dry run: reporting only", "dry-run", "reported")
    action = ctx.configured
    if action == Action.report:
        return _report(verdict, "action is report: reporting only", "report-only", "reported")
    if ctx.exhausted and action != Action.freeze:
        who = "this tenant's" if ctx.exhausted == "tenant" else "the node's"
        return Decision(
            Action.freeze,
            verdict,
            (f"{who} kill budget is spent ({ctx.budget_text}): frozen instead, so it cannot grow; thaw or kill it by hand",),
            unremoved="budget",
        )
    if action == Action.freeze:
        return Decision(Action.freeze, verdict, ("action is freeze: frozen for inspection, not removed",), unremoved="report-only")
    notes: list[str] = []
    if ctx.escalate and action in (Action.auto, Action.kill_lineage):
        return Decision(Action.kill_cgroup, verdict, (f"{ctx.escalate}: removing the whole cgroup",))
    lin = ctx.worst_lineage
    if action == Action.auto and not verdict.members and lin is not None:
        # A cgroup-level verdict in a cgroup that may be shared: if one lineage, known whole,
        # holds most of the tasks, remove it surgically and spare the rest.
        if not lin.complete:
            notes.append("lineage only partly known (started before the agent, or events lost): removing the whole cgroup")
        elif lin.family is not None and lin.family * 2 >= max(verdict.tasks, 1):
            verdict = with_lineage(verdict, lin)
            notes.append(f"one lineage holds {lin.family} of {verdict.tasks} tasks: removing it surgically")
    if action == Action.auto:
        if verdict.members and not verdict.complete:
            notes.append("lineage only partly known: removing the whole cgroup rather than guess its members")
            action = Action.kill_cgroup
        else:
            action = Action.kill_lineage if verdict.members else Action.kill_cgroup
    if action == Action.kill_lineage and not verdict.members:
        if lin is None or not lin.complete:
            notes.append("no lineage known whole for this cgroup: killing the cgroup")
            action = Action.kill_cgroup
        else:
            verdict = with_lineage(verdict, lin)
    if action == Action.kill_lineage and ctx.family_is_whole and ctx.configured == Action.auto:
        notes.append("the family is the whole cgroup: killing the cgroup")
        action = Action.kill_cgroup
    return Decision(action, verdict, tuple(notes))
