"""State: walks over the lineage tree's records, cgroup containment, and the seed killer's score.

Pure functions of the records they are given, except :func:`oom_badness`, which the score takes
as its per-process weight.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from cgguard.state.lineage_record import IDENTITY_TOLERANCE_NS, Record


def descends_from(rec: Record, origin: Record) -> bool | None:
    """Does ``rec`` descend from ``origin``: True, False, or None when the tree cannot say.

    Links the tree holds are facts (a FORK event, or /proc's parent while it lived). Above a root
    record the ancestry is unknown: a root younger than the origin (a bomb's orphan first seen in
    /proc after its parent exited, or a child whose parent's fork event was lost) may well be
    one of the origin's, so it is None, never a false "innocent". A root older than the origin
    cannot descend from it.
    """
    r = rec
    while True:
        if r is origin:
            return True
        if r.parent is None:
            return False if r.start_ns + IDENTITY_TOLERANCE_NS < origin.start_ns else None
        r = r.parent


def within(cg: str, top: str, subtree: bool = True) -> bool:
    """Is cgroup ``cg`` the cgroup ``top`` or (with ``subtree``) below it? "" is the root."""
    top = top.strip("/")
    return cg == top or (subtree and (not top or cg.startswith(top + "/")))


def walk(root: Record, keep: Callable[[Record], object] | None = None) -> Iterator[Record]:
    """``root`` and its descendants, parents first; ``keep`` prunes children (and their subtrees)."""
    stack = [root]
    while stack:
        r = stack.pop()
        yield r
        c = r.first_child
        while c is not None:
            if keep is None or keep(c):
                stack.append(c)
            c = c.next_sib


def postorder(roots: Iterable[Record], within_set: set[Record] | None = None) -> Iterator[Record]:
    """Children before parents (the seed's scan order), optionally restricted to ``within_set``."""
    for root in roots:
        stack: list[tuple[Record, bool]] = [(root, False)]
        while stack:
            r, expanded = stack.pop()
            if expanded:
                yield r
                continue
            stack.append((r, True))
            c = r.first_child
            while c is not None:
                if within_set is None or c in within_set:
                    stack.append((c, False))
                c = c.next_sib


def oom_badness(tgid: int) -> int:
    """The kernel's OOM badness (/proc/PID/oom_score, 0..2000); 0 if the process is gone."""
    try:
        with open(f"/proc/{tgid}/oom_score", "rb") as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0


def seed_scores(
    roots: Iterable[Record], within_set: set[Record] | None, badness: Callable[[int], int] | None
) -> dict[Record, tuple[int, int]]:
    """The seed killer's (score, family) per record: score = own OOM badness (0 for a placeholder,
    or without ``badness``) + children's scores + 1 per live child; family = live processes
    under it. Without badness the score is the number of live descendants."""
    out: dict[Record, tuple[int, int]] = {}
    for r in postorder(roots, within_set):
        score = badness(r.tgid) if (badness is not None and r.alive) else 0
        family = 0
        c = r.first_child
        while c is not None:
            got = out.get(c)
            if got is not None:
                score += got[0] + (1 if c.alive else 0)
                family += got[1] + (1 if c.alive else 0)
            c = c.next_sib
        out[r] = (score, family)
    return out
