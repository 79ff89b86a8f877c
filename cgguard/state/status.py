"""The agent's status: one typed snapshot shared by ``/metrics``, ``cgguard status`` and tests.

The agent's loop builds it (it owns the state); the metrics collector reads attributes, and the
control socket sends :meth:`Status.to_dict` as JSON, which the CLI reads back with
:meth:`Status.from_dict`. Unknown keys are ignored and missing ones take defaults, so a CLI and
an agent of neighbouring versions still talk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _build(cls: type[T], d: Any) -> T:
    if not isinstance(d, dict):
        return cls()
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(slots=True)
class CgroupStatus:
    path: str = ""
    tasks: int = 0
    source: str = ""  # what counts its tasks: pids.current, or cgroup.threads across the subtree
    budget: int | None = None  # task budget the detectors measure against
    budget_source: str = ""  # where the budget comes from: v2 pids.max, v1 pids.max, default
    limit_tasks: int | None = None  # tasks charged to the limiting group (zombies included)
    pids_max: int | None = None  # the kernel limit, where there is one
    forks_refused: int | None = None  # forks refused at that limit, cumulative
    state: str = ""  # calm, active, pressure, acting, protected
    interval_ms: int = 0
    populated: bool = False
    tenant: str = ""
    workload: dict[str, Any] | None = None


@dataclass(slots=True)
class ConnectorStatus:
    mode: str = "off"  # event-filter, legacy-all, off, or why it is unavailable
    received: int = 0
    forks: int = 0
    execs: int = 0
    exits: int = 0
    other: int = 0
    overflows: int = 0  # ENOBUFS reports: the kernel dropped an unknown number of events
    lost_estimate: int = 0  # events known lost from sequence gaps (legacy mode only)
    seq_gaps: int = 0
    rescans: int = 0  # re-reads of the watched cgroups from /proc after a loss
    rcvbuf: int = 0
    socket_source: str = ""
    recv_path: str = ""  # recvmmsg (batched) or recv_into (one datagram per call)


@dataclass(slots=True)
class TrackingStatus:
    enabled: bool = False
    reset_interval_ms: int = 0
    records: int = 0
    live: int = 0
    placeholders: int = 0
    forgotten_total: int = 0
    aging_runs: int = 0
    pid_reuse: int = 0
    proc_reads: int = 0
    negative_cache: int = 0
    incomplete: list[str] = field(default_factory=list)


@dataclass(slots=True)
class IncidentsStatus:
    since_start: int = 0
    recorded: int = 0  # in the log, earlier runs included
    log: str = ""
    not_removed: dict[str, int] = field(default_factory=dict)  # runaways left running, by reason


@dataclass(slots=True)
class Status:
    ready: bool = False
    dry_run: bool = False
    cgroup_root: str = ""
    own_cgroup: str = ""
    watch: list[str] = field(default_factory=list)
    protect: list[str] = field(default_factory=list)
    cgroups: list[CgroupStatus] = field(default_factory=list)
    watched: int = 0  # all watched cgroups (``cgroups`` may list only the largest)
    by_state: dict[str, int] = field(default_factory=dict)
    connector: ConnectorStatus = field(default_factory=ConnectorStatus)
    tracking: TrackingStatus = field(default_factory=TrackingStatus)
    incidents: IncidentsStatus = field(default_factory=IncidentsStatus)
    cpu_seconds: float | None = None
    rss_bytes: int | None = None
    pid: int = 0
    samples_taken: int = 0
    inotify_overflows: int = 0
    sinks: dict[str, dict[str, int]] = field(default_factory=dict)  # counters of each incident sink
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "Status":
        s = _build(cls, d)
        s.cgroups = [_build(CgroupStatus, c) for c in (s.cgroups if isinstance(s.cgroups, list) else [])]
        s.connector = _build(ConnectorStatus, s.connector)
        s.tracking = _build(TrackingStatus, s.tracking)
        s.incidents = _build(IncidentsStatus, s.incidents)
        return s


class StatusBoard:
    """Where the loop publishes its status for other threads (HTTP, control).

    A reader asks for a status no older than ``max_age_s``; if the published one is older, the
    board asks the loop for a new one (``request``, set by the loop) and waits up to
    ``timeout_s``, else returns the last one. Readers never build a status themselves: the loop
    owns the state, and however many clients scrape, it builds at most one per ``max_age_s``.
    """

    def __init__(self) -> None:
        import threading

        self._cond = threading.Condition()
        self._status = Status()
        self._at = float("-inf")
        self._gen = 0
        self.wanted = False
        self._request: Callable[[], None] | None = None

    def bind(self, request: Callable[[], None]) -> None:
        self._request = request

    def publish(self, status: Status, at: float) -> None:
        with self._cond:
            self._status, self._at = status, at
            self._gen += 1
            self.wanted = False
            self._cond.notify_all()

    def invalidate(self) -> None:
        """Something changed that readers should see at once (an incident): the next reader asks."""
        with self._cond:
            self._at = float("-inf")

    def latest(self, max_age_s: float = 1.0, timeout_s: float = 1.0) -> Status:
        import time

        with self._cond:
            if time.monotonic() - self._at <= max_age_s or self._request is None:
                return self._status
            gen = self._gen
            if not self.wanted:
                self.wanted = True
                self._request()
            self._cond.wait_for(lambda: self._gen != gen, timeout=timeout_s)
            return self._status
