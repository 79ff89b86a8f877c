"""The lineage detector: a family that abandons its copies, generation after generation.

The seed's killer scored every record (own OOM badness + children's scores + 1 per live child)
and acted on the worst one if its family reached 10. That score ranks any big family -- a build,
a process pool -- as high as a bomb: it says *which* family, not *whether*. Shape alone does not
say it either: a bounded recursive job (a parallel merge sort, a directory walk with a subshell
per directory, a worker tree) replicates for as many generations as a young bomb does. What sets
bounded work apart is that it *waits*: a parent forks a few children and collects them, because
it needs their results, and so its family stops.

So the early verdict rests on one behaviour: **abandonment**. A member that exits while its
children run on (``:(){ :|:& };:`` -- every call forks two and returns; a setsid double fork; a
script that starts itself twice and exits) has given up control of what it started. One such
exit is a daemon starting up. The same, ``min_generations`` generations in a row (each abandoner
descending from one that abandoned before it, within ``window_ms``) with ``min_abandoners``
members doing it, is a family nobody will ever collect: a runaway, decided at a few dozen tasks.
The tree keeps these counts per cgroup as events arrive (``CgStat.abandons``); the walk below
runs only when they qualify.

Everything else -- one-parent fork loops, exec chains that wait, thread bombs -- is decided by
budget and trajectory (:mod:`cgguard.detect.cgroup`); lineage then names the origin and tells
the bomb's processes from their neighbours for a surgical kill (:func:`worst_lineage`).

The origin is found by walking up from the deepest abandoner: through parents that abandoned
too, and through clones (a child that never exec'd runs its parent's program). For
``bash -c 'f(){ f|f & }; f'`` that is the bash, a dead placeholder by the time anyone looks.

The limit, stated plainly: a bounded program that forks copies of itself which fork copies and
exit without waiting, ``min_generations`` deep, looks exactly like the classic bomb until it
stops, and is removed. Allow-list it (``allow:``) if it is yours.
"""

from __future__ import annotations

from typing import Callable

from cgguard.config import LineageDetect
from cgguard.detect import Origin, Reason, Verdict
from cgguard.kernel.clock import MS
from cgguard.kernel.procfs import TICK_NS
from cgguard.state.lineage import LineageTree
from cgguard.state.lineage_record import FREED, FROM_PROC, Record
from cgguard.state.lineage_walk import seed_scores, walk, within

DETECTOR = "lineage"


def abandonment(tree: LineageTree, cgroup: str, now_ns: int, p: LineageDetect) -> tuple[int, int, Record | None]:
    """(abandoners, deepest abandoning generation, its record) in the cgroup's subtree within the
    window: the cheap check the agent runs after each burst of events."""
    horizon = now_ns - p.window_ms * MS
    n, deepest, rec = 0, 0, None
    for cg in tree.cgstats(cgroup):
        for ts, depth, r in cg.abandons:
            if ts < horizon:
                continue
            n += 1
            if depth > deepest and not r.flags & FREED:
                deepest, rec = depth, r
    return n, deepest, rec


def qualifies(tree: LineageTree, cgroup: str, now_ns: int, p: LineageDetect) -> bool:
    n, deepest, rec = abandonment(tree, cgroup, now_ns, p)
    return rec is not None and deepest >= p.min_generations and n >= p.min_abandoners


def find_origin(rec: Record, cgroup: str) -> Record:
    """Up from an abandoner: through parents that abandoned, through clones, and through parents
    at least two of whose children abandoned theirs, while in the cgroup.

    The last is a generation of the pattern whose own exit is not heard yet (or comes later): an
    exec chain's member forks its two and exits a moment after. Stopping below it would name a
    mid-chain member the origin, and a surgical kill would spare its cousins as "innocent".
    """
    while True:
        parent = rec.parent
        if parent is None or parent.flags & FREED or not within(parent.cg.path, cgroup):
            return rec
        if not (parent.abd or rec.exec_ns is None or _replicates(parent)):
            return rec
        rec = parent


def _replicates(rec: Record, need: int = 2, look: int = 64) -> bool:
    n = 0
    c = rec.first_child
    while c is not None and look > 0:
        if c.abd:
            n += 1
            if n >= need:
                return True
        c = c.next_sib
        look -= 1
    return False


def detect_lineage(tree: LineageTree, cgroup: str, now_ns: int, p: LineageDetect = LineageDetect()) -> Verdict | None:
    """A verdict if the cgroup's subtree holds a family that abandons its copies generation after
    generation. The verdict's ``cgroup`` is the smallest cgroup holding the origin and the live
    family, which may be below ``cgroup``: an action confined there spares its siblings."""
    if not p.enabled:
        return None
    n, deepest, rec = abandonment(tree, cgroup, now_ns, p)
    if rec is None or deepest < p.min_generations or n < p.min_abandoners:
        return None
    origin = find_origin(rec, cgroup)
    family = list(walk(origin, lambda c: within(c.cg.path, cgroup)))
    live = [r for r in family if r.alive]
    if len(live) < p.min_family:
        return None
    horizon = now_ns - p.window_ms * MS
    born = [r.start_ns for r in family if r.start_ns >= horizon and r is not origin]
    first_sign = min(born) if born else origin.start_ns
    # Evidence reported beside the decision: members that keep forking rather than fork a few
    # and wait, and whether replication accelerates (births in the second half of the span
    # against the first).
    forkers = sum(1 for r in family if r.nforks)
    keeps = max((r.nlive for r in live), default=0)
    span = max(now_ns - first_sign, MS)
    mid = first_sign + span // 2
    early = sum(1 for t in born if t < mid)
    late = len(born) - early
    comm, cmdline = tree.describe(origin)
    who = f"{comm or '?'}[{origin.tgid}]" + ("" if origin.alive else " (exited)")
    depth = max(r.depth for r in family) - origin.depth
    reasons = (
        Reason(
            "lineage-abandoning-replication",
            f"{n} members of the family of {who} exited leaving their children running, "
            f"{deepest} generations in a row within {p.window_ms} ms",
            {"abandoners": n, "generations": deepest, "window_ms": p.window_ms,
             "min_generations": p.min_generations, "min_abandoners": p.min_abandoners},
        ),
        Reason(
            "lineage-family",
            f"{len(live)} live members, {len(born)} born in {span / MS:.0f} ms ({late} in the second half vs {early} "
            f"in the first), {forkers} forked, at most {keeps} live children under one member, {depth} generations deep",
            {"family": len(live), "born": len(born), "span_ms": round(span / MS, 1), "accelerating": late > early,
             "forkers": forkers, "max_live_children": keeps, "depth": depth},
        ),
    )
    return _verdict(tree, origin, (comm, cmdline), live, reasons, first_sign, now_ns, len(live), depth, "lineage")


def _smallest_cgroup(cgroups: list[str]) -> str:
    """The deepest cgroup that holds all of ``cgroups``: where an action on the lineage can be
    confined (the evaluated cgroup may also hold innocent siblings)."""
    parts = [c.split("/") if c else [] for c in set(cgroups)]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common)


def _verdict(
    tree: LineageTree,
    origin: Record,
    described: tuple[str | None, str | None],
    live: list[Record],
    reasons: tuple[Reason, ...],
    first_sign_ns: int,
    now_ns: int,
    family: int,
    depth: int,
    evidence: str,
) -> Verdict:
    comm, cmdline = described
    where = _smallest_cgroup([origin.cg.path, *(r.cg.path for r in live)])
    return Verdict(
        cgroup=where,
        detector=DETECTOR,
        reasons=reasons,
        tasks=sum(r.threads for r in live),
        first_sign_ns=first_sign_ns,
        at_ns=now_ns,
        evidence=evidence,
        complete=_complete(tree, where, origin),
        origin=Origin(origin.tgid, origin.start_ns, comm, cmdline, origin.alive),
        members=frozenset(r.identity for r in live),
        family=family,
        depth=depth,
        origin_ref=origin,
    )


def _complete(tree: LineageTree, where: str, origin: Record) -> bool:
    """Is the family known whole? Not if the cgroup holds a process of unknown ancestry -- a
    root record (parent never seen or exited before it was), known only from /proc -- young
    enough to belong to it: a surgical kill would spare it as a neighbour. Nor after lost events.
    A record sighted from /proc but linked to a tracked parent is as good as one from events."""
    if tree.is_incomplete(where):
        return False
    # /proc start times are whole clock ticks: one tick before the origin may still be younger.
    lo = origin.start_ns - TICK_NS
    if tree.loaded_start(where) < lo:
        return True
    return not any(
        r.flags & FROM_PROC and r.parent is None and r is not origin and r.start_ns >= lo for r in tree.records_in(where)
    )


def worst_lineage(
    tree: LineageTree,
    cgroup: str,
    now_ns: int,
    p: LineageDetect = LineageDetect(),
    badness: Callable[[int], int] | None = None,
) -> Verdict | None:
    """The seed killer's choice alone: the worst-scoring record of the cgroup whose family
    reaches ``min_family``, with its live members, to name the origin and remove it surgically
    after another detector decided that the cgroup holds a runaway. It decides nothing by
    itself: the worst record of a healthy build is its top make."""
    members, roots = tree.forest(cgroup)
    scores = seed_scores(roots, members, badness)
    if not scores:
        return None
    origin = max(scores, key=lambda r: (scores[r][0], scores[r][1], -r.start_ns))
    score, family = scores[origin]
    if family < p.min_family:
        return None
    family_records = list(walk(origin, members.__contains__))
    live = [r for r in family_records if r.alive]
    depth = max(r.depth for r in family_records) - origin.depth
    comm, cmdline = tree.describe(origin)
    reasons = (
        Reason(
            "lineage-worst",
            f"largest family: {family} live descendants of {comm or '?'}[{origin.tgid}], {depth} generations deep",
            {"family": family, "depth": depth, "score": score, "badness_read": badness is not None,
             "min_family": p.min_family},
        ),
    )
    first_sign = min(r.start_ns for r in live) if live else origin.start_ns
    return _verdict(tree, origin, (comm, cmdline), live, reasons, first_sign, now_ns, family, depth, "lineage")
