"""Proc-connector drains: reading the connector into the lineage tree, and when.

Under steady fork load the socket turns readable for every event, and a wake-up per event costs
more than the event, so drains are coalesced: at least :data:`PROCCONN_COALESCE_NS` apart while
the lineage detector needs them soon, :data:`PROCCONN_CALM_COALESCE_NS` otherwise. The loop asks
:meth:`ConnectorDrains.due` on each readable event and, while :attr:`ConnectorDrains.hot`, waits
for :attr:`ConnectorDrains.deadline_ns` on its other sources.
"""

from __future__ import annotations

import time
from typing import Callable, Collection

from cgguard.kernel.clock import MS
from cgguard.state.watch import Node, Watcher

from .tracking import Tracking

PROCCONN_COALESCE_NS = 2 * MS
# Between drains while nothing starts in the watched cgroups and none abandons: see drain().
PROCCONN_CALM_COALESCE_NS = 10 * MS
# How long the 2 ms coalescing holds after a watched cgroup became populated or started forking:
# long enough for a bomb's first abandonments (a few ms for a shell bomb), which then keep it.
PROCCONN_FAST_HOLD_NS = 250 * MS


class ConnectorDrains:
    def __init__(self, tracking: Tracking, watcher: Watcher, clock: Callable[[], int], wake: Callable[[], None]):
        self.tracking = tracking
        self.watcher = watcher
        self.clock = clock
        self._wake = wake
        self.drained_ns = 0  # when a drain last read the socket empty
        self.last_ns = 0
        self.hot = False  # the last drain read events: drain again on the coalescing clock
        self.coalesce_ns = PROCCONN_COALESCE_NS
        self.fast_until_ns = 0

    @property
    def deadline_ns(self) -> int:
        return self.last_ns + self.coalesce_ns

    def due(self, now: int) -> bool:
        """Is a drain due now? Drains are at least the coalescing delay apart (2 ms: a bomb
        doubling every ~10 ms is seen 2 ms later at most)."""
        return now >= self.last_ns + self.coalesce_ns

    def fast(self, now: int) -> None:
        """Something starts in a watched cgroup: its first forks are drained on the 2 ms clock."""
        self.fast_until_ns = now + PROCCONN_FAST_HOLD_NS
        self.coalesce_ns = PROCCONN_COALESCE_NS

    def drain(self) -> tuple[Collection[Node], int, int]:
        """Read what is queued. Returns the watched cgroups it touched (each hinted active), the
        time after the read, and the start of the abandonment window at that time."""
        tr = self.tracking
        t = self.last_ns = self.clock()
        stats = tr.conn.stats
        before = stats.received + stats.lost_enobufs
        touched, empty = tr.drain()
        if empty:
            self.drained_ns = t
        # Events came: more are likely, so the loop drains again at the next coalescing
        # deadline instead of waking for the next datagram (see Agent.run()).
        self.hot = stats.received + stats.lost_enobufs != before
        now = self.clock()
        horizon = now - tr.params.window_ms * MS
        watcher = self.watcher
        nodes: dict[str, Node] = {}
        for cg in touched:
            node = watcher.watched_ancestor(cg)
            if node is not None:
                nodes[node.rel] = node
                if node.active_until_ns <= now:  # a calm watched cgroup forks: something starts
                    self.fast_until_ns = now + PROCCONN_FAST_HOLD_NS
                watcher.hint_active(node, now)
        # The 2 ms coalescing is for the lineage detector, which decides on abandoning families
        # a few generations deep. It holds for 250 ms after a watched cgroup became populated
        # (inotify) or a calm one started forking, and while a cgroup that forks shows
        # abandonment within the window. Otherwise -- steady builds, xargs, fork loops, and every
        # process outside the watch -- the loop drains every 10 ms: the cost of a drain is mostly
        # the wake-up itself. What can be later than before: the first fork events of something
        # starting in an already populated, calm watched cgroup while other traffic keeps the loop
        # on the 10 ms clock (at most 10 ms).
        fast = now < self.fast_until_ns or (touched and tr.tree.abandoned_recently(touched, horizon))
        self.coalesce_ns = PROCCONN_COALESCE_NS if fast else PROCCONN_CALM_COALESCE_NS
        return nodes.values(), now, horizon

    def settle(self, max_wait_s: float = 1.0) -> None:
        """Called from the action thread after a freeze: wait until the loop has read every
        proc-connector event queued before now, so the tree knows each frozen process. The cgroup
        is frozen meanwhile, so waiting costs the bomb nothing; it normally ends within a loop
        turn, and a loaded (or emulated) host needs longer than a few hundred ms."""
        t = self.clock()
        self._wake()
        deadline = time.monotonic() + max_wait_s
        while self.drained_ns < t and time.monotonic() < deadline:
            time.sleep(0.002)
