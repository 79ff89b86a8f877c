"""State: where the lineage tree keeps its records, indexed, and what the detectors ask of it.

:class:`RecordStore` holds the live records by tgid and the per-cgroup counters with an index of
each cgroup's subtree; :class:`~cgguard.state.lineage.LineageTree` builds on it and changes it
from kernel events. The queries here only read.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator

from cgguard.state.lineage_record import CgStat, Record
from cgguard.state.lineage_walk import walk, within


@dataclass
class TreeStats:
    records: int = 0
    live: int = 0
    placeholders: int = 0
    forgotten_total: int = 0
    aging_runs: int = 0
    losses: int = 0
    pid_reuse: int = 0
    proc_reads: int = 0
    image_reads_skipped: int = 0
    negative_cache: int = 0
    resights: int = 0
    incomplete: tuple[str, ...] = ()


class RecordStore:
    """Live records by tgid, per-cgroup counters by path, and the subtree index."""

    def __init__(self) -> None:
        self._live: dict[int, Record] = {}
        self._cg: dict[str, CgStat] = {}
        # cgroup -> the CgStats at or below it, in creation order (as _cg): the agent asks for a
        # cgroup's subtree on every sample, and a pass over every tracked cgroup per question
        # made a start with 10,000 watched cgroups, 1,000 of them populated, quadratic.
        self._under: dict[str, dict[str, CgStat]] = {}
        self._touched: set[CgStat] = set()
        self._nrec = 0
        self.incomplete: set[str] = set()
        self._stats = TreeStats()

    # -- the records and the cgroup index ------------------------------------------------------
    def _add(self, rec: Record) -> None:
        self._live[rec.tgid] = rec
        cg = rec.cg
        cg.members.add(rec)
        cg.tasks += rec.threads
        self._touched.add(cg)
        self._nrec += 1

    def cgstat(self, cgroup: str) -> CgStat:
        cg = self._cg.get(cgroup)
        if cg is None:
            cg = self._cg[cgroup] = CgStat(sys.intern(cgroup))
            self._index(cg)
        return cg

    @staticmethod
    def _prefixes(path: str) -> Iterator[str]:
        """The cgroup and each of its ancestors, the root ("") last."""
        while path:
            yield path
            path = path.rsplit("/", 1)[0] if "/" in path else ""
        yield ""

    def _index(self, cg: CgStat) -> None:
        for prefix in self._prefixes(cg.path):
            self._under.setdefault(prefix, {})[cg.path] = cg

    def _unindex(self, cg: CgStat) -> None:
        for prefix in self._prefixes(cg.path):
            under = self._under.get(prefix)
            if under is not None:
                under.pop(cg.path, None)
                if not under:
                    del self._under[prefix]

    # -- queries -----------------------------------------------------------------------------
    def get(self, tgid: int) -> Record | None:
        """The live record of ``tgid``, if tracked."""
        return self._live.get(tgid)

    def cgstats(self, cgroup: str, subtree: bool = True) -> list[CgStat]:
        """The CgStats of ``cgroup`` (and, with ``subtree``, below it), in creation order."""
        top = cgroup.strip("/")
        if not subtree:
            cg = self._cg.get(top)
            return [cg] if cg is not None else []
        return list(self._under.get(top, {}).values())

    def records_in(self, cgroup: str, subtree: bool = True) -> Iterator[Record]:
        """Records (live and placeholders) whose cgroup is ``cgroup`` or, with ``subtree``, below it."""
        for cg in self.cgstats(cgroup, subtree):
            yield from list(cg.members)

    def forest(self, cgroup: str, subtree: bool = True) -> tuple[set[Record], list[Record]]:
        """The cgroup's records and their roots (records whose parent is untracked or outside
        the cgroup), oldest root first."""
        members = set(self.records_in(cgroup, subtree))
        return members, sorted((r for r in members if r.parent not in members), key=lambda r: r.start_ns)

    def tasks_in(self, cgroup: str) -> int:
        """Tracked tasks (threads) of the cgroup's subtree, from the event counts."""
        return sum(cg.tasks for cg in self.cgstats(cgroup))

    def births_in(self, cgroup: str) -> int:
        return sum(cg.births for cg in self.cgstats(cgroup))

    def loaded_start(self, cgroup: str) -> int:
        """Newest start time of a process the tree knows only from /proc in the cgroup's subtree:
        a family that began before it may have members whose lineage is lost."""
        return max((cg.loaded_start for cg in self.cgstats(cgroup)), default=0)

    def is_incomplete(self, cgroup: str) -> bool:
        """True if a rescan since the last aging run touched the cgroup, its subtree or an
        ancestor: lineage lost with the events is missing there."""
        return any(within(cgroup, c) or within(c, cgroup) for c in self.incomplete)

    def live_members(self, record: Record) -> list[tuple[int, int]]:
        """Identities of the live processes of ``record``'s subtree, the record itself included."""
        return [r.identity for r in walk(record) if r.alive]

    def _all_roots(self) -> list[Record]:
        return [r for cg in self._cg.values() for r in cg.members if r.parent is None]
