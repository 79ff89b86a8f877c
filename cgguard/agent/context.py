"""What the policy is told beside the verdict (:class:`.policy.Context`), gathered on the loop.

Everything here looks and never acts: the configured action and refusals, the kill budget, the
worst lineage in the cgroup, which allow rule matches the verdict's origin (read from a live copy
when the origin is gone), and whether a family is all there is in its cgroup.
"""

from __future__ import annotations

import os
from typing import Any

from cgguard.act import bomb_members
from cgguard.config import Action, Config
from cgguard.detect import Verdict
from cgguard.kernel.cgroupfs import CgroupError, CgroupFS
from cgguard.kernel.procfs import read_stat
from cgguard.state.watch import Node, Watcher

from . import policy
from .tracking import Tracking


def own_or_ancestor(rel: str, own: str) -> bool:
    """Is ``rel`` the agent's own cgroup (``own``), an ancestor of it, or the root?"""
    return rel == own or own.startswith(rel + "/") or rel == ""


class ContextBuilder:
    def __init__(
        self, cfg: Config, fs: CgroupFS, watcher: Watcher, tracking: Tracking | None,
        kill_budgets: policy.Budgets, own_cgroup: str,
    ):
        self.cfg, self.fs, self.watcher, self.tracking = cfg, fs, watcher, tracking
        self.kill_budgets, self.own_cgroup = kill_budgets, own_cgroup

    def refusal(self, rel: str) -> str | None:
        """Why cgguard must not act on this cgroup, or None."""
        if not rel:
            return "the cgroup2 root"
        if own_or_ancestor(rel, self.own_cgroup):
            return "cgguard's own cgroup or an ancestor of it"
        node = self.watcher.nodes.get(rel)
        if node is None or not node.watched:
            return "outside the watch globs"
        return self.cfg.refusal(rel)

    def tenant(self, rel: str, wl: dict[str, Any] | None) -> str:
        return policy.tenant_key(rel, wl, self._top_watched(rel))

    def _top_watched(self, rel: str) -> str:
        top, cur = rel, rel
        while cur:
            cur = cur.rsplit("/", 1)[0] if "/" in cur else ""
            n = self.watcher.nodes.get(cur)
            if n is not None and n.watched:
                top = cur
        return top

    def build(self, target: Node, verdict: Verdict, tenant: str, escalate: str | None) -> policy.Context:
        configured = self.cfg.action_for(target.rel)
        tr = self.tracking
        wants_lineage = configured in (Action.auto, Action.kill_lineage) and not verdict.members
        worst = tr.whole(tr.worst_lineage(target.rel)) if wants_lineage and tr else None
        allowed, relaxed = self._allow(target.rel, verdict if verdict.origin else (worst or verdict))
        family = verdict if verdict.members else worst
        kb = self.cfg.kill_budget
        return policy.Context(
            configured=configured,
            refusal=self.refusal(target.rel),
            dry_run=self.cfg.dry_run,
            exhausted=self.kill_budgets.exhausted(tenant),
            budget_text=f"{kb.max_actions} per {kb.per_seconds:g}s for {tenant}, {kb.node_max_actions} per node",
            worst_lineage=worst,
            escalate=escalate,
            allowed=allowed,
            relaxed=relaxed,
            family_is_whole=family is not None and self._only(target.rel, family),
        )

    def _only(self, rel: str, family: Verdict) -> bool:
        """Does the cgroup hold nothing but this family? A bomb keeps forking while we look, so
        each process is sorted as a surgical kill would sort it (:func:`cgguard.act.bomb_members`):
        known to descend from the origin; or, its fork event still queued, a child of a member
        (members found meanwhile included) or an orphan younger than the origin."""
        if self.tracking is None or family.origin_ref is None:
            return False
        try:
            inside = [p for cg in self.fs.walk(rel) for p in self.fs.procs(cg)]
        except CgroupError:
            return False
        stats = {pid: read_stat(pid) for pid in inside}
        members, _ = bomb_members(inside, frozenset(family.members or ()), self.tracking.member_test(family.origin_ref),
                                  family.origin_ref.start_ns, stats)
        return all(pid in members for pid, st in stats.items() if st is not None)

    def _allow(self, target: str, v: Verdict) -> tuple[str | None, str | None]:
        """(exempting rule, relaxing rule) that match the verdict's origin, if any."""
        if not self.cfg.allow or v.origin is None:
            return None, None
        exe = self.tracking.origin_exe(v.origin_ref) if self.tracking else None
        comm, cmdline, via = v.origin.comm, v.origin.cmdline, ""
        if cmdline is None or exe is None:
            # A fire-and-forget tool's first copy exits milliseconds after its exec, often before
            # its image was read: what it ran is then told by its nearest live copy.
            copy = self._copy_image(v.origin_ref)
            # A copy that runs another program (make's sh) says nothing about the origin.
            if copy is not None and comm in (None, copy[2]):
                pid, c_exe, c_comm, c_cmdline = copy
                exe, comm, cmdline = exe or c_exe, comm or c_comm, cmdline or c_cmdline
                via = f" (matched on its copy {pid}: the origin exited before its image was read)"
        for rule in self.cfg.allow:
            if rule.matches(target, exe, comm, cmdline):
                what = rule.describe() + via
                return (what, None) if rule.mode == "exempt" else (None, what)
        return None, None

    def _copy_image(
        self, origin: Any, visits: int = 4096, reads: int = 8
    ) -> tuple[int, str | None, str | None, str | None] | None:
        """(pid, exe, comm, cmdline) of the shallowest live descendant of ``origin`` whose image
        can be read. Bounded: a bomb's family is large, and a tool's early generations are all
        gone (``visits`` records looked at, ``reads`` of them read from /proc)."""
        if self.tracking is None or origin is None:
            return None
        tree = self.tracking.tree
        level: list[Any] = [origin]
        while level:
            nxt = []
            for rec in level:
                for c in rec.children():
                    visits -= 1
                    if visits < 0:
                        return None
                    nxt.append(c)
                    if not c.alive:
                        continue
                    comm, cmdline = tree.describe(c)
                    reads -= 1
                    if cmdline is not None:
                        try:
                            exe: str | None = os.readlink(f"/proc/{c.tgid}/exe")
                        except OSError:
                            exe = None
                        return c.tgid, exe, comm, cmdline
                    if reads <= 0:
                        return None
            level = nxt
        return None
