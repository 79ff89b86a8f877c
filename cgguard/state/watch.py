"""State: the watched cgroups' samples -- when each is read, and what its budget says.

Task counts cannot be watched (``pids.current`` raises no event), so they are sampled: fast
(``fast_interval_ms``) while a cgroup grows, has fork activity or holds more than half its
budget, slow when calm, and more rarely still when the proc connector would wake it on a fork.
Without ``pids.current`` (hybrid hosts) the count is the number of TIDs in ``cgroup.threads``
across the subtree. An empty cgroup whose ``cgroup.events`` says so is parked until populated.

Files are read through a bounded :class:`~cgguard.kernel.files.FileCache`. Which cgroups there are
is :class:`~cgguard.state.watch_tree.CgroupTree`'s, kept current through inotify.
"""

from __future__ import annotations

import heapq
import os
import zlib
from typing import Callable

from cgguard.config import Sampling
from cgguard.kernel.cgroupfs import CgroupFS
from cgguard.kernel.clock import MS, now_ns
from cgguard.kernel.files import FileCache
from cgguard.state.budget import Budget, Budgets, LimitGroup
from cgguard.state.samples import History, Sample
from cgguard.state.watch_tree import CgroupTree, Node

CALM_GRID_NS = 250 * MS
# Above this share of its budget a cgroup is sampled fast whatever else it does: that is where
# the trajectory and pinned detectors decide, and where a stall would cost the most.
PRESSURE_FAST = 0.5
V1_RETRY_NS = 200 * MS
PARKED = 1 << 62  # due time of an empty cgroup: sampled again when it is populated


class Watcher(CgroupTree):
    """The cgroup tree, with each watched cgroup's samples on a schedule and its budget."""

    def __init__(
        self,
        fs: CgroupFS,
        watch: list[str],
        protect: list[str],
        sampling: Sampling,
        budgets: Budgets,
        files: FileCache,
        clock: Callable[[], int] = now_ns,
        exclude: Callable[[str], bool] | None = None,
        on_removed: Callable[[Node], None] | None = None,
    ):
        super().__init__(fs, watch, protect, files, exclude, on_removed)
        self.sampling = sampling
        self.budgets = budgets
        self.clock = clock
        self._heap: list[tuple[int, int, Node]] = []
        self._seq = 0
        self.samples_taken = 0
        # Set by the agent when fork events (proc connector) wake cgroups: only then may calm
        # cgroups back off beyond slow_interval_ms.
        self.backoff = False

    def _watching(self, node: Node) -> None:
        node.history = History()
        # First samples of a freshly started agent are spread over one calm interval rather
        # than all due at once (10,000 cgroups would stall the loop for a moment).
        now = self.clock()
        spread = self.sampling.slow_interval_ms * MS if self.ready else CALM_GRID_NS * 4
        self._schedule_at(node, now + zlib.crc32(node.rel.encode()) % max(spread, 1), self.sampling.slow_interval_ms * MS)

    # -- budgets ---------------------------------------------------------------------------
    def budget_of(self, node: Node, now: int, tasks: int = 0) -> Budget:
        """The cgroup's budget, resolved again when stale, and soon after it first holds tasks on
        a hybrid host (its v1 group is found through one of its processes)."""
        b = node.budget
        # On a hybrid host a runtime moves a process into its v1 pids group and into its cgroup2
        # cgroup one after the other, in either order: while no limit is found, look again as
        # long as the cgroup is active or holds more tasks than when last looked. A bomb that
        # filled its v1 cap between two samples sits flat there, never "active" again.
        v1_pending = (
            tasks > 0 and b is not None and self.budgets.v1_root is not None
            and not any(g.kind == "v1" for g in b.groups) and now - b.resolved_ns >= V1_RETRY_NS
            and (now < node.active_until_ns or not b.v1_pid or tasks > b.tasks)
        )
        if b is None or self.budgets.stale(b, now) or v1_pending:
            if b is not None:
                self._unlink_groups(node, b)
            b = node.budget = self.budgets.resolve(node.rel, now)
            b.tasks = tasks
            self._link_groups(node, b)
        return b

    def limit_groups(self) -> list[LimitGroup]:
        seen: dict[int, LimitGroup] = {}
        for n in self.nodes.values():
            for g in n.budget.groups if n.budget else ():
                seen[id(g)] = g
        return list(seen.values())

    # -- sampling --------------------------------------------------------------------------
    def _schedule(self, node: Node, now: int, interval_ns: int) -> None:
        due = now + interval_ns
        if interval_ns >= self.sampling.slow_interval_ms * MS:
            # Calm cgroups share a coarse grid, so 1,000 of them cost a few wake-ups a second
            # instead of a thousand; a calm count a few hundred ms late changes nothing.
            due = -(-due // CALM_GRID_NS) * CALM_GRID_NS
        self._schedule_at(node, due, interval_ns)

    def _schedule_at(self, node: Node, due: int, interval_ns: int) -> None:
        node.interval_ns = interval_ns
        node.due_ns = due
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, node))

    def next_due_ns(self) -> int | None:
        while self._heap:
            due, _, node = self._heap[0]
            if self.nodes.get(node.rel) is not node or node.due_ns != due:
                heapq.heappop(self._heap)  # stale entry
                continue
            return due
        return None

    def due(self, now: int, limit: int | None = None) -> list[Node]:
        """Cgroups whose sample is due, earliest first; at most ``limit`` (the rest stay due)."""
        out: list[Node] = []
        while self._heap and self._heap[0][0] <= now and (limit is None or len(out) < limit):
            due, _, node = heapq.heappop(self._heap)
            if self.nodes.get(node.rel) is node and node.due_ns == due:
                out.append(node)
        return out

    def hint_active(self, node: Node, now: int) -> None:
        """Fork activity seen in this cgroup (proc connector, events): sample it fast for a while.

        The first sample is taken at once: a bomb's early, small counts are what make its
        doublings visible, and 20 ms later a bash bomb may already hold hundreds of tasks.
        """
        node.active_until_ns = max(node.active_until_ns, now + self.sampling.calm_after_ms * MS)
        fast = self.sampling.fast_interval_ms * MS
        last = node.history.last if node.history is not None else None
        due = now if last is None or now - last.t_ns >= fast else last.t_ns + fast
        if node.due_ns > due:
            self._schedule_at(node, due, fast)

    def count(self, node: Node) -> int:
        if node.source == "pids.current":
            try:
                return int(self.files.read(os.path.join(self.fs.abspath(node.rel), "pids.current")) or b"0")
            except (OSError, ValueError):
                return 0
        total = 0
        stack = [node]
        while stack:
            n = stack.pop()
            if n is not node and not n.populated and n.events_wd is not None:
                # Its cgroup.events watch says populated 0: no thread in it or below it. A watched
                # parent of 10,000 mostly empty cgroups reads the few that hold tasks.
                continue
            stack.extend(n.children.values())
            if n.source != "cgroup.threads":
                continue
            try:
                # Calm cgroups are read through a kept-open file only while the budget allows;
                # counting newlines avoids building a list of TIDs per sample.
                total += self.files.read(os.path.join(self.fs.abspath(n.rel), "cgroup.threads")).count(b"\n")
            except OSError:
                pass
        return total

    def sample(self, node: Node, now: int | None = None, births: Callable[[str], int | None] | None = None) -> Sample:
        """Read the cgroup's tasks and its budget's pressure now, record them, and set its next
        sampling time."""
        now = self.clock() if now is None else now
        tasks = self.count(node)
        b = self.budget_of(node, now, tasks)
        p = self.budgets.pressure(b, tasks, self.fs.abspath(node.rel) if node.pids_events_wd is not None else None)
        # Births only matter where the churn rule can decide; summing them costs a pass over
        # the cgroup's tracked records.
        got = births(node.rel) if births is not None and p.usage >= PRESSURE_FAST else None
        s = Sample(now, tasks, p.level, p.limit, p.refused, got, p.source)
        assert node.history is not None
        prev = node.history.last
        node.history.add(s)
        self.samples_taken += 1
        grew = prev is not None and tasks > prev.tasks
        refused_more = prev is not None and p.refused is not None and prev.refused is not None and p.refused > prev.refused
        if grew or refused_more:
            node.active_until_ns = now + self.sampling.calm_after_ms * MS
        node.last_tasks = tasks
        node.last_usage = p.usage
        slow = self.sampling.slow_interval_ms * MS
        if now < node.active_until_ns or p.usage >= PRESSURE_FAST:
            interval = self.sampling.fast_interval_ms * MS
        elif self.backoff and prev is not None and tasks == prev.tasks and node.interval_ns >= slow:
            interval = min(2 * node.interval_ns, self.sampling.calm_backoff_max_ms * MS)
        else:
            interval = slow
        if tasks == 0 and not node.populated and node.events_wd is not None and now >= node.active_until_ns:
            # Empty, and its cgroup.events watch says so: nothing can fork in it until a task
            # enters, and that raises "populated 1", which samples it at once (hint_active; after
            # an inotify overflow, the rescan). Thousands of empty cgroups then cost no wake-ups.
            # Its share of a shared limit's pressure is none: shown as calm while parked, not
            # as the pressure its limit group had at this last sample (a v1 group still counts a
            # removed child's exiting tasks after populated 0), which no later sample corrects.
            node.interval_ns = interval
            node.due_ns = PARKED
            node.last_usage = 0.0
            return s
        self._schedule(node, now, interval)
        return s

    # -- queries ---------------------------------------------------------------------------
    def watched(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.watched]

    def watched_ancestor(self, rel: str) -> Node | None:
        """The smallest watched cgroup that contains ``rel`` (itself included)."""
        cur = rel
        while True:
            n = self.nodes.get(cur)
            if n is not None and n.watched:
                return n
            if not cur:
                return None
            cur = cur.rsplit("/", 1)[0] if "/" in cur else ""

    def charged_with(self, node: Node) -> list[Node]:
        """The other watched cgroups whose task counts included ``node``'s tasks: its ancestors
        (a subtree's pids.current or threads count them) and the cgroups charged to one of its
        kernel limits (a pod's containers under the pod's pids.max; on a hybrid host, a parent
        whose v1 group was found through a process of this child)."""
        out: dict[str, Node] = {}
        cur = node.rel
        while cur:
            cur = cur.rsplit("/", 1)[0] if "/" in cur else ""
            n = self.nodes.get(cur)
            if n is not None and n.watched:
                out[n.rel] = n
        mine = {id(g) for g in node.budget.groups} if node.budget else set()
        if mine:
            for n in self.nodes.values():
                if n is not node and n.watched and n.budget and any(id(g) in mine for g in n.budget.groups):
                    out[n.rel] = n
        return list(out.values())

    def _baseline(self, node: Node, since_ns: int) -> int:
        """Tasks of a cgroup at ``since_ns``, as well as its history tells."""
        hist = node.history
        if hist is None or not hist.samples:
            return 0
        s = hist.at(since_ns)
        return s.tasks if s is not None else min(x.tasks for x in hist.samples)

    def narrow(self, node: Node, since_ns: int) -> Node:
        """The smallest watched cgroup below ``node`` that accounts for nearly all of its growth.

        Growth, not size: a bomb started beside a large calm sibling holds few of the parent's
        tasks at first, and the sibling must not be taken for the bomb's home. Without history
        (the agent just started), size decides.
        """
        cur = node
        while True:
            total = self.count(cur)
            grown = total - self._baseline(cur, since_ns)
            by_growth: tuple[Node | None, int] = (None, 0)
            by_size: tuple[Node | None, int] = (None, 0)
            for child in cur.children.values():
                if not child.watched:
                    continue
                n = self.count(child)
                g = n - self._baseline(child, since_ns)
                if g > by_growth[1]:
                    by_growth = (child, g)
                if n > by_size[1]:
                    by_size = (child, n)
            if grown > 0:
                best, share, whole = by_growth[0], by_growth[1], grown
            else:
                best, share, whole = by_size[0], by_size[1], total
            if best is None or whole <= 0 or share < 0.9 * whole:
                return cur
            cur = best
