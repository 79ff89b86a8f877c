"""Kernel edge + state: the tree of cgroups cgguard keeps track of, kept current through inotify.

* Directories that a watch glob may match at or below get an inotify watch for new and removed
  child cgroups, so cgroups that appear or vanish are seen at once, without rescanning the tree.
  When the inotify queue overflows (a burst of cgroup creation), events are lost: the tree is
  rescanned, so no new cgroup stays unwatched. The rescan runs in slices between the loop's other
  work: thousands of cgroups made to overflow the queue take seconds to walk, and meanwhile the
  agent keeps sampling, acting, and watching cgroups that appear after the overflow at once.
* Every watched cgroup gets an inotify watch on ``cgroup.events`` (populated/frozen changes), and
  the ``pids.events`` of its own cgroup and of every v2 cgroup whose limit it counts against
  (forks refused at ``pids.max``, which is how a runaway pinned at a pod's limit announces itself).
* Descendants of watched cgroups are tracked too: without ``pids.current`` (hybrid hosts) their
  ``cgroup.threads`` count toward the watched cgroup.

A failure to add an inotify watch (``max_user_watches``) degrades the tree to periodic rescans:
resource exhaustion slows the agent down, it never stops it. What is sampled, and when, is
:class:`~cgguard.state.watch.Watcher`'s.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from inotify_simple import INotify, flags

from cgguard.globs import glob_match, glob_may_match_below
from cgguard.kernel.cgroupfs import CgroupFS, parse_flat_keyed
from cgguard.kernel.clock import MS, S
from cgguard.kernel.files import FileCache
from cgguard.state.budget import Budget
from cgguard.state.samples import History
from cgguard.state.watch_rescan import add_path, rescan_steps, walk

log = logging.getLogger("cgguard.watch")

# With watches missing (max_user_watches reached), look for new cgroups this often.
DEGRADED_RESCAN_NS = 2 * S
_DIR_MASK = flags.CREATE | flags.DELETE | flags.DELETE_SELF | flags.MOVED_FROM | flags.MOVED_TO | flags.ONLYDIR
_FILE_MASK = flags.MODIFY
# One slice of a rescan: the loop's other work waits at most this long for it.
RESCAN_SLICE_NS = 20 * MS


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


class CgroupTree:
    """A :class:`Node` under inotify watches for each cgroup that a watch glob matches, may match
    below, or that lies below a watched one. Subclasses hear of each watched cgroup added
    through :meth:`_watching`."""

    def __init__(
        self,
        fs: CgroupFS,
        watch: list[str],
        protect: list[str],
        files: FileCache,
        exclude: Callable[[str], bool] | None = None,
        on_removed: Callable[[Node], None] | None = None,
    ):
        self.fs = fs
        self.watch = list(watch)
        self.protect = list(protect)
        self.files = files
        self.exclude = exclude or (lambda rel: False)
        self.on_removed: Callable[[Node], None] = on_removed or (lambda n: None)
        self.inotify = INotify()
        self.nodes: dict[str, Node] = {}
        self._wd: dict[int, tuple[Node | None, str]] = {}
        self._group_wd: dict[str, int] = {}  # v2 limit group directory -> wd of its pids.events
        self._group_nodes: dict[str, set[str]] = {}  # v2 limit group directory -> watched nodes
        self.overflows = 0
        self.missing_watches = 0  # inotify watches the kernel refused (ENOSPC)
        self._next_degraded_rescan = 0
        self._rescan: Iterator[list[tuple[Node, str]]] | None = None  # a rescan under way, in slices
        self.rescan_slice_ns = RESCAN_SLICE_NS
        self.ready = False

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
        """The cgroups below ``node`` made known at once (at start, or below a new cgroup whose
        children appeared before our watch on it); returns the watched ones added."""
        return [n for part in walk(self, node, set()) for n, _ in part]

    @property
    def rescanning(self) -> bool:
        return self._rescan is not None

    def start_rescan(self) -> None:
        """Begin (or begin again: the events just lost may lie behind a running one's walk) a
        rescan that :meth:`rescan_step` carries out in slices."""
        self._rescan = rescan_steps(self)

    def rescan_step(self) -> list[tuple[Node, str]]:
        """One slice of the rescan under way: (node, 'added') for watched cgroups added or found
        populated, (node, 'events') for those found emptied (a kill's end whose event was lost)."""
        if self._rescan is None:
            return []
        out: list[tuple[Node, str]] = []
        end = time.monotonic_ns() + self.rescan_slice_ns
        for part in self._rescan:
            out += part
            if time.monotonic_ns() >= end:
                break
        else:
            self._rescan = None
        return out

    def add_path(self, rel: str) -> list[Node]:
        """Know ``rel`` and the cgroups above it now (a verdict names a cgroup whose creation was
        lost with an overflow, before the rescan reached it). Returns the watched ones added."""
        return add_path(self, rel)

    def maybe_rescan_degraded(self, now: int) -> None:
        """With inotify watches missing, new cgroups are found by rescans every few seconds."""
        if not self.missing_watches or now < self._next_degraded_rescan or self._rescan is not None:
            return
        self._next_degraded_rescan = now + DEGRADED_RESCAN_NS
        self.start_rescan()

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
                self._drop_watches(node)
                return None
        if parent is not None:
            parent.children[rel.rsplit("/", 1)[-1]] = node
        self.nodes[rel] = node
        if watched:
            self._watching(node)
        return node

    def _watching(self, node: Node) -> None:
        """A watched cgroup was added."""

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
            self._drop_watches(n)
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

    def _drop_watches(self, node: Node) -> None:
        for wd in (node.dir_wd, node.events_wd, node.pids_events_wd):
            if wd is not None:
                self._rm_watch(wd)

    def _rm_watch(self, wd: int) -> None:
        self._wd.pop(wd, None)
        try:
            self.inotify.rm_watch(wd)
        except OSError:
            pass  # already gone: the kernel drops a directory's watches with it

    # -- limit groups' pids.events ---------------------------------------------------------
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
                    self._rm_watch(wd)

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
            # A cgroup whose populated 0 was lost (a kill's end) is reported as an event. Events
            # of later batches are handled as they come, while the rescan goes on in slices.
            self.overflows += overflows
            log.warning("inotify queue overflowed: rescanning the cgroup tree")
            self.start_rescan()
            out += self.rescan_step()
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
            added = [child] if child.watched else []
            return [(n, "added") for n in added + self._scan(child)]
        if ev.mask & (flags.DELETE | flags.MOVED_FROM):
            child = node.children.get(ev.name)
            if child is not None:
                self._remove(child)
        return []

