"""Kernel edge + state: the set of watched cgroups, kept current through inotify, and their samples.

* Directories that a watch glob may match at or below get an inotify watch for new and removed
  child cgroups, so cgroups that appear or vanish are seen at once, without rescanning the tree.
* Every watched cgroup gets an inotify watch on ``cgroup.events`` (populated/frozen changes) and
  on ``pids.events`` where it exists (forks refused at ``pids.max``).
* Task counts cannot be watched (``pids.current`` raises no event), so they are sampled: fast
  (``fast_interval_ms``) while a cgroup grows or has fork activity, slow when calm. Files stay
  open and are re-read with ``pread`` so a calm node with 1,000 watched cgroups costs next to
  nothing. Without ``pids.current`` (hybrid hosts) the count is the number of TIDs in
  ``cgroup.threads`` across the subtree; descendants of watched cgroups are tracked for that.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from inotify_simple import INotify, flags

from cgguard.config import Sampling, glob_match, glob_may_match_below
from cgguard.kernel.cgroupfs import CgroupFS, parse_flat_keyed, parse_max
from cgguard.kernel.clock import MS
from cgguard.state.samples import History, Sample

log = logging.getLogger("cgguard.state.watch")

CALM_GRID_NS = 250 * MS
_DIR_MASK = flags.CREATE | flags.DELETE | flags.DELETE_SELF | flags.MOVED_FROM | flags.MOVED_TO | flags.ONLYDIR
_FILE_MASK = flags.MODIFY


def _pread_all(fd: int) -> bytes:
    chunks, off = [], 0
    while True:
        b = os.pread(fd, 65536, off)
        chunks.append(b)
        if len(b) < 65536:
            return b"".join(chunks)
        off += len(b)


class _File:
    """A cgroupfs file kept open and re-read from offset 0 (cheaper than open/read/close)."""

    __slots__ = ("path", "fd")

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> bytes:
        return _pread_all(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


@dataclass(eq=False)
class Node:
    """One cgroup directory cgguard keeps track of."""

    rel: str
    watched: bool  # matches a watch glob (a candidate for verdicts and actions)
    protected: bool
    parent: "Node | None" = None
    children: dict[str, "Node"] = field(default_factory=dict)
    dir_wd: int | None = None
    events_wd: int | None = None
    pids_events_wd: int | None = None
    f_current: _File | None = None  # pids.current, or cgroup.threads as the fallback
    f_max: _File | None = None
    f_events: _File | None = None  # pids.events
    history: History | None = None
    interval_ns: int = 0
    due_ns: int = 0
    active_until_ns: int = 0
    populated: bool = True
    frozen: bool = False
    last_tasks: int = 0
    source: str = ""
    busy: bool = False  # an action is running on it

    @property
    def counts_locally(self) -> bool:
        return self.f_current is not None and self.source == "cgroup.threads"

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
        clock: Callable[[], int] = time.monotonic_ns,
        exclude: Callable[[str], bool] | None = None,
        on_removed: Callable[["Node"], None] | None = None,
    ):
        self.fs = fs
        self.watch = list(watch)
        self.protect = list(protect)
        self.sampling = sampling
        self.clock = clock
        self.exclude = exclude or (lambda rel: False)
        self.inotify = INotify()
        self.nodes: dict[str, Node] = {}
        self._wd: dict[int, tuple[Node, str]] = {}
        self._heap: list[tuple[int, int, Node]] = []
        self._seq = 0
        self.on_removed: Callable[[Node], None] = on_removed or (lambda n: None)
        self.samples_taken = 0
        self.ready = False
        # Set by the agent when fork events (proc connector) wake cgroups: only then may calm
        # cgroups back off beyond slow_interval_ms.
        self.backoff = False

    # -- glob logic ------------------------------------------------------------------------
    def matches(self, rel: str) -> bool:
        return any(glob_match(g, rel) for g in self.watch) and not self.exclude(rel)

    def is_protected(self, rel: str) -> bool:
        return any(glob_match(g, rel) for g in self.protect)

    def _may_match_below(self, rel: str) -> bool:
        return any(glob_may_match_below(g, rel) for g in self.watch)

    def _needs_node(self, rel: str, parent: Node | None) -> bool:
        # Under a watched cgroup every descendant is tracked: its tasks count toward the
        # watched cgroup, and it may hold the bomb (the smallest cgroup is acted on).
        if parent is not None and (parent.watched or parent.counts_locally):
            return True
        return self.matches(rel) or self._may_match_below(rel)

    # -- building --------------------------------------------------------------------------
    def fileno(self) -> int:
        return self.inotify.fileno()

    def start(self) -> None:
        root = self._add("", None)
        if root is not None:
            self._scan(root)
        self.ready = True

    def _scan(self, node: Node) -> None:
        for child_rel in self.fs.children(node.rel):
            name = child_rel.rsplit("/", 1)[-1]
            if name in node.children:
                continue
            child = self._add(child_rel, node)
            if child is not None:
                self._scan(child)

    def _add(self, rel: str, parent: Node | None) -> Node | None:
        if rel and not self._needs_node(rel, parent):
            return None
        if rel in self.nodes:
            return self.nodes[rel]
        watched = bool(rel) and self.matches(rel)
        node = Node(rel=rel, watched=watched, protected=watched and self.is_protected(rel), parent=parent)
        path = self.fs.abspath(rel)
        try:
            node.dir_wd = self.inotify.add_watch(path, _DIR_MASK)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise
        self._wd[node.dir_wd] = (node, "dir")
        counted = watched or (parent is not None and (parent.watched or parent.counts_locally))
        if counted:
            self._open_files(node)
        if parent is not None:
            parent.children[rel.rsplit("/", 1)[-1]] = node
        self.nodes[rel] = node
        if watched:
            node.history = History()
            now = self.clock()
            self._schedule(node, now, self.sampling.slow_interval_ms * MS)
        return node

    def _open_files(self, node: Node) -> None:
        path = self.fs.abspath(node.rel)
        try:
            if node.watched:
                node.events_wd = self.inotify.add_watch(os.path.join(path, "cgroup.events"), _FILE_MASK)
                self._wd[node.events_wd] = (node, "events")
                ev = parse_flat_keyed(self.fs.read_optional(node.rel, "cgroup.events") or "")
                node.populated = ev.get("populated", 1) == 1
                node.frozen = ev.get("frozen", 0) == 1
            if os.path.exists(os.path.join(path, "pids.current")):
                node.f_current = _File(os.path.join(path, "pids.current"))
                node.source = "pids.current"
                if node.watched:
                    node.f_max = _File(os.path.join(path, "pids.max"))
                    if os.path.exists(os.path.join(path, "pids.events")):
                        node.f_events = _File(os.path.join(path, "pids.events"))
                        node.pids_events_wd = self.inotify.add_watch(os.path.join(path, "pids.events"), _FILE_MASK)
                        self._wd[node.pids_events_wd] = (node, "pids.events")
            else:
                node.f_current = _File(os.path.join(path, "cgroup.threads"))
                node.source = "cgroup.threads"
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    def _remove(self, node: Node) -> None:
        for n in [*node.descendants(), node]:
            for wd in (n.dir_wd, n.events_wd, n.pids_events_wd):
                if wd is not None:
                    self._wd.pop(wd, None)
                    try:
                        self.inotify.rm_watch(wd)
                    except OSError:
                        pass  # the kernel already dropped it with the directory
            for f in (n.f_current, n.f_max, n.f_events):
                if f is not None:
                    f.close()
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

    # -- inotify ---------------------------------------------------------------------------
    def handle_inotify(self) -> list[tuple[Node, str]]:
        """Process pending inotify events. Returns (node, 'events'|'pids.events') notifications."""
        out: list[tuple[Node, str]] = []
        for ev in self.inotify.read(timeout=0):
            entry = self._wd.get(ev.wd)
            if entry is None:
                continue
            node, kind = entry
            if kind == "dir":
                if ev.mask & (flags.DELETE_SELF | flags.IGNORED):
                    if self.nodes.get(node.rel) is node:
                        self._remove(node)
                    continue
                if not ev.mask & flags.ISDIR or not ev.name:
                    continue
                child_rel = f"{node.rel}/{ev.name}" if node.rel else ev.name
                if ev.mask & (flags.CREATE | flags.MOVED_TO):
                    child = self._add(child_rel, node)
                    if child is not None:
                        # Children made before our watch was in place would otherwise be missed.
                        self._scan(child)
                elif ev.mask & (flags.DELETE | flags.MOVED_FROM):
                    child = node.children.get(ev.name)
                    if child is not None:
                        self._remove(child)
            elif kind == "events":
                try:
                    ev_ = parse_flat_keyed(self.fs.read_optional(node.rel, "cgroup.events") or "")
                except OSError:
                    continue
                node.populated = ev_.get("populated", 0) == 1
                node.frozen = ev_.get("frozen", 0) == 1
                out.append((node, "events"))
            else:
                out.append((node, kind))
        return out

    # -- sampling --------------------------------------------------------------------------
    def _schedule(self, node: Node, now: int, interval_ns: int) -> None:
        node.interval_ns = interval_ns
        due = now + interval_ns
        if interval_ns >= self.sampling.slow_interval_ms * MS:
            # Calm cgroups share a coarse grid, so 1,000 of them cost a few wake-ups a second
            # instead of a thousand; a calm count a few hundred ms late changes nothing.
            due = -(-due // CALM_GRID_NS) * CALM_GRID_NS
        node.due_ns = due
        self._seq += 1
        heapq.heappush(self._heap, (node.due_ns, self._seq, node))

    def next_due_ns(self) -> int | None:
        while self._heap:
            due, _, node = self._heap[0]
            if self.nodes.get(node.rel) is not node or node.due_ns != due:
                heapq.heappop(self._heap)  # stale entry
                continue
            return due
        return None

    def due(self, now: int) -> list[Node]:
        out = []
        while self._heap and self._heap[0][0] <= now:
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
            self._schedule(node, due - fast, fast)

    def count(self, node: Node) -> int:
        if node.source == "pids.current" and node.f_current is not None:
            try:
                return int(node.f_current.read() or b"0")
            except (OSError, ValueError):
                return 0
        total = 0
        for n in (node, *node.descendants()):
            if n.f_current is not None:
                try:
                    total += n.f_current.read().count(b"\n")
                except OSError:
                    pass
        return total

    def sample(self, node: Node, now: int | None = None) -> Sample:
        """Read the cgroup's counters now, record them, and set its next sampling time."""
        now = self.clock() if now is None else now
        tasks = self.count(node)
        pids_max = forks_refused = None
        if node.f_max is not None:
            try:
                pids_max = parse_max(node.f_max.read().decode())
            except (OSError, ValueError):
                pass
        if node.f_events is not None:
            try:
                forks_refused = parse_flat_keyed(node.f_events.read().decode()).get("max")
            except OSError:
                pass
        s = Sample(now, tasks, pids_max, forks_refused)
        assert node.history is not None
        prev = node.history.last
        node.history.add(s)
        self.samples_taken += 1
        grew = prev is not None and tasks > prev.tasks
        refused_more = prev is not None and forks_refused is not None and forks_refused != prev.forks_refused
        if grew or refused_more:
            node.active_until_ns = now + self.sampling.calm_after_ms * MS
        node.last_tasks = tasks
        slow = self.sampling.slow_interval_ms * MS
        if now < node.active_until_ns:
            interval = self.sampling.fast_interval_ms * MS
        elif self.backoff and prev is not None and tasks == prev.tasks and node.interval_ns >= slow:
            interval = min(2 * node.interval_ns, self.sampling.calm_backoff_max_ms * MS)
        else:
            interval = slow
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
        before = [s.tasks for s in hist.samples if s.t_ns <= since_ns]
        return before[-1] if before else min(s.tasks for s in hist.samples)

    def narrow(self, node: Node, since_ns: int) -> Node:
        """The smallest watched cgroup below ``node`` that accounts for nearly all of its growth.

        Growth, not size: a bomb started beside a large calm sibling holds few of the parent's
        tasks at first, and the sibling must not be taken for the bomb's home.
        """
        cur = node
        while True:
            grown = self.count(cur) - self._baseline(cur, since_ns)
            best, best_grown = None, 0
            for child in cur.children.values():
                if not child.watched:
                    continue
                g = self.count(child) - self._baseline(child, since_ns)
                if g > best_grown:
                    best, best_grown = child, g
            if best is None or grown <= 0 or best_grown < 0.9 * grown:
                return cur
            cur = best
