"""The agent's view of lineage: proc connector -> record tree -> lineage detector, in one object.

It keeps the agent independent of how ingestion and the tree are built, and owns the seed's
aging schedule and runtime knobs.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from cgguard.kernel.cgroupfs import CgroupFS
from cgguard.config import Config
from cgguard.detect import Verdict

MS = 1_000_000


class LineageUnavailable(Exception):
    pass


class LineageSource:
    def __init__(
        self,
        cfg: Config,
        fs: CgroupFS,
        in_scope: Callable[[str | None], bool],
        watched: Callable[[], list[str]] = lambda: [],
    ):
        try:
            from cgguard.state import lineage as lineage_mod
            from cgguard.kernel import procconn
            from cgguard.detect import lineage as lineage_detect
        except ImportError as e:
            raise LineageUnavailable(f"lineage modules missing: {e}") from None
        self._detect = lineage_detect
        self._lineage = lineage_mod
        self.cfg = cfg
        self.fs = fs
        try:
            self.conn = procconn.ProcConnector(rcvbuf=cfg.lineage.rcvbuf_mib << 20)
        except procconn.ProcConnectorUnavailable as e:
            raise LineageUnavailable(str(e)) from None
        self.watched = watched
        self.tree = lineage_mod.LineageTree(in_scope=in_scope, fs=fs)
        self.tree.tracking_enabled = cfg.lineage.tracking
        self.tree.reset_interval_ns = cfg.lineage.reset_interval_ms * MS
        self.params = lineage_detect.LineageParams.from_config(cfg.detect.lineage)
        self.mode = getattr(self.conn.stats, "filter_mode", "on")

    @property
    def reset_interval_ns(self) -> int:
        return self.tree.reset_interval_ns

    def fileno(self) -> int:
        return self.conn.fileno()

    def load(self, cgroups: list[str]) -> None:
        self.tree.load_from_proc(cgroups)

    def drain(self, max_events: int = 8192) -> tuple[set[str], bool]:
        """Feed pending events into the tree. Returns the cgroups that saw forks since the last
        call, and whether the socket was read empty (False: more is queued, come back)."""
        n = self.conn.read(self.tree, max_events)
        empty = n < max_events
        if empty and self.tree.loss_pending:
            # Events were dropped (ENOBUFS or a sequence gap): the tree may miss forks and exits.
            # Re-read the watched cgroups from /proc once the queue is empty, so the resync sees
            # the present and is not overtaken by queued events.
            self.tree.resync(self.watched())
        return self.tree.take_activity(), empty

    def evaluate(self, cgroup: str, now_ns: int) -> Verdict | None:
        return self._detect.detect_lineage(self.tree, cgroup, now_ns, self.params)

    def worst_lineage(self, cgroup: str) -> Verdict | None:
        return self._detect.worst_lineage(self.tree, cgroup, time.monotonic_ns(), self.params)

    def member_test(self, origin_ref: Any) -> Callable[[int, Any], bool | None] | None:
        """For a surgical kill: does a (frozen) process descend from the bomb's origin record?

        Asked from the action thread while the main thread may still add records; it only follows
        parent pointers, which the tree never rewrites for live records.
        """
        if origin_ref is None:
            return None
        tree, tol = self.tree, self._lineage.IDENTITY_TOLERANCE_NS

        def classify(pid: int, st: Any) -> bool | None:
            if st.start_ns + tol < origin_ref.start_ns:
                return False  # older than the bomb: cannot descend from it
            rec = tree.get(pid)
            if rec is None or abs(rec.start_ns - st.start_ns) > tol:
                return None
            r = rec
            while r is not None:
                if r is origin_ref:
                    return True
                r = r.parent
            return False

        return classify

    def age(self, now_ns: int) -> int:
        return self.tree.age(now_ns)

    def after_action(self, cgroup: str) -> None:
        self.tree.resync([cgroup])

    def set_tracking(self, enabled: bool) -> None:
        self.tree.tracking_enabled = enabled

    def set_reset_interval(self, ms: int) -> None:
        self.tree.reset_interval_ns = ms * MS

    def tree_json(self, cgroup: str) -> Any:
        return self.tree.to_json(cgroup)

    def stats(self) -> dict[str, Any]:
        s = self.tree.stats_dict()
        s["tracking"] = self.tree.tracking_enabled
        s["reset_interval_ms"] = self.tree.reset_interval_ns // MS
        return s

    def procconn_stats(self) -> dict[str, Any]:
        d = self.conn.stats_dict()
        d["resyncs"] = self.tree.stats.resyncs
        return d

    def close(self) -> None:
        self.conn.close()
