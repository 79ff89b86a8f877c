"""Process tracking: proc connector -> lineage record tree, with the seed's knobs and schedule.

It keeps the agent independent of how ingestion and the tree are built, owns the seed's aging
schedule and its two runtime knobs (``ctl tracking``, ``ctl reset-interval``), and answers the
lineage questions the agent asks (evaluate a cgroup, its worst lineage, who descends from an
origin).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Callable

from cgguard.config import Config
from cgguard.detect import Verdict
from cgguard.detect import lineage as lineage_detect
from cgguard.kernel import procconn
from cgguard.kernel.cgroupfs import CgroupFS
from cgguard.kernel.clock import MS
from cgguard.kernel.procfs import ProcStat
from cgguard.state import lineage, lineage_scan, lineage_walk
from cgguard.state.status import ConnectorStatus, TrackingStatus


class TrackingUnavailable(Exception):
    pass


class Tracking:
    def __init__(
        self,
        cfg: Config,
        fs: CgroupFS,
        in_scope: Callable[[str | None], bool],
        watched: Callable[[], list[str]] = lambda: [],
    ):
        self.cfg = cfg
        self.fs = fs
        try:
            self.conn = procconn.ProcConnector(rcvbuf=cfg.tracking.rcvbuf_mib << 20)
        except procconn.ProcConnectorUnavailable as e:
            raise TrackingUnavailable(str(e)) from None
        self.watched = watched
        p = cfg.detect.lineage
        self.tree = lineage.LineageTree(
            in_scope=in_scope,
            tracking_enabled=cfg.tracking.enabled,
            reset_interval_ns=cfg.tracking.reset_interval_ms * MS,
            abandon_window_ns=p.window_ms * MS,
        )
        self.params = p
        self.mode = self.conn.filter_mode
        self.rescans = 0
        # Forks from here on are seen (or their loss is known); processes older than this are
        # known only from /proc.
        self.since_ns = time.monotonic_ns()

    @property
    def reset_interval_ns(self) -> int:
        return self.tree.reset_interval_ns

    def fileno(self) -> int:
        return self.conn.fileno()

    def load(self, cgroups: list[str]) -> None:
        lineage_scan.load(self.tree, self.fs, cgroups)

    def drain(self, max_events: int = 8192) -> tuple[set[str], bool]:
        """Feed pending events into the tree. Returns the cgroups that saw forks, threads or
        abandonments since the last call, and whether the socket was read empty (False: more is
        queued, come back)."""
        n = self.conn.read(self.tree, max_events)
        empty = n < max_events
        self.tree.flush()
        if empty and self.tree.loss_pending:
            # Events were dropped (ENOBUFS or a sequence gap): the tree may miss forks and exits.
            # Re-read the watched cgroups from /proc once the queue is empty, so the rescan sees
            # the present and is not overtaken by queued events.
            lineage_scan.resync(self.tree, self.fs, self.watched())
            self.rescans += 1
        return self.tree.take_activity(), empty

    def adopt(self, cgroup: str) -> int:
        """Track processes found in a watched cgroup that the tree does not know."""
        return lineage_scan.adopt(self.tree, self.fs, cgroup)

    def qualifies(self, cgroup: str, now_ns: int) -> bool:
        return self.params.enabled and lineage_detect.qualifies(self.tree, cgroup, now_ns, self.params)

    def evaluate(self, cgroup: str, now_ns: int) -> Verdict | None:
        return lineage_detect.detect_lineage(self.tree, cgroup, now_ns, self.params)

    def whole(self, v: Verdict | None) -> Verdict | None:
        """``v``, marked incomplete if its origin ran before tracking began. Known only from the
        start-up /proc scan, its parent and siblings were never seen: after a late start the
        family found abandoning may be one fragment of a bomb whose other fragments (orphans,
        each a root of its own) look like unrelated older processes to a surgical kill."""
        origin = v.origin_ref if v is not None else None
        if v is None or origin is None or not v.complete or not origin.flags & lineage.FROM_PROC:
            return v
        if origin.start_ns + lineage.IDENTITY_TOLERANCE_NS >= self.since_ns:
            return v
        return replace(v, complete=False)

    def births(self, cgroup: str) -> int:
        return self.tree.births_in(cgroup)

    def tasks(self, cgroup: str) -> int:
        return self.tree.tasks_in(cgroup)

    def origin_exe(self, origin: Any) -> str | None:
        """The executable of a verdict's origin, or of a live clone of it, for allow rules."""
        for r in lineage_walk.walk(origin, lambda c: c.exec_ns is None) if origin is not None else ():
            if r.alive:
                try:
                    return os.readlink(f"/proc/{r.tgid}/exe")
                except OSError:
                    continue
        return None

    def worst_lineage(self, cgroup: str) -> Verdict | None:
        return lineage_detect.worst_lineage(self.tree, cgroup, time.monotonic_ns(), self.params)

    def member_test(self, origin_ref: Any) -> Callable[[int, ProcStat], bool | None] | None:
        """For a surgical kill: does a (frozen) process descend from the bomb's origin record?

        Asked from the action thread while the main thread may still add records; it only follows
        parent pointers, which the tree never rewrites for live records.
        """
        if origin_ref is None:
            return None
        tree, tol = self.tree, lineage.IDENTITY_TOLERANCE_NS

        def classify(pid: int, st: ProcStat) -> bool | None:
            if st.start_ns + tol < origin_ref.start_ns:
                return False  # older than the bomb: cannot descend from it
            rec = tree.get(pid)
            if rec is None or abs(rec.start_ns - st.start_ns) > tol:
                return None
            return lineage_walk.descends_from(rec, origin_ref)

        return classify

    def age(self, now_ns: int) -> int:
        return self.tree.age(now_ns)

    def after_action(self, cgroup: str) -> None:
        # The kill's exits may still be queued; a re-read of the cgroup drops what is gone now.
        lineage_scan.resync(self.tree, self.fs, [cgroup], mark_incomplete=False)

    def set_enabled(self, enabled: bool) -> None:
        self.tree.tracking_enabled = enabled

    def set_reset_interval(self, ms: int) -> None:
        self.tree.reset_interval_ns = ms * MS

    def tree_json(self, cgroup: str) -> Any:
        from .status import tree_json

        return tree_json(self.tree, cgroup)

    def status(self) -> TrackingStatus:
        s = self.tree.stats
        return TrackingStatus(
            enabled=self.tree.tracking_enabled,
            reset_interval_ms=self.tree.reset_interval_ns // MS,
            records=s.records,
            live=s.live,
            placeholders=s.placeholders,
            forgotten_total=s.forgotten_total,
            aging_runs=s.aging_runs,
            pid_reuse=s.pid_reuse,
            proc_reads=s.proc_reads,
            negative_cache=s.negative_cache,
            incomplete=list(s.incomplete),
        )

    def connector_status(self) -> ConnectorStatus:
        c = self.conn.stats
        return ConnectorStatus(
            mode=c.filter_mode,
            received=c.received,
            forks=c.forks,
            execs=c.execs,
            exits=c.exits,
            other=c.other,
            overflows=c.lost_enobufs,
            lost_estimate=c.lost_seq_estimate,
            seq_gaps=c.seq_gaps,
            rescans=self.rescans,
            rcvbuf=c.rcvbuf,
            socket_source=c.socket_source,
            recv_path=c.recv_path,
        )

    def close(self) -> None:
        self.conn.close()
