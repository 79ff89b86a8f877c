"""From a verdict to an incident with its result, on the loop: which cgroup to act on, the
decision (:func:`.policy.decide` on what :class:`.context.ContextBuilder` gathers), the kill
budget, the incident, the action, and what follows it (cooldowns, escalation when a runaway is
back soon after an action).

A whole-cgroup kill is written here the moment the decision is made (:mod:`.kills`); surgical
kills and freezes, which wait on the kernel in several steps, go to the worker (:mod:`.worker`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from cgguard.act import ActionResult
from cgguard.config import Action, Config
from cgguard.detect import Verdict
from cgguard.kernel.cgroupfs import CgroupFS
from cgguard.kernel.clock import MS, S
from cgguard.sinks.incidents import Incident
from cgguard.state.watch import Node, Watcher

from . import policy
from .context import ContextBuilder
from .kills import InlineKills
from .recording import Recorder, Workloads
from .tracking import Tracking
from .worker import ActionWorker, Job

log = logging.getLogger("cgguard.agent")
ESCALATE_NS = 30 * S  # a runaway back within this after an action gets the whole cgroup removed


class Acting:
    def __init__(
        self, cfg: Config, fs: CgroupFS, watcher: Watcher, tracking: Tracking | None, *, own_cgroup: str,
        worker: ActionWorker, recorder: Recorder, workloads: Workloads, clock: Callable[[], int],
        new_cgroup: Callable[[Node, int], None], settle: Callable[[], None] | None,
    ):
        self.cfg, self.watcher, self.tracking, self.clock = cfg, watcher, tracking, clock
        self.worker, self.recorder, self.workloads = worker, recorder, workloads
        self._new_cgroup = new_cgroup  # a cgroup found late (see _target) is taken in as the loop does
        self._settle = settle  # given with tracking: the surgical kill's wait for the tree
        kb = cfg.kill_budget
        self.kill_budgets = policy.Budgets(kb.max_actions, kb.node_max_actions, kb.per_seconds)
        self.context = ContextBuilder(cfg, fs, watcher, tracking, self.kill_budgets, own_cgroup)
        self.kills = InlineKills(fs, watcher, clock, cfg.remove_timeout_ms, self.finish)
        self._cooldown: dict[str, int] = {}
        # Lineage verdicts set aside by a relaxing allow rule, per target: quiet for a while,
        # without muting the budget rules the rule leaves in charge.
        self._lineage_quiet: dict[str, int] = {}
        self._acted: dict[str, tuple[int, str, str]] = {}  # target -> (when, action, result)

    def forget(self, rel: str) -> None:
        """A watched cgroup vanished: finish a kill waiting on it, and drop what is kept for it."""
        self.kills.gone(rel)
        for table in (self._cooldown, self._lineage_quiet, self._acted):
            table.pop(rel, None)

    def on_verdict(self, node: Node, verdict: Verdict) -> None:
        now = self.clock()
        if self.tracking is not None:
            verdict = self.tracking.whole(verdict)  # type: ignore[assignment]
        target = self._target(node, verdict)
        if target.busy or self._cooldown.get(target.rel, 0) > now:
            return
        if self._descendant_busy(target):
            # A runaway below is being removed: what this cgroup saw grow is that one's, and is
            # judged again on fresh samples once the action ends (see finish()).
            return
        if verdict.evidence == "lineage" and self._lineage_quiet.get(target.rel, 0) > now:
            return
        wl = self.workloads.get(target.rel)
        tenant = self.context.tenant(target.rel, wl)
        ctx = self.context.build(target, verdict, tenant, self._escalation(target.rel, now))
        d = policy.decide(verdict, ctx)
        if d.kills:
            self.kill_budgets.take(tenant)
        inc = self._incident(target, d, tenant, wl)
        # A whole-cgroup kill is written before anything else (logging fsyncs, sinks start hooks):
        # every millisecond before cgroup.kill is a millisecond more of forks.
        killed = self.kills.write(target) if d.action == Action.kill_cgroup else None
        log.warning("runaway in %s (%s, %s): %s -> %s", target.rel, verdict.detector, verdict.evidence, verdict.summary(), d.action.value)
        self.recorder.record(inc, final=False)
        if d.result == "allowed" and ctx.allowed is None:
            # Relaxed, not exempt: only the lineage evidence was set aside. A cooldown of the
            # whole target would also silence the budget rules while the tool runs away.
            self._lineage_quiet[target.rel] = now + 30_000 * MS
        else:
            self._cooldown[target.rel] = now + (1000 if d.acts else 30_000) * MS
        if not d.acts:
            inc.result = d.result or "reported"
            self.recorder.record(inc, final=True, unremoved=d.unremoved)
            return
        target.busy = True
        tr = self.tracking
        v = d.verdict
        job = Job(inc, target.rel, d, classify=tr.member_test(v.origin_ref) if tr else None, settle=self._settle if tr else None)
        if killed is not None:
            self.kills.sent(target, job, now, killed)
        else:
            self.worker.submit(job)

    def _target(self, node: Node, verdict: Verdict) -> Node:
        if verdict.detector == "lineage" and verdict.cgroup:
            found = self.watcher.watched_ancestor(verdict.cgroup)
            if found is None or found.rel != verdict.cgroup and verdict.cgroup not in self.watcher.nodes:
                # A cgroup the watcher does not know (its creation was lost with an inotify
                # overflow, and the rescan has not reached it yet): add it before acting, rather
                # than blame its parent.
                for n in self.watcher.add_path(verdict.cgroup):
                    self._new_cgroup(n, self.clock())
                found = self.watcher.watched_ancestor(verdict.cgroup)
            return found or node
        return self.watcher.narrow(node, verdict.first_sign_ns)

    def _descendant_busy(self, node: Node) -> bool:
        stack = list(node.children.values())
        while stack:
            n = stack.pop()
            if n.busy:
                return True
            stack.extend(n.children.values())
        return False

    def _escalation(self, rel: str, now: int) -> str | None:
        last = self._acted.get(rel)
        if last is None or now - last[0] > ESCALATE_NS:
            return None
        when, action, result = last
        if action == Action.kill_lineage.value or result in ("not-found", "failed", "timeout"):
            return f"the runaway is back {(now - when) / MS:.0f} ms after {action}: {result}"
        return None

    def _incident(self, target: Node, d: policy.Decision, tenant: str, wl: dict[str, Any] | None) -> Incident:
        v = d.verdict
        tasks = v.tasks if target.rel == v.cgroup else (target.last_tasks or v.tasks)
        return Incident(
            cgroup=target.rel,
            action=d.action.value,
            reasons=[r.to_dict() for r in v.reasons],
            tasks_at_detection=tasks,
            detector=v.detector,
            evidence=v.evidence,
            budget=v.budget,
            budget_source=v.budget_source,
            tenant=tenant,
            peak_tasks=max(tasks, target.history.peak if target.history else 0),
            detect_ms=round(max(0, v.at_ns - v.first_sign_ns) / MS, 1),
            dry_run=self.cfg.dry_run,
            origin=v.origin.to_dict() if v.origin else None,
            family=v.family,
            depth=v.depth,
            workload=wl,
            notes=list(d.notes),
        )

    def finish(self, job: Job, res: ActionResult) -> None:
        """An action ended (on the loop or in the worker): the incident gets its result."""
        inc = job.incident
        inc.action = res.action
        inc.result = res.result
        inc.remove_ms = round(res.remove_ms, 1) if res.remove_ms is not None else None
        inc.survivors = res.survivors
        if res.tasks_before is not None:
            inc.peak_tasks = max(inc.peak_tasks or 0, res.tasks_before)
        inc.notes = inc.notes + res.notes
        if res.innocents is not None:
            inc.notes.append(f"{res.innocents} innocent processes left running")
        if res.moved is not None:
            inc.notes.append(f"{res.moved} processes moved to quarantine")
        log.warning("%s %s: %s in %s ms, survivors %s", inc.action, inc.cgroup, inc.result, inc.remove_ms, inc.survivors)
        unremoved = job.decision.unremoved
        if res.result in ("failed", "timeout"):
            unremoved = "failed"
        self.recorder.record(inc, final=True, unremoved=unremoved)
        now = self.clock()
        self._acted[job.target] = (now, res.action, res.result)
        node = self.watcher.nodes.get(job.target)
        if node is not None:
            node.busy = False
            if node.history is not None:
                node.history.clear()
            self.watcher.hint_active(node, now)  # watch what is left closely: a survivor regrows
            # The growth its ancestors and limit peers saw was this runaway's, and is gone with it:
            # judged on that history, a pod or slice would be convicted for its child.
            for other in self.watcher.charged_with(node):
                if not other.busy and other.history is not None:
                    other.history.clear()
        if self.tracking is not None:
            self.tracking.after_action(job.target)
