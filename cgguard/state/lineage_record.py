"""State: the lineage tree's record of one process, and the per-cgroup counters the events keep.

* A record per thread group, identified by ``(tgid, start_ns)`` -- never by a bare pid, which the
  kernel recycles within seconds under a bomb.
* A record stays as a *placeholder* after its process exited while it still has children, so the
  tree of a bomb whose parents exit at once can be walked from its origin. A childless dead record
  is freed at once, and so are its ancestors that thereby become childless placeholders.

Per cgroup, :class:`CgStat` keeps what the detectors read without walking records: tracked tasks
(threads included), task births, and recent *abandonments* -- a process exiting while its
children live, the mark of ``:(){ :|:& };:`` -- with how many abandoning generations led to it.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

from cgguard.kernel import procfs

# Record.flags
STALE = 1  # exec'd since its image was last read: comm/cmdline unknown until read
FROM_PROC = 2  # made from /proc (start-up, rescan, first sight), not from a FORK event
FORGOTTEN = 4  # detached by aging (or moved out of scope) while the process may still run
FREED = 8  # removed from the tree; a stale reference to it must be ignored
IMAGE_QUEUED = 16  # its image read is queued for flush()

# Two sightings of one process from different sources (a FORK event's timestamp and /proc's
# start time in clock ticks) differ by up to one tick plus scheduling noise.
IDENTITY_TOLERANCE_NS = 3 * procfs.TICK_NS


class Record:
    """One thread group. ``alive`` means tracked and not seen exiting; a record that is not
    alive but still has children is a placeholder (the seed's ``mm == NULL``).

    Children form an intrusive doubly linked list (first_child / next_sib / prev_sib) so that
    unlinking is O(1) and a record needs no container of its own.
    """

    __slots__ = (
        "tgid",
        "start_ns",
        "parent",
        "first_child",
        "next_sib",
        "prev_sib",
        "alive",
        "exit_ns",
        "cg",  # CgStat of its cgroup
        "image",  # (comm, cmdline) if read for this very image; None: unknown or inherited
        "threads",
        "depth",
        "nforks",  # process children forked (threads not counted)
        "nlive",  # children alive now
        "last_fork_ns",
        "exec_ns",  # last exec; None while it still runs its parent's image (a clone)
        "abd",  # abandoning generations up to and including it (0: did not abandon)
        "flags",
    )

    def __init__(self, tgid: int, start_ns: int, parent: "Record | None", cg: "CgStat"):
        """A live record; with ``parent``, linked as its newest child (one live fork more).

        The linking is done here rather than by a method: a FORK event makes a record, and a
        call more per event is a cost the agent pays thousands of times a second.
        """
        self.tgid = tgid
        self.start_ns = start_ns
        self.parent = parent
        self.first_child = self.prev_sib = None
        self.alive = True
        self.exit_ns = 0
        self.cg = cg
        self.image: tuple[str | None, str | None] | None = None
        self.threads = 1
        self.nforks = self.nlive = self.last_fork_ns = self.abd = self.flags = 0
        self.exec_ns: int | None = None
        if parent is None:
            self.depth = 0
            self.next_sib = None
        else:
            self.depth = parent.depth + 1
            self.next_sib = first = parent.first_child
            if first is not None:
                first.prev_sib = self
            parent.first_child = self
            parent.nforks += 1
            parent.nlive += 1

    @property
    def identity(self) -> tuple[int, int]:
        return (self.tgid, self.start_ns)

    @property
    def cgroup(self) -> str:
        return self.cg.path

    def children(self) -> Iterator["Record"]:
        c = self.first_child
        while c is not None:
            nxt = c.next_sib
            yield c
            c = nxt

    def __repr__(self) -> str:
        state = "live" if self.alive else "placeholder"
        return f"<Record {self.tgid}@{self.start_ns} {state} depth={self.depth} {self.cg.path}>"


class CgStat:
    """Per-cgroup counters kept by the event handlers."""

    __slots__ = ("path", "members", "tasks", "births", "abandons", "loaded_start")

    def __init__(self, path: str):
        self.path = path
        self.members: set[Record] = set()
        self.tasks = 0  # threads of its tracked live records
        self.births = 0  # processes and threads created in it, cumulative
        # (time, abandoning generations, record) of recent exits that left live children.
        self.abandons: deque[tuple[int, int, Record]] = deque(maxlen=256)
        # Newest start time of a record made from /proc here: a family younger than that may
        # have members the tree knows without their lineage (orphans seen only by a scan).
        self.loaded_start = 0
