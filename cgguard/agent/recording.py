"""Incidents out: the incident log, the sinks, the counts the status shows, and the workload
attribution (pod, unit, container) that incidents and the status carry."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Protocol

from cgguard.attribution import attribute
from cgguard.sinks.incidents import Incident, IncidentLog, IncidentLogError
from cgguard.state.status import StatusBoard

log = logging.getLogger("cgguard.agent")


class IncidentSink(Protocol):
    """Told about every incident twice: when detected, and with its result."""

    def incident(self, inc: Incident) -> None: ...


class Recorder:
    """Writes each incident to the log and hands it to every sink; neither may stop the agent."""

    def __init__(self, incidents: IncidentLog, sinks: Iterable[IncidentSink], board: StatusBoard):
        self.log = incidents
        self.sinks = list(sinks)
        self.board = board
        self.since_start = 0
        self.recorded = 0
        self.not_removed: dict[str, int] = {}

    def count_logged(self) -> None:
        """Start the count of recorded incidents from what the (open, recovered) log holds."""
        self.recorded = self.log.count()

    def record(self, inc: Incident, final: bool, unremoved: str | None = None) -> None:
        try:
            self.log.append(inc)
        except IncidentLogError as e:
            log.error("incident log: %s", e)
        if final:
            self.since_start += 1
            self.recorded += 1
            if unremoved:
                self.not_removed[unremoved] = self.not_removed.get(unremoved, 0) + 1
            self.board.invalidate()
        for sink in self.sinks:
            try:
                sink.incident(inc)
            except Exception:  # a sink must never stop the agent
                log.exception("incident sink %r failed", sink)


class Workloads:
    """Whose workload a cgroup is, read once per cgroup and dropped with it."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, Any] | None] = {}

    def get(self, rel: str) -> dict[str, Any] | None:
        if rel in self._cache:
            return self._cache[rel]
        try:
            wl: dict[str, Any] | None = attribute(rel).to_dict()
        except Exception:  # attribution must never stop an action
            log.exception("attribution of %s failed", rel)
            wl = None
        if len(self._cache) > 100_000:
            self._cache.clear()  # cgroups come and go; keep the cache bounded
        self._cache[rel] = wl
        return wl

    def forget(self, rel: str) -> None:
        self._cache.pop(rel, None)
