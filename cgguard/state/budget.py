"""State: the task budget of each watched cgroup, and how full it is.

A cgroup's budget is the tightest kernel limit its tasks are charged to:

* ``pids.max`` of the cgroup itself or of any ancestor (pure v2; on Kubernetes the limit sits on
  the pod's cgroup, above the container's, whose own ``pids.max`` is ``max``);
* on hybrid hosts, ``pids.max`` of its processes' v1 pids cgroup and that cgroup's ancestors
  (Docker ``--pids-limit``, systemd ``TasksMax=``);
* none of these: a configured default (``budget.default_tasks``), a scale for growth rather than a
  limit anyone enforces.

Each limit is a :class:`LimitGroup`: its ``pids.current`` counts every task charged to it (zombies
included, and tasks of sibling cgroups under a shared ancestor) and ``pids.events`` counts forks
refused at it. Groups are shared between the watched cgroups under them. A budget is resolved
when a cgroup is first watched and again every ``REFRESH_NS`` (limits are set after cgroups are
made: kubelet writes a pod's ``pids.max`` after creating it; and processes move between v1 groups).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cgguard.kernel import pidsv1
from cgguard.kernel.cgroupfs import CgroupFS, parse_flat_keyed, parse_max
from cgguard.kernel.clock import S
from cgguard.kernel.files import FileCache

REFRESH_NS = 10 * S


@dataclass(eq=False, slots=True)
class LimitGroup:
    kind: str  # "v2" or "v1"
    rel: str  # path relative to its hierarchy's root
    directory: str  # absolute
    limit: int

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.rel or '/'}"


@dataclass(frozen=True, slots=True)
class Pressure:
    """How full a cgroup's budget is, read now."""

    level: int  # tasks charged to the limiting group (or the cgroup's own tasks: default budget)
    limit: int  # the budget
    refused: int | None  # forks refused at the limiting group, cumulative (None: no counter)
    source: str  # "v2:<path>", "v1:<path>" or "default"

    @property
    def usage(self) -> float:
        return self.level / self.limit if self.limit > 0 else 0.0


@dataclass(slots=True)
class Budget:
    groups: tuple[LimitGroup, ...] = ()
    resolved_ns: int = 0
    v1_pid: int = 0  # the process whose v1 group was looked up
    tasks: int = 0  # the cgroup's tasks when it was resolved
    notes: list[str] = field(default_factory=list)


class Budgets:
    """Resolves budgets and reads pressures, sharing limit groups and kept-open files."""

    def __init__(self, fs: CgroupFS, files: FileCache, default_tasks: int, use_v1: bool = True):
        self.fs = fs
        self.files = files
        self.default_tasks = default_tasks
        self.v1_root = pidsv1.find_pids_v1_root() if use_v1 else None
        self._groups: dict[tuple[str, str], LimitGroup] = {}

    def _group(self, kind: str, rel: str, directory: str, limit: int) -> LimitGroup:
        g = self._groups.get((kind, rel))
        if g is None:
            g = self._groups[(kind, rel)] = LimitGroup(kind, rel, directory, limit)
        g.limit = limit
        return g

    def resolve(self, rel: str, now_ns: int, pid_hint: int | None = None) -> Budget:
        groups: list[LimitGroup] = []
        cur = rel
        while True:
            text = self.fs.read_optional(cur, "pids.max") if cur else None
            try:
                limit = parse_max(text) if text is not None else None
            except ValueError:
                limit = None
            if limit is not None:
                groups.append(self._group("v2", cur, self.fs.abspath(cur), limit))
            if not cur:
                break
            cur = cur.rsplit("/", 1)[0] if "/" in cur else ""
        b = Budget(resolved_ns=now_ns)
        if self.v1_root is not None:
            pid = pid_hint or self._first_pid(rel)
            v1 = pidsv1.v1_pids_path(pid) if pid else None
            if v1 is not None:
                b.v1_pid = pid or 0
                for path, limit in pidsv1.limit_chain(self.v1_root, v1):
                    groups.append(self._group("v1", path, os.path.join(self.v1_root, path), limit))
        b.groups = tuple(groups)
        return b

    def _first_pid(self, rel: str) -> int | None:
        for cg in self.fs.walk(rel)[:64]:
            try:
                text = self.fs.read_optional(cg, "cgroup.procs")
            except OSError:
                continue
            if text:
                first = text.split(None, 1)[0]
                if first.isdigit():
                    return int(first)
        return None

    def stale(self, b: Budget, now_ns: int) -> bool:
        return now_ns - b.resolved_ns >= REFRESH_NS

    def _refused(self, directory: str) -> int | None:
        try:
            return parse_flat_keyed(self.files.read(os.path.join(directory, "pids.events")).decode()).get("max")
        except OSError:
            return None

    def pressure(self, b: Budget, own_tasks: int, own_dir: str | None = None) -> Pressure:
        """The fullest of the budget's limit groups, or the cgroup's own tasks against the default.

        Refused forks are counted where the kernel counts them: before Linux 6.11 in the
        ``pids.events`` of the cgroup that tried to fork, since then at the limit and up the tree.
        So a cgroup under a pod's limit adds its own counter (``own_dir``) to the pod's.
        """
        best: Pressure | None = None
        best_dir = None
        for g in b.groups:
            try:
                level = int(self.files.read(os.path.join(g.directory, "pids.current")) or b"0")
            except (OSError, ValueError):
                continue
            p = Pressure(level, g.limit, self._refused(g.directory), g.name)
            if best is None or p.usage > best.usage:
                best, best_dir = p, g.directory
        if best is None:
            return Pressure(own_tasks, self.default_tasks, None, "default")
        if own_dir is not None and own_dir != best_dir and best.source.startswith("v2:"):
            own = self._refused(own_dir)
            if own is not None:
                best = Pressure(best.level, best.limit, (best.refused or 0) + own, best.source)
        return best

    def forget_unused(self, used: set[tuple[str, str]]) -> None:
        for key in [k for k in self._groups if k not in used]:
            g = self._groups.pop(key)
            self.files.forget_under(g.directory)
