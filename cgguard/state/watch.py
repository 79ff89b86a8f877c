"""Kernel edge + state: the set of watched cgroups, kept current through inotify, and their samples.

* Directories that a watch glob may match at or below get an inotify watch for new and removed
  child cgroups, so cgroups that appear or vanish are seen at once, without rescanning the tree.
  When the inotify queue overflows (a burst of cgroup creation), events are lost: the watcher
  rescans the tree, so no new cgroup stays unwatched.
* Every watched cgroup gets an inotify watch on ``cgroup.events`` (populated/frozen changes), and
  the ``pids.events`` of its own cgroup and of every v2 cgroup whose limit it counts against
  (forks refused at ``pids.max``, which is how a runaway pinned at a pod's limit announces itself).
* Task counts cannot be watched (``pids.current`` raises no event), so they are sampled: fast
  (``fast_interval_ms``) while a cgroup grows, has fork activity or holds more than half its
  budget, slow when calm, and more rarely still when the proc connector would wake it on a fork.
  Without ``pids.current`` (hybrid hosts) the count is the number of TIDs in ``cgroup.threads``
  across the subtree; descendants of watched cgroups are tracked for that.

Files are read through a bounded :class:`~cgguard.kernel.files.FileCache`, and a failure to add
an inotify watch (``max_user_watches``) degrades the watcher to periodic rescans: resource
exhaustion slows the agent down, it never stops it.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

from inotify_simple import INotify, flags

from cgguard.config import Sampling
from cgguard.globs import glob_match, glob_may_match_below
from cgguard.kernel.cgroupfs import CgroupFS, parse_flat_keyed
from cgguard.kernel.clock import MS, S, now_ns
from cgguard.kernel.files import FileCache
from cgguard.state.budget import Budget, Budgets, LimitGroup
from cgguard.state.samples import History, Sample

log = logging.getLogger("cgguard.watch")

CALM_GRID_NS = 250 * MS
# Above this share of its budget a cgroup is sampled fast whatever else it does: that is where
# the trajectory and pinned detectors decide, and where a stall would cost the most.
PRESSURE_FAST = 0.5
# With watches missing (max_user_watches reached), look for new cgroups this often.
DEGRADED_RESCAN_NS = 2 * S
V1_RETRY_NS = 200 * MS
PARKED = 1 << 62  # due time of an empty cgroup: sampled again when it is populated
_DIR_MASK = flags.CREATE | flags.DELETE | flags.DELETE_SELF | flags.MOVED_FROM | flags.MOVED_TO | flags.ONLYDIR
_FILE_MASK = flags.MODIFY


@dataclass(eq=False, slots=True)
class Node:
    """One cgroup directory cgguard keeps track of (slots: 10,000 of them on a big node)."""

    rel: str
    watched: bool  # matches a watch glob (a candidate for verdicts and actions)
    protected: bool
    parent: "Node | None" = None
    children: dict[str, "Node"] = field(default_factory=dict)
    dir_wd: int | None = None
    events_wd: int | None = None
    pids_events_wd: int | None = None
    source: str = ""  # pids.current, or cgroup.threads (counted across the subtree)
    counted: bool = False  # its cgroup.threads counts toward a watched ancestor
    history: History | None = None
    interval_ns: int = 0
    due_ns: int = 0
    active_until_ns: int = 0
    populated: bool = True
    frozen: bool = False
    last_tasks: int = 0
    last_usage: float = 0.0
    busy: bool = False  # an action is running on it
    budget: Budget | None = None

    def descendants(self) -> Iterable["Node"]:
        stack = list(self.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())


class Watcher:
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
        self.fs = fs
        self.watch = list(watch)
        self.protect = list(protect)
        self.sampling = sampling
        self.budgets = budgets
        self.files = files
        self.clock = clock
        self.exclude = exclude or (lambda rel: False)
        self.on_removed: Callable[[Node], None] = on_removed or (lambda n: None)
        self.inotify = INotify()
        self.nodes: dict[str, Node] = {}
        self._wd: dict[int, tuple[Node | None, str]] = {}
        self._heap: list[tuple[int, int, Node]] = []
        self._seq = 0
        self._group_wd: dict[str, int] = {}  # v2 limit group directory -> wd of its pids.events
        self._group_nodes: dict[str, set[str]] = {}  # v2 limit group directory -> watched nodes
        self.samples_taken = 0
        self.overflows = 0
        self.missing_watches = 0  # inotify watches the kernel refused (ENOSPC)
        self.emptied: list[Node] = []  # found unpopulated by the last rescan, populated before
        self._next_degraded_rescan = 0
        self.ready = False
        # Set by the agent when fork events (proc connector) wake cgroups: only then may calm
        # cgroups back off beyond slow_interval_ms.
        self.backoff = False

    # -- glob logic ------------------------------------------------------------------------
    def matches(self, rel: str) -> bool:
        return any(glob_match(g, rel) for g in self.watch) and not self.exclude(rel)

    def is_protected(self, rel: str) -> bool:
        """Protection covers the cgroup and everything below it: protecting a service protects
        the cgroups it makes for its workers."""
        cur = rel
        while cur:
            if any(glob_match(g, cur) for g in self.protect):
                return True
            cur = cur.rsplit("/", 1)[0] if "/" in cur else ""
        return False

    def _may_match_below(self, rel: str) -> bool:
        return any(glob_may_match_below(g, rel) for g in self.watch)

    def _needs_node(self, rel: str, parent: Node | None) -> bool:
        # Under a watched cgroup every descendant is tracked: its tasks count toward the
        # watched cgroup, and it may hold the bomb (the smallest cgroup is acted on).
        if parent is not None and (parent.watched or parent.counted):
            return True
        return self.matches(rel) or self._may_match_below(rel)

    def unmatched_globs(self) -> list[str]:
        """Watch globs that match no cgroup now (a typo, or a workload not started yet)."""
        rels = [n.rel for n in self.nodes.values() if n.watched]
        return [g for g in self.watch if not any(glob_match(g, r) for r in rels)]

    # -- building --------------------------------------------------------------------------
    def fileno(self) -> int:
        return self.inotify.fileno()

    def start(self) -> None:
        root = self._add("", None)
        if root is not None:
            self._scan(root)
        self.ready = True

    def _scan(self, node: Node) -> list[Node]:
        added = []
        for child_rel in self.fs.children(node.rel):
            name = child_rel.rsplit("/", 1)[-1]
            child = node.children.get(name)
            if child is None:
                child = self._add(child_rel, node)
                if child is None:
                    continue
                added.append(child)
            added += self._scan(child)
        return added

    def rescan(self) -> list[Node]:
        """Reconcile with the tree after lost inotify events: add what is new, drop what is gone,
        re-read every watched cgroup's state. Returns the watched cgroups added, and those found
        populated that were not (their "populated 1" may have been lost: they are sampled again)."""
        for node in [n for n in self.nodes.values() if n.rel and not os.path.isdir(self.fs.abspath(n.rel))]:
            if self.nodes.get(node.rel) is node:
                self._remove(node)
        root = self.nodes.get("")
        added = self._scan(root) if root is not None else []
        new = {id(n) for n in added}
        woke: list[Node] = []
        self.emptied = []
        for n in self.nodes.values():
            if n.watched and id(n) not in new:  # a node just added read its cgroup.events
                was = n.populated
                self._read_events(n)
                if n.populated and not was:
                    woke.append(n)
                elif was and not n.populated:
                    self.emptied.append(n)
        return [n for n in added if n.watched] + woke

    def maybe_rescan_degraded(self, now: int) -> list[Node]:
        if not self.missing_watches or now < self._next_degraded_rescan:
            return []
        self._next_degraded_rescan = now + DEGRADED_RESCAN_NS
        return self.rescan()

    def _add_watch(self, path: str, mask: int) -> int | None:
        try:
            return self.inotify.add_watch(path, mask)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self.missing_watches += 1
                return None
            raise

    def _add(self, rel: str, parent: Node | None) -> Node | None:
        if rel and not self._needs_node(rel, parent):
            return None
        if rel in self.nodes:
            return self.nodes[rel]
        watched = bool(rel) and self.matches(rel)
        node = Node(rel=rel, watched=watched, protected=watched and self.is_protected(rel), parent=parent)
        path = self.fs.abspath(rel)
        try:
            node.dir_wd = self._add_watch(path, _DIR_MASK)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise
        if node.dir_wd is not None:
            self._wd[node.dir_wd] = (node, "dir")
        node.counted = parent is not None and (parent.watched or parent.counted)
        if watched or node.counted:
            node.source = "pids.current" if os.path.exists(os.path.join(path, "pids.current")) else "cgroup.threads"
        if watched:
            try:
                self._watch_files(node, path)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENODEV, errno.ENOTDIR):
                    raise
                # Gone between mkdir and our watch (cgroup churn): as if never seen.
                for wd in (node.dir_wd, node.events_wd, node.pids_events_wd):
                    if wd is not None:
                        self._wd.pop(wd, None)
                        try:
                            self.inotify.rm_watch(wd)
                        except OSError:
                            pass
                return None
        if parent is not None:
            parent.children[rel.rsplit("/", 1)[-1]] = node
        self.nodes[rel] = node
        if watched:
            node.history = History()
            # First samples of a freshly started agent are spread over one calm interval rather
            # than all due at once (10,000 cgroups would stall the loop for a moment).
            now = self.clock()
            spread = self.sampling.slow_interval_ms * MS if self.ready else CALM_GRID_NS * 4
            self._schedule_at(node, now + zlib.crc32(rel.encode()) % max(spread, 1), self.sampling.slow_interval_ms * MS)
        return node

    def _watch_files(self, node: Node, path: str) -> None:
        wd = self._add_watch(os.path.join(path, "cgroup.events"), _FILE_MASK)
        if wd is not None:
            node.events_wd = wd
            self._wd[wd] = (node, "events")
        self._read_events(node)
        if os.path.exists(os.path.join(path, "pids.events")):
            wd = self._add_watch(os.path.join(path, "pids.events"), _FILE_MASK)
            if wd is not None:
                node.pids_events_wd = wd
                self._wd[wd] = (node, "pids.events")

    def _read_events(self, node: Node) -> None:
        try:
            ev = parse_flat_keyed(self.fs.read_optional(node.rel, "cgroup.events") or "")
        except OSError:
            return
        node.populated = ev.get("populated", 1) == 1
        node.frozen = ev.get("frozen", 0) == 1

    def _remove(self, node: Node) -> None:
        for n in [*node.descendants(), node]:
            for wd in (n.dir_wd, n.events_wd, n.pids_events_wd):
                if wd is not None:
                    self._wd.pop(wd, None)
                    try:
                        self.inotify.rm_watch(wd)
                    except OSError:
                        pass  # the kernel already dropped it with the directory
            self.files.forget_under(self.fs.abspath(n.rel))
            if n.budget is not None:
                self._unlink_groups(n, n.budget)
            if self.nodes.get(n.rel) is n:
                del self.nodes[n.rel]
                if n.watched:
                    self.on_removed(n)
        if node.parent is not None:
            node.parent.children.pop(node.rel.rsplit("/", 1)[-1], None)

    def close(self) -> None:
        if "" in self.nodes:
            self._remove(self.nodes[""])
        self.inotify.close()

    # -- budgets ---------------------------------------------------------------------------
    def _link_groups(self, node: Node, b: Budget) -> None:
        for g in b.groups:
            if g.kind != "v2" or g.directory == self.fs.abspath(node.rel):
                continue  # the cgroup's own pids.events is watched already
            users = self._group_nodes.setdefault(g.directory, set())
            users.add(node.rel)
            if g.directory not in self._group_wd:
                wd = self._add_watch(os.path.join(g.directory, "pids.events"), _FILE_MASK)
                if wd is not None:
                    self._group_wd[g.directory] = wd
                    self._wd[wd] = (None, g.directory)

    def _unlink_groups(self, node: Node, b: Budget) -> None:
        for g in b.groups:
            users = self._group_nodes.get(g.directory)
            if users is None:
                continue
            users.discard(node.rel)
            if not users:
                del self._group_nodes[g.directory]
                wd = self._group_wd.pop(g.directory, None)
                if wd is not None:
                    self._wd.pop(wd, None)
                    try:
                        self.inotify.rm_watch(wd)
                    except OSError:
                        pass

    def budget_of(self, node: Node, now: int, populated: bool = False) -> Budget:
        """The cgroup's budget, resolved again when stale, and soon after it first holds tasks on
        a hybrid host (its v1 group is found through one of its processes)."""
        b = node.budget
        # On a hybrid host a runtime moves a process into its v1 pids group and into its cgroup2
        # cgroup one after the other, in either order: while no limit is found, look again.
        v1_pending = (
            populated and b is not None and self.budgets.v1_root is not None
            and not any(g.kind == "v1" for g in b.groups) and now - b.resolved_ns >= V1_RETRY_NS
            and (now < node.active_until_ns or not b.v1_pid)
        )
        if b is None or self.budgets.stale(b, now) or v1_pending:
            if b is not None:
                self._unlink_groups(node, b)
            b = node.budget = self.budgets.resolve(node.rel, now)
            self._link_groups(node, b)
        return b

    def limit_groups(self) -> list[LimitGroup]:
        seen: dict[int, LimitGroup] = {}
        for n in self.nodes.values():
            for g in n.budget.groups if n.budget else ():
                seen[id(g)] = g
        return list(seen.values())

    # -- inotify ---------------------------------------------------------------------------
    def handle_inotify(self) -> list[tuple[Node, str]]:
        """Process pending inotify events. Returns (node, 'events'|'pids.events'|'added')
        notifications for watched cgroups."""
        out: list[tuple[Node, str]] = []
        events = self.inotify.read(timeout=0)
        overflows = sum(1 for ev in events if ev.mask & flags.Q_OVERFLOW)
        if overflows:
            # One rescan finds every cgroup made or removed, those of this batch included: their
            # events are not also handled one by one (16,000 of them took as long as the rescan).
            # A cgroup whose populated 0 was lost (a kill's end) is reported as an event.
            self.overflows += overflows
            log.warning("inotify queue overflowed: rescanning the cgroup tree")
            out += [(n, "added") for n in self.rescan()]
            out += [(n, "events") for n in self.emptied]
        for ev in events:
            if ev.mask & flags.Q_OVERFLOW:
                continue
            entry = self._wd.get(ev.wd)
            if entry is None:
                continue
            node, kind = entry
            if node is None:  # a limit group's pids.events: every cgroup under it may be pinned
                for rel in self._group_nodes.get(kind, ()):
                    n = self.nodes.get(rel)
                    if n is not None and n.watched:
                        out.append((n, "pids.events"))
                continue
            if kind == "dir":
                if not overflows:
                    out += self._dir_event(node, ev)
            elif kind == "events":
                self._read_events(node)
                out.append((node, "events"))
            else:
                out.append((node, kind))
        return out

    def _dir_event(self, node: Node, ev) -> list[tuple[Node, str]]:
        if ev.mask & (flags.DELETE_SELF | flags.IGNORED):
            if self.nodes.get(node.rel) is node:
                self._remove(node)
            return []
        if not ev.mask & flags.ISDIR or not ev.name:
            return []
        child_rel = f"{node.rel}/{ev.name}" if node.rel else ev.name
        if ev.mask & (flags.CREATE | flags.MOVED_TO):
            child = self._add(child_rel, node)
            if child is None:
                return []
            # Children made before our watch was in place would otherwise be missed.
            added = [child, *self._scan(child)]
            return [(n, "added") for n in added if n.watched]
        if ev.mask & (flags.DELETE | flags.MOVED_FROM):
            child = node.children.get(ev.name)
            if child is not None:
                self._remove(child)
        return []

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
        b = self.budget_of(node, now, populated=tasks > 0)
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
            # an inotify overflow, rescan()). Thousands of empty cgroups then cost no wake-ups.
            node.interval_ns = interval
            node.due_ns = PARKED
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
