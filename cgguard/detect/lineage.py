"""The lineage detector: finds a self-replicating process family in the record tree.

The seed's killer scored every record (own OOM badness + children's scores + 1 per live child)
and acted on the worst one if its family (live processes under it) reached 10. That score ranks
any big family -- a build, a process pool -- as high as a bomb; it only says *which* record is
worst, not whether the family is a bomb. So the seed score here ranks candidates, and the
decision rests on what sets a fork bomb apart from parallel work:

**Self-replication across generations.** A bomb's members are copies of one program that make
more copies, which make more copies. A *replicator* is a record that forked a copy of itself (a
child that never exec'd, or exec'd into exactly its parent's comm and cmdline); the detector
measures the longest chain of replicators, each a copy of the one before. Parallel work either
execs into other programs at each level (make -> sh -> gcc -> cc1, xargs -> true; even recursive
make runs sub-makes with other arguments), so its chains are 0-1 long, or replicates a bounded
number of levels (a process pool: master -> workers; a prefork server; a bash script's nested
subshells; a worker tree of fixed depth), 1-3 long. A binary bomb needs only log2(n)
generations to reach n members, so ``min_generations`` (default 5) is reached at 20-60 live
members, long before a 256-task limit, with a margin of two generations over the deepest benign
shape we know (fan-out 5, depth 3). Placeholders count: the chain is the records', not the live
processes', so bombs whose parents exit at once are seen whole.

**Breadth.** ``min_forkers`` (default 12) distinct replicators in the chain's family: a thin
chain (a daemon that double-forks a few times) has one per generation; a binary bomb reaching 5
generations has at least 16.

**Time.** Only records whose newest child came within ``window_s`` (default 5 s) of the newest
fork in the cgroup count as replicators: replication that took minutes or hours (a supervisor
tree, a long-lived pool) is not a bomb. The window is anchored on the newest fork rather than on
``now`` so that a bomb pinned at its pids.max (forks fail, no new events) stays visible and
ingestion lag cannot hide one; it still admits a slow bomb that doubles every second. Growth
(members born per second since the first copy, doubling time) is reported, not used to decide:
a build ramps up as fast as a bomb, and only stops later.

**Family.** As in the seed, nothing under ``min_family`` (default 10) live descendants is acted on.

The origin is the top of the replicating chain: the first record that is not itself a clone of
a replicating parent. For ``bash -c 'f(){ f|f & }; f'`` that is the bash, a dead placeholder by
the time anyone looks. ``lineage`` holds the live members below it, and the origin itself when it
still runs (a fork-loop bomb's origin keeps forking).

Limits: a program that copies itself recursively by design (a parallel directory walker five
levels deep) looks like a bomb here. A fork loop that fills a small pids.max within a few
milliseconds as a wide tree only 3-4 generations deep (a C loop on a busy two-core host does)
is not flagged here: the cgroup-level fork-failure detector sees it, and :func:`worst_lineage`
names its lineage. A /proc snapshot (start-up, resync) has no placeholders, so lineage running
through exited processes before it is lost.

This module does no I/O of its own: the tree is in memory and ``badness`` is injected. The only
exception is :meth:`LineageTree.describe`, which may read /proc once for the origin's cmdline
when its exec was not read yet; the decision never depends on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from cgguard.config import LineageDetect
from cgguard.detect import Origin, Reason, Verdict
from cgguard.state.lineage import LineageTree, Record, postorder, seed_scores, walk

DETECTOR = "lineage"


@dataclass(slots=True)
class _Walk:
    """Per-record numbers of one post-order pass."""

    family: dict[Record, int]
    height: dict[Record, int]
    chain: dict[Record, int]
    forkers: dict[Record, int]


def _measure(members: set[Record], roots: list[Record], horizon: int) -> _Walk:
    w = _Walk({}, {}, {}, {})
    family, height, chain, forkers = w.family, w.height, w.chain, w.forkers
    for r in postorder(roots, members):
        forked = r.nforks > 0 and r.last_fork_ns >= horizon
        fam = h = ch = fk = 0
        copies = False
        c = r.first_child
        while c is not None:
            if c in family:
                fam += family[c] + (1 if c.alive else 0)
                if height[c] + 1 > h:
                    h = height[c] + 1
                if forked and c.cloned():
                    copies = True
                    if chain[c] > ch:
                        ch = chain[c]
                    fk += forkers[c]
            c = c.next_sib
        family[r] = fam
        height[r] = h
        # A replicator forked a copy of itself; a parent whose children all exec'd (a shell
        # running commands, a pool worker running a subprocess) only started other programs.
        replicator = forked and copies
        chain[r] = ch + 1 if replicator else 0
        forkers[r] = fk + 1 if replicator else 0
    return w


def detect_lineage(
    tree: LineageTree,
    cgroup: str,
    now_ns: int,
    params: LineageDetect = LineageDetect(),
    badness: Callable[[int], int] | None = None,
) -> Verdict | None:
    """A verdict if the records of ``cgroup`` (and its subtree) hold a self-replicating family.

    The verdict's ``cgroup`` is the smallest cgroup holding the origin and the live lineage,
    which may be below ``cgroup``: an action confined there spares the bomb's siblings."""
    # A replicating chain of min_generations leaves a fork that deep (the tree notes when, at the
    # depths the config sets): without one the cgroup cannot qualify, and the walk below is
    # skipped (the common case for builds).
    if tree.deep_forks_since(cgroup) is None and (
        tree.wide_forks_since(cgroup) is None or tree.count_in(cgroup) < params.wide_min_family
    ):
        return None
    members, roots = tree.forest(cgroup)
    if len(members) <= params.min_family:
        return None
    newest = max(r.last_fork_ns for r in members)
    horizon = newest - params.window_ms * 1_000_000
    w = _measure(members, roots, horizon)

    def qualifies(r: Record) -> bool:
        deep = w.chain[r] >= params.min_generations and w.forkers[r] >= params.min_forkers and w.family[r] >= params.min_family
        return deep or (
            w.chain[r] >= params.wide_min_generations
            and w.forkers[r] >= params.wide_min_forkers
            and w.family[r] >= params.wide_min_family
        )

    # The top of each replicating chain: a qualifying record whose parent does not qualify
    # through it (a clone of a replicating parent is part of the parent's chain).
    candidates = [
        r for r in members if qualifies(r) and not (r.parent in members and r.cloned() and qualifies(r.parent))
    ]
    if not candidates:
        return None
    scores = seed_scores(candidates, members, badness)
    origin = max(candidates, key=lambda r: (scores[r][0], w.family[r], -r.start_ns))
    score = scores[origin][0]

    # The origin and its clone descendants that forked: the self-replicating chain.
    part = list(walk(origin, lambda c: w.chain.get(c) and c.cloned()))
    starts = [r.start_ns for r in part if r is not origin]
    if origin.start_ns >= horizon:
        starts.append(origin.start_ns)
    first_sign = min(starts) if starts else origin.start_ns
    newest_here = max(r.last_fork_ns for r in part)
    family_records = list(walk(origin, members.__contains__))
    born = sum(1 for r in family_records if r.start_ns >= first_sign)
    live = [r for r in family_records if r.alive]
    span_ns = max(newest_here - first_sign, 1_000_000)
    growth_per_s = born / (span_ns / 1e9)
    doubling_ms = span_ns / 1e6 / math.log2(born) if born > 1 else None

    comm, cmdline = tree.describe(origin)
    family, depth = w.family[origin], w.height[origin]
    gens, forkers = w.chain[origin], w.forkers[origin]
    incomplete = tree.is_incomplete(cgroup)
    who = f"{comm or '?'}[{origin.tgid}]" + ("" if origin.alive else " (exited)")
    deep = gens >= params.min_generations and forkers >= params.min_forkers
    shape = "" if deep else f" (wide: {family} live descendants)"
    reasons = (
        Reason(
            "lineage-replication",
            f"{forkers} copies of {who} forked further copies over {gens} generations{shape}",
            {
                "forkers": forkers,
                "generations": gens,
                "window_ms": params.window_ms,
                "rule": "deep" if deep else "wide",
                "min_generations": params.min_generations if deep else params.wide_min_generations,
                "min_forkers": params.min_forkers if deep else params.wide_min_forkers,
            },
        ),
        Reason(
            "lineage-family",
            f"{family} live descendants, {depth} generations deep (seed score {score})",
            {"family": family, "depth": depth, "score": score, "min_family": params.min_family, "incomplete": incomplete},
        ),
        Reason(
            "lineage-growth",
            f"{born} processes in {span_ns / 1e6:.0f} ms ({growth_per_s:.0f}/s)",
            {
                "born": born,
                "span_ms": round(span_ns / 1e6, 1),
                "growth_per_s": round(growth_per_s, 1),
                "doubling_ms": None if doubling_ms is None else round(doubling_ms, 1),
            },
        ),
    )
    return _verdict(origin, (comm, cmdline), live, reasons, first_sign, now_ns, family, depth)


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
    origin: Record,
    described: tuple[str | None, str | None],
    live: list[Record],
    reasons: tuple[Reason, ...],
    first_sign_ns: int,
    now_ns: int,
    family: int,
    depth: int,
) -> Verdict:
    comm, cmdline = described
    return Verdict(
        cgroup=_smallest_cgroup([origin.cgroup, *(r.cgroup for r in live)]),
        detector=DETECTOR,
        reasons=reasons,
        tasks=sum(r.threads for r in live),
        first_sign_ns=first_sign_ns,
        at_ns=now_ns,
        origin=Origin(origin.tgid, origin.start_ns, comm, cmdline, origin.alive),
        members=frozenset(r.identity for r in live),
        family=family,
        depth=depth,
        origin_ref=origin,
    )


def worst_lineage(
    tree: LineageTree,
    cgroup: str,
    now_ns: int,
    params: LineageDetect = LineageDetect(),
    badness: Callable[[int], int] | None = None,
) -> Verdict | None:
    """The seed killer's choice alone: the worst-scoring record of the cgroup whose family
    reaches ``min_family``, with its live members, for a surgical kill after another detector
    has already decided that the cgroup holds a bomb. It decides nothing by itself: the worst
    record of a healthy build is its top make."""
    members, roots = tree.forest(cgroup)
    scores = seed_scores(roots, members, badness)
    if not scores:
        return None
    origin = max(scores, key=lambda r: (scores[r][0], scores[r][1], -r.start_ns))
    score, family = scores[origin]
    if family < params.min_family:
        return None
    family_records = list(walk(origin, members.__contains__))
    live = [r for r in family_records if r.alive]
    depth = max(r.depth for r in family_records) - origin.depth
    comm, cmdline = tree.describe(origin)
    reasons = (
        Reason(
            "lineage-worst",
            f"worst-scoring lineage: {family} live descendants of {comm or '?'}[{origin.tgid}] (seed score {score})",
            {"family": family, "depth": depth, "score": score, "min_family": params.min_family},
        ),
    )
    first_sign = min(r.start_ns for r in live) if live else origin.start_ns
    return _verdict(origin, (comm, cmdline), live, reasons, first_sign, now_ns, family, depth)
