"""Views of the agent's state for operators: the typed status and the ``cgguard tree`` forest.

Built on the loop's thread (which owns the state) when someone asks: a scrape, ``cgguard
status`` or ``cgguard tree``. Nothing here runs on the detection path.
"""

from __future__ import annotations

import dataclasses
import os
import resource
from typing import TYPE_CHECKING, Any, Callable

from cgguard.kernel.clock import MS
from cgguard.state.lineage import LineageTree
from cgguard.state.lineage_record import FORGOTTEN, Record
from cgguard.state.lineage_walk import oom_badness, postorder, seed_scores
from cgguard.state.status import (
    CgroupStatus,
    ConnectorStatus,
    IncidentsStatus,
    Status,
    TrackingStatus,
)
from cgguard.state.watch import PRESSURE_FAST
from cgguard.state.watch_tree import Node

if TYPE_CHECKING:
    from .core import Agent



def cgroup_state(n: Node, now_ns: int) -> str:
    if n.busy:
        return "acting"
    if n.protected:
        return "protected"
    if n.last_usage >= PRESSURE_FAST:
        return "pressure"
    return "active" if n.active_until_ns > now_ns else "calm"


def cgroup_status(n: Node, now_ns: int, workload: dict[str, Any] | None) -> CgroupStatus:
    last = n.history.last if n.history else None
    return CgroupStatus(
        path=n.rel,
        tasks=last.tasks if last else n.last_tasks,
        source=n.source,
        budget=last.limit if last else None,
        budget_source=last.source if last else "",
        limit_tasks=last.level if last and last.kernel_limit else None,
        pids_max=last.limit if last and last.kernel_limit else None,
        forks_refused=last.refused if last else None,
        state=cgroup_state(n, now_ns),
        interval_ms=n.interval_ns // MS,
        populated=n.populated,
        workload=workload,
    )


_PAGE = os.sysconf("SC_PAGE_SIZE")


def own_usage() -> tuple[float, int] | None:
    """(CPU seconds, user + system, of the whole process; resident bytes) of this process, from
    getrusage and /proc/self/statm: what psutil would say, without importing it into the agent."""
    try:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        with open("/proc/self/statm", "rb") as f:
            resident = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return ru.ru_utime + ru.ru_stime, resident * _PAGE


def build_status(agent: "Agent", *, workloads: bool = True) -> Status:
    now = agent.clock()
    nodes = sorted(agent.watcher.watched(), key=lambda n: n.rel)
    cgroups = [cgroup_status(n, now, agent.workloads.get(n.rel) if workloads else None) for n in nodes]
    by_state: dict[str, int] = {}
    for c in cgroups:
        by_state[c.state] = by_state.get(c.state, 0) + 1
    usage = own_usage()
    cpu, rss = usage if usage is not None else (None, None)
    tr = agent.tracking
    rec = agent.recorder
    return Status(
        ready=agent.ready,
        dry_run=agent.cfg.dry_run,
        cgroup_root=agent.fs.root,
        own_cgroup=agent.own_cgroup,
        watch=list(agent.cfg.watch),
        protect=list(agent.cfg.protect),
        cgroups=cgroups,
        watched=len(cgroups),
        by_state=by_state,
        connector=tr.connector_status() if tr else ConnectorStatus(mode=agent.tracking_note),
        tracking=tr.status() if tr else TrackingStatus(),
        incidents=IncidentsStatus(
            since_start=rec.since_start,
            recorded=rec.recorded,
            log=rec.log.path,
            not_removed=dict(rec.not_removed),
        ),
        cpu_seconds=cpu,
        rss_bytes=rss,
        pid=agent.pid,
        samples_taken=agent.watcher.samples_taken,
        inotify_overflows=agent.watcher.overflows,
        sinks={s.name: s.stats() for s in rec.sinks if hasattr(s, "stats") and hasattr(s, "name")},
        notes=list(agent.notes) + degraded_notes(agent),
    )


_CGROUP_FIELDS = tuple(f.name for f in dataclasses.fields(CgroupStatus))
_STATUS_FIELDS = tuple(f.name for f in dataclasses.fields(Status))


def _flat(obj: Any) -> dict[str, Any]:
    d = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for k, v in d.items():
        if isinstance(v, (list, dict)):
            d[k] = type(v)(v)
    return d


def status_dict(st: Status) -> dict[str, Any]:
    """``Status.to_dict()`` for the control socket, without dataclasses.asdict's deep copy: with
    10,000 cgroups that copy took the loop most of a second per ``cgguard status``. Equal to
    to_dict(); the workload dicts are shared (the agent never changes one once made), the rest
    is fresh."""
    d: dict[str, Any] = {name: getattr(st, name) for name in _STATUS_FIELDS}
    d["cgroups"] = [{name: getattr(c, name) for name in _CGROUP_FIELDS} for c in st.cgroups]
    for name in ("connector", "tracking", "incidents"):
        d[name] = _flat(d[name])
    for name in ("watch", "protect", "notes"):
        d[name] = list(d[name])
    d["by_state"] = dict(d["by_state"])
    d["sinks"] = {k: dict(v) for k, v in d["sinks"].items()}
    return d


def degraded_notes(agent: "Agent") -> list[str]:
    """What resource limits took from the agent, for the operator (it keeps running either way)."""
    out = []
    if agent.watcher.missing_watches:
        out.append(
            f"{agent.watcher.missing_watches} inotify watches refused (fs.inotify.max_user_watches): "
            "new cgroups are found by rescans every few seconds instead of at once"
        )
    if agent.loop_errors:
        out.append(f"the loop survived {agent.loop_errors} errors (see the log)")
    if agent.files.shrinks:
        out.append(f"out of file descriptors {agent.files.shrinks} times: keeping {agent.files.max_open} files open")
    return out


def tree_json(tree: LineageTree, cgroup: str, badness: Callable[[int], int] | None = oom_badness) -> dict[str, Any]:
    """The cgroup's lineage forest for ``cgguard tree``: every node with the seed's score (own OOM
    badness + children's scores + 1 per live child), read from /proc as the seed's killer did."""
    members, roots = tree.forest(cgroup)
    scores = seed_scores(roots, members, badness)
    nodes: dict[Record, dict[str, Any]] = {}
    for rec in postorder(roots, members):
        comm, cmdline = tree.describe(rec)
        score, family = scores[rec]
        kids = [nodes.pop(c) for c in rec.children() if c in nodes]
        kids.sort(key=lambda n: n["start_ns"])
        nodes[rec] = {
            "pid": rec.tgid,
            "start_ns": rec.start_ns,
            "comm": comm,
            "cmdline": cmdline,
            "alive": rec.alive,
            "placeholder": not rec.alive,
            "forgotten": bool(rec.flags & FORGOTTEN),
            "threads": rec.threads if rec.alive else 0,
            "family": family,
            "depth": rec.depth,
            "score": score,
            "children": kids,
        }
    return {
        "cgroup": cgroup,
        "incomplete": tree.is_incomplete(cgroup),
        "forest": [nodes[r] for r in roots if r in nodes],
    }
