"""The detectors run on what the loop's sources brought in: a watched cgroup's sample against the
budget rules (:data:`cgguard.detect.cgroup.RULES`), and the lineage detector on the cgroups a
proc-connector drain touched. A verdict goes to ``on_verdict`` (:meth:`.acting.Acting.on_verdict`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from cgguard.config import Config
from cgguard.detect import Verdict
from cgguard.detect.cgroup import RULES, holds_most
from cgguard.state.lineage_walk import within
from cgguard.state.watch import Node, Watcher

from .tracking import Tracking


class Detection:
    def __init__(
        self, cfg: Config, watcher: Watcher, tracking: Tracking | None, *,
        adopt: Callable[[Node, int], None], on_verdict: Callable[[Node, Verdict], None],
    ):
        self.cfg, self.watcher, self.tracking = cfg, watcher, tracking
        self._adopt = adopt  # more tasks sampled than the tree knows: take them in
        self._on_verdict = on_verdict

    def sample(self, node: Node, now: int) -> None:
        """Sample a watched cgroup and judge it by the budget rules."""
        if node.busy or not node.watched or node.history is None:
            return
        tr = self.tracking
        s = self.watcher.sample(node, now, births=tr.births if tr else None)
        if tr is not None and s.tasks > tr.tasks(node.rel) + max(4, s.tasks // 10):
            # More tasks than the tree knows: processes moved in after their fork, or missed.
            self._adopt(node, now)
        if node.frozen:
            return  # frozen (for lack of budget, or by an operator): it cannot grow; nothing to judge
        for rule in RULES:
            verdict = rule(node.rel, node.history, now, self._params(rule.__name__))
            if verdict is not None and (verdict.evidence != "budget" or self._holds_most(node, s.source)):
                self._on_verdict(node, verdict)
                return

    def lineage(self, nodes: Iterable[Node], now: int, horizon: int) -> None:
        """Judge the watched cgroups a drain touched by their lineage; ``horizon``: the start of
        the abandonment window."""
        tr = self.tracking
        assert tr is not None
        # No abandonment anywhere within the window: no cgroup can qualify (what qualifies()
        # would find, without a pass over the tree's cgroups per touched cgroup).
        if tr.tree.last_abandon_ns < horizon:
            return
        for node in nodes:
            if not node.busy and not node.frozen and tr.qualifies(node.rel, now):
                verdict = tr.evaluate(node.rel, now)
                if verdict is not None:
                    self._on_verdict(node, verdict)

    def _holds_most(self, node: Node, source: str) -> bool:
        """Among the watched cgroups charged to the same kernel limit (a pod's containers), is this
        the one holding the most of it? Nested cgroups are left to narrowing."""
        if source == "default":
            return True
        peers = []
        for other in self.watcher.watched():
            if other is node or other.budget is None or within(other.rel, node.rel) or within(node.rel, other.rel):
                continue
            if any(g.name == source for g in other.budget.groups):
                peers.append(other.last_tasks)
        return holds_most(node.last_tasks, peers)

    def _params(self, rule: str) -> Any:
        d = self.cfg.detect
        return {"pinned": d.pinned, "fill_hold": d.fill_hold, "trajectory": d.trajectory}[rule]
