"""State: aging the lineage tree, the seed's ``reset_mm_tracking``.

Every ``reset_interval`` the tree forgets records older than the interval, only if the system
looked calm since the last run (no more processes, no kswapd run, no allocation stall).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping

from cgguard.state.lineage_record import FREED
from cgguard.state.lineage_walk import postorder

if TYPE_CHECKING:
    from cgguard.state.lineage import LineageTree


def read_vmstat(path: str = "/proc/vmstat") -> dict[str, int]:
    """/proc/vmstat as a dict (the aging check needs pageoutrun and allocstall*)."""
    out: dict[str, int] = {}
    with open(path, "rb") as f:
        for line in f.read().decode().splitlines():
            k, _, v = line.partition(" ")
            if v:
                out[k] = int(v)
    return out


def nr_processes(proc_root: str = "/proc") -> int:
    """Thread-group leaders in the system, like the kernel's nr_processes()."""
    return sum(1 for n in os.listdir(proc_root) if n.isdigit())


class CalmCheck:
    """What the system looked like at the last aging run, to tell whether it stayed calm."""

    __slots__ = ("nr", "pageout", "allocstall")

    def __init__(self) -> None:
        self.nr = 0
        self.pageout = 0
        self.allocstall = 0

    def calm(self, nr: int, vm: Mapping[str, int]) -> bool:
        """True if the number of processes did not grow, kswapd did not run (pageoutrun) and no
        allocation stalled (allocstall*, summed) since the last call; the remembered values are
        updated either way."""
        forget = nr <= self.nr
        self.nr = nr
        pageout = int(vm.get("pageoutrun", 0))
        forget = forget and pageout == self.pageout
        self.pageout = pageout
        stall = sum(int(v) for k, v in vm.items() if k.startswith("allocstall"))
        forget = forget and stall == self.allocstall
        self.allocstall = stall
        return forget


def age(tree: LineageTree, now: int, nr: int, vm: Mapping[str, int]) -> int:
    """One aging run (see :meth:`LineageTree.age`). Returns the number of records forgotten."""
    forget = tree._calm.calm(nr, vm)
    tree._stats.aging_runs += 1
    tree.incomplete.clear()
    # Scope may have changed and pids were recycled: start the negative families afresh.
    tree._neg.clear()
    for cg in list(tree._cg.values()):
        while cg.abandons and cg.abandons[0][0] < now - tree.abandon_window_ns:
            cg.abandons.popleft()
        if not cg.members and not cg.abandons:
            del tree._cg[cg.path]
            tree._unindex(cg)
    if not forget:
        return 0
    thresh = now - tree.reset_interval_ns
    before = tree._nrec
    kept = []  # detached processes whose records stay as placeholders
    for rec in list(postorder(tree._all_roots())):
        if rec.flags & FREED or rec.start_ns >= thresh:
            continue
        if rec.alive:
            tree._detach(rec)
            kept.append(rec)
        elif rec.first_child is None:
            tree._free(rec)
    # Freed records (with the placeholders freed on the way up) and detached ones.
    forgotten = before - tree._nrec + sum(1 for r in kept if not r.flags & FREED)
    tree._stats.forgotten_total += forgotten
    return forgotten
