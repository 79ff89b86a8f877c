"""Text output of ``cgguard status``, ``tree`` and ``incidents`` (``--json`` prints the data as is).

What is shown comes partly from tenants (cgroup names, command lines): :func:`printable` keeps
their control characters from reaching the terminal.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the commands that print no status need not import it
    from cgguard.state.status import Status


def print_status(st: Status) -> None:
    """The agent's status: a summary, its notes, then one row per watched cgroup."""
    pc, tr = st.connector, st.tracking
    print(f"cgroup2 root: {st.cgroup_root}   ready: {st.ready}   dry run: {st.dry_run}")
    print(f"watch: {', '.join(st.watch)}   protect: {', '.join(st.protect) or '-'}")
    print(
        f"proc connector: {pc.mode}  received {pc.received}  overflows {pc.overflows}  rescans {pc.rescans}   "
        f"lineage records: {tr.records} (live {tr.live}, placeholders {tr.placeholders})"
    )
    print(f"incidents: {st.incidents.since_start} since start, {st.incidents.recorded} recorded   log: {st.incidents.log}")
    for note in st.notes:
        print(f"note: {note}")
    rows = [("CGROUP", "TASKS", "MAX", "STATE", "SOURCE", "WORKLOAD")]
    for c in st.cgroups:
        wl = c.workload or {}
        rows.append(
            (c.path, str(c.tasks), "-" if c.pids_max is None else str(c.pids_max), c.state, c.source, wl.get("summary") or wl.get("kind") or "")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())


def _print_forest(nodes: list[dict[str, Any]], indent: int = 0) -> None:
    for n in nodes:
        mark = "" if n.get("alive", True) else " [placeholder]"
        cmd = n.get("cmdline") or n.get("comm") or "?"
        print(
            f"{'  ' * indent}{n.get('pid')} {cmd[:80]}{mark}  family={n.get('family')} depth={n.get('depth')} "
            f"score={n.get('score')} threads={n.get('threads')}"
        )
        _print_forest(n.get("children", []), indent + 1)


def print_tree(tree: Any, cgroup: str) -> None:
    """The lineage forest the agent sent for ``cgroup`` ("" for every watched cgroup)."""
    forest = tree.get("forest", tree) if isinstance(tree, dict) else tree
    if not forest:
        print(f"no tracked processes in {cgroup or 'the watched cgroups'}")
    _print_forest(forest if isinstance(forest, list) else [forest])


def print_incidents(items: list[dict[str, Any]]) -> None:
    """One line per incident, then its budget, reasons and notes indented below it."""
    # The reader checked each record's shape; the text is still the tenants' (cgroup names,
    # command lines), so nothing reaches the terminal unescaped.
    for it in items:
        origin = it.get("origin") or {}
        o = ""
        if origin:
            cmd = origin.get("cmdline") or origin.get("comm")
            o = f" origin {printable(origin.get('pid'))} {printable(cmd)}{'' if origin.get('alive') else ' (dead)'}"
        evidence = f" ({printable(it['evidence'])})" if it.get("evidence") else ""
        dry = " [dry run]" if it.get("dry_run") else ""
        print(
            f"{printable(it.get('time_iso', ''))} {printable(it['id'])} {printable(it['cgroup'])}"
            f" {printable(it.get('detector'))}{evidence}"
            f" -> {printable(it['action'])}: {printable(it['result'])}{dry}"
            f" tasks {it.get('tasks_at_detection')} peak {it.get('peak_tasks')} detect {it.get('detect_ms')} ms"
            f" remove {it.get('remove_ms')} ms survivors {it.get('survivors')}{o}"
        )
        if it.get("budget") is not None or it.get("tenant"):
            source, tenant = printable(it.get("budget_source") or "?"), printable(it.get("tenant") or "?")
            print(f"    budget {it.get('budget')} ({source}), tenant {tenant}")
        for r in it.get("reasons") or []:
            print(f"    {printable(r.get('rule'))}: {printable(r.get('detail'))}")
        for n in it.get("notes") or []:
            print(f"    note: {printable(n)}")


def printable(v: Any, limit: int = 4096) -> str:
    """One printable line: control characters (escape sequences, newlines) shown escaped."""
    s = v if isinstance(v, str) else str(v) if v is None or isinstance(v, (int, float)) else json.dumps(v, default=str)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s if len(s) <= limit else s[:limit] + "..."
