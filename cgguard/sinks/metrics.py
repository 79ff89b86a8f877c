"""Prometheus metrics of the agent.

Two sources, so the hot path pays nothing for metrics it does not produce:

* **events** (:meth:`Metrics.incident`) update counters and histograms as they happen;
* **state** (gauges, and counters the agent already keeps, such as proc connector events) is read
  from the status the agent publishes (:class:`~cgguard.state.status.StatusBoard`) by a custom
  collector, only when someone scrapes ``/metrics``.

The exposition (Prometheus text format, or OpenMetrics when the scraper asks for it) is written
by :mod:`cgguard.sinks.exposition` rather than by prometheus_client, whose RSS the agent saves.
The state of each :class:`Metrics` is its own, so tests and an agent restarted in-process never
see each other's series.

Cardinality is bounded: ``cgguard_cgroup_tasks`` has one series per cgroup only for the
``top_n`` (default 50) cgroups with the most tasks; the rest are summed into one series whose
``cgroup`` and ``workload_kind`` labels are ``_other``. A node with thousands of cgroups thus
exports at most ``top_n + 1`` such series, and the biggest cgroups, where a bomb shows, are
always among them. Every other label set is drawn from a fixed vocabulary.

``METRICS`` lists every family with its type, labels and help; the collector takes its help
texts from there and :func:`reference_markdown` renders it for the README (a test checks that
the two agree with a real scrape).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cgguard import __version__
from cgguard.attribution import KINDS, LABEL_NAMES, attribute
from cgguard.sinks.exposition import CONTENT_TYPE_LATEST, Metric, encode, go_float, negotiate
from cgguard.sinks.incidents import Incident
from cgguard.state.status import CgroupStatus, Status, StatusBoard

log = logging.getLogger(__name__)

TOP_CGROUPS = 50
_PAGE = os.sysconf("SC_PAGE_SIZE")
OTHER = "_other"

# The (action, result) pairs the agent produces (cgguard.act, cgguard.agent), pre-initialised
# to 0 so that the first incident shows as an increase (rate() and increase() need a sample
# before it). Dry runs, protected cgroups and an exhausted kill budget are action "report".
# Pairs outside this table are still counted; they just start at their first event.
OUTCOMES: dict[str, tuple[str, ...]] = {
    "kill-cgroup": ("removed", "gone", "timeout", "failed", "interrupted"),
    "kill-lineage": ("removed", "gone", "timeout", "failed", "not-found", "interrupted"),
    "freeze": ("frozen", "gone", "timeout", "failed", "interrupted"),
    "report": ("reported", "refused", "allowed"),
}
# Why a runaway was not removed: cgguard_incidents_not_removed_total{reason}.
NOT_REMOVED_REASONS: tuple[str, ...] = ("dry-run", "protected", "budget", "allowed", "report-only", "failed")
# The incident sinks besides the log, and what each counts (cgguard.sinks.build_sinks).
SINK_RESULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "journal": ("cgguard_journal_entries_total", ("sent", "failed")),
    "hooks": ("cgguard_hook_runs_total", ("ok", "failed", "timeout", "dropped")),
    "webhook": ("cgguard_webhook_deliveries_total", ("delivered", "failed", "dropped")),
}
ACTIONS: tuple[str, ...] = tuple(OUTCOMES)
RESULTS: tuple[str, ...] = tuple(dict.fromkeys(r for rs in OUTCOMES.values() for r in rs))

# Detection of a bomb takes from a few ms (the lineage detector under a fast bomb) to seconds
# (saturation holds); removal from ms (cgroup.kill of a small tree) to remove_timeout_ms (15 s).
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_CGROUP_LABELS: tuple[str, ...] = ("cgroup", *LABEL_NAMES)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # as exposed (counters with _total)
    type: str
    labels: tuple[str, ...]
    help: str
    source: str  # "status" (read at scrape time), "event" or "process"


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("cgguard_build_info", "gauge", ("version", "python", "kernel"), "Build and host information; always 1.", "process"),
    MetricSpec("cgguard_ready", "gauge", (), "1 once the agent watches every configured cgroup and reads the proc connector (as /readyz).", "status"),
    MetricSpec("cgguard_dry_run", "gauge", (), "1 if the agent only detects and records, never acts.", "status"),
    MetricSpec("cgguard_watched_cgroups", "gauge", (), "Cgroups currently watched.", "status"),
    MetricSpec("cgguard_cgroups_by_state", "gauge", ("state",), "Watched cgroups per detector state.", "status"),
    MetricSpec("cgguard_cgroup_tasks", "gauge", _CGROUP_LABELS,
               f"Tasks (threads) per watched cgroup: the largest (top {TOP_CGROUPS} by default), the rest summed into cgroup=\"{OTHER}\".", "status"),
    MetricSpec("cgguard_cgroup_pids_max", "gauge", _CGROUP_LABELS, "pids.max of the cgroups exported in cgguard_cgroup_tasks, where set.", "status"),
    MetricSpec("cgguard_incidents_total", "counter", ("action", "result"), "Bombs acted on (or reported) since the agent started.", "event"),
    MetricSpec("cgguard_incidents_not_removed_total", "counter", ("reason",),
               "Runaways found and left running (reported or frozen instead), by why: dry-run, protected, budget, allowed, report-only, failed.", "status"),
    MetricSpec("cgguard_incidents_by_kind_total", "counter", ("workload_kind",), "Incidents per kind of workload owning the cgroup.", "event"),
    MetricSpec("cgguard_last_incident_timestamp_seconds", "gauge", (), "Unix time of the last incident (0: none since start).", "event"),
    MetricSpec("cgguard_incidents_recorded", "gauge", (), "Incidents in the state directory's record, including earlier runs.", "status"),
    MetricSpec("cgguard_detection_latency_seconds", "histogram", (), "From the first sign of growth to the verdict.", "event"),
    MetricSpec("cgguard_removal_latency_seconds", "histogram", (), "From the verdict to the cgroup (or lineage) being empty.", "event"),
    MetricSpec("cgguard_procconn_info", "gauge", ("mode",), "Proc connector mode (e.g. filtered, all, off); always 1.", "status"),
    MetricSpec("cgguard_procconn_events_received_total", "counter", (), "Proc connector events read.", "status"),
    MetricSpec("cgguard_procconn_overflows_total", "counter", (), "Receive-queue overflows (ENOBUFS): the kernel dropped an unknown number of events.", "status"),
    MetricSpec("cgguard_procconn_events_lost_total", "counter", (), "Events known to be lost from per-CPU sequence gaps (without the event filter only; a lower bound).", "status"),
    MetricSpec("cgguard_procconn_rescans_total", "counter", (), "Re-reads of the watched cgroups from /proc after events were lost.", "status"),
    MetricSpec("cgguard_inotify_overflows_total", "counter", (), "inotify queue overflows; each one makes the agent rescan the watched tree.", "status"),
    MetricSpec("cgguard_journal_entries_total", "counter", ("result",), "Incidents written to the systemd journal: sent, failed.", "status"),
    MetricSpec("cgguard_hook_runs_total", "counter", ("result",), "Incident hook commands run: ok, failed (non-zero exit), timeout (killed), dropped (queue full).", "status"),
    MetricSpec("cgguard_webhook_deliveries_total", "counter", ("result",), "Incident webhook deliveries: delivered, failed (after retries), dropped (queue full).", "status"),
    MetricSpec("cgguard_lineage_tracking", "gauge", (), "1 while lineage tracking is enabled.", "status"),
    MetricSpec("cgguard_lineage_reset_interval_seconds", "gauge", (), "Aging interval (the seed's reset_interval).", "status"),
    MetricSpec("cgguard_lineage_records", "gauge", (), "Lineage records held, live and placeholders.", "status"),
    MetricSpec("cgguard_lineage_live_processes", "gauge", (), "Tracked processes that are alive.", "status"),
    MetricSpec("cgguard_lineage_placeholders", "gauge", (), "Records of exited processes kept for their children.", "status"),
    MetricSpec("cgguard_lineage_aging_runs_total", "counter", (), "Aging runs.", "status"),
    MetricSpec("cgguard_lineage_records_forgotten_total", "counter", (), "Records forgotten by aging.", "status"),
    MetricSpec("cgguard_agent_cpu_seconds_total", "counter", (), "CPU time (user + system) used by the agent process.", "process"),
    MetricSpec("cgguard_agent_resident_memory_bytes", "gauge", (), "Resident memory of the agent process.", "process"),
    MetricSpec("cgguard_status_errors_total", "counter", (), "Scrapes where reading the agent's status failed; state metrics were skipped.", "process"),
)
_HELP = {m.name: m.help for m in METRICS}

def _family(name: str, typ: str, labels: Iterable[str] = ()) -> Metric:
    """A family of METRICS by its exposed name (counters with _total)."""
    return Metric(name.removesuffix("_total") if typ == "counter" else name, typ, _HELP[name], labels=tuple(labels))


def _gauge(name: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        fam = _family(name, "gauge")
        fam.add_metric((), value)
        yield fam


def _counter(name: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        fam = _family(name, "counter")
        fam.add_metric((), value)
        yield fam


def _cgroup_labels(c: CgroupStatus) -> list[str]:
    wd = c.workload
    if isinstance(wd, dict) and wd.get("kind"):
        labels = {k: wd.get(k) for k in ("kind", "name", "pod_uid", "container_id", "qos", "runtime")}
        labels["workload_kind"], labels["workload"] = labels.pop("kind"), labels.pop("name")
    else:
        labels = dict(attribute(c.path).labels())  # cached: cheap on every scrape
    return [c.path, *(str(labels.get(k) or "") for k in LABEL_NAMES)]


def top_cgroups(cgroups: Iterable[CgroupStatus], top_n: int) -> tuple[list[CgroupStatus], int, int]:
    """The ``top_n`` cgroups by tasks (ties by path, so scrapes are stable) and the rest summed.

    Returns (top entries, tasks of the rest, number of the rest).
    """
    ordered = sorted(cgroups, key=lambda c: (-c.tasks, c.path))
    rest = ordered[top_n:]
    return ordered[:top_n], sum(c.tasks for c in rest), len(rest)


class _StatusCollector:
    """Builds the state metrics from the latest published status, once per scrape."""

    def __init__(self, board: StatusBoard, top_n: int):
        self._board = board
        self._top_n = top_n
        self._errors = 0
        self._build = {"version": __version__, "python": platform.python_version(), "kernel": os.uname().release}

    def collect(self) -> Iterator[Metric]:
        # A gauge fixed at 1 (the text format has no info type): join on it for versions.
        info = _family("cgguard_build_info", "gauge", self._build)
        info.add_metric(list(self._build.values()), 1.0)
        yield info
        yield from self._process()
        try:
            st: Status | None = self._board.latest()
        except Exception:  # a broken status must not take /metrics down with it
            self._errors += 1
            log.exception("metrics: reading the status failed")
            st = None
        yield from _counter("cgguard_status_errors_total", self._errors)
        if st is not None:
            yield from self._state(st)

    def _process(self) -> Iterator[Metric]:
        # getrusage and /proc/self/statm: psutil's figures, without psutil in the agent (RSS).
        try:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            with open("/proc/self/statm", "rb") as f:
                rss = int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            return
        yield from _counter("cgguard_agent_cpu_seconds_total", ru.ru_utime + ru.ru_stime)
        yield from _gauge("cgguard_agent_resident_memory_bytes", rss)

    def _state(self, st: Status) -> Iterator[Metric]:
        yield from _gauge("cgguard_ready", 1.0 if st.ready else 0.0)
        yield from _gauge("cgguard_dry_run", 1.0 if st.dry_run else 0.0)
        yield from _gauge("cgguard_incidents_recorded", float(st.incidents.recorded))
        yield from self._cgroups(st)
        pc = st.connector
        fam = _family("cgguard_procconn_info", "gauge", ["mode"])
        fam.add_metric([pc.mode], 1.0)
        yield fam
        yield from _counter("cgguard_procconn_events_received_total", float(pc.received))
        yield from _counter("cgguard_procconn_overflows_total", float(pc.overflows))
        yield from _counter("cgguard_procconn_events_lost_total", float(pc.lost_estimate))
        yield from _counter("cgguard_procconn_rescans_total", float(pc.rescans))
        yield from _counter("cgguard_inotify_overflows_total", float(st.inotify_overflows))
        nr = _family("cgguard_incidents_not_removed_total", "counter", ["reason"])
        for reason in sorted(set(NOT_REMOVED_REASONS) | set(st.incidents.not_removed)):
            nr.add_metric([reason], float(st.incidents.not_removed.get(reason, 0)))
        yield nr
        for sink, (name, results) in SINK_RESULTS.items():
            counts = st.sinks.get(sink)
            if counts is None:
                continue  # not configured: no series
            fam = _family(name, "counter", ["result"])
            for r in results:
                fam.add_metric([r], float(counts.get(r, 0)))
            yield fam
        tr = st.tracking
        yield from _gauge("cgguard_lineage_tracking", 1.0 if tr.enabled else 0.0)
        yield from _gauge("cgguard_lineage_reset_interval_seconds", tr.reset_interval_ms / 1000.0)
        yield from _gauge("cgguard_lineage_records", float(tr.records))
        yield from _gauge("cgguard_lineage_live_processes", float(tr.live))
        yield from _gauge("cgguard_lineage_placeholders", float(tr.placeholders))
        yield from _counter("cgguard_lineage_aging_runs_total", float(tr.aging_runs))
        yield from _counter("cgguard_lineage_records_forgotten_total", float(tr.forgotten_total))

    def _cgroups(self, st: Status) -> Iterator[Metric]:
        yield from _gauge("cgguard_watched_cgroups", float(st.watched))
        by_state = _family("cgguard_cgroups_by_state", "gauge", ["state"])
        for state, n in sorted(st.by_state.items()):
            by_state.add_metric([state], float(n))
        yield by_state
        top, rest_tasks, rest_n = top_cgroups(st.cgroups, self._top_n)
        tasks = _family("cgguard_cgroup_tasks", "gauge", _CGROUP_LABELS)
        pmax = _family("cgguard_cgroup_pids_max", "gauge", _CGROUP_LABELS)
        seen: set[tuple[str, ...]] = set()
        for c in top:
            labels = _cgroup_labels(c)
            if tuple(labels) in seen:  # a duplicate path in the status would be an invalid exposition
                continue
            seen.add(tuple(labels))
            tasks.add_metric(labels, float(c.tasks))
            if c.pids_max is not None:
                pmax.add_metric(labels, float(c.pids_max))
        if rest_n:
            tasks.add_metric([OTHER, OTHER, *([""] * (len(LABEL_NAMES) - 1))], float(rest_tasks))
        yield tasks
        yield pmax


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, +Inf last
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, le in enumerate(LATENCY_BUCKETS):
            if v <= le:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += v

    def family(self, name: str) -> Metric:
        fam = _family(name, "histogram")
        acc = 0
        for le, n in zip((*LATENCY_BUCKETS, math.inf), self.counts):
            acc += n
            fam.samples.append((f"{name}_bucket", (("le", go_float(le)),), float(acc)))
        fam.samples.append((f"{name}_count", (), float(acc)))
        fam.samples.append((f"{name}_sum", (), self.sum))
        return fam


class Metrics:
    """The agent's metrics: incident counters (an incident sink) and the status collector.

    ``incident`` runs on the agent's loop, ``render`` on an HTTP thread: a lock keeps a render
    from seeing a counter half-updated or a label set being added.
    """

    def __init__(self, board: StatusBoard, top_n: int = TOP_CGROUPS):
        if top_n < 1:
            raise ValueError("top_n must be at least 1")
        self._lock = threading.Lock()
        # Every (action, result) and kind the agent produces is exported from the start at 0, so
        # the first incident shows as an increase.
        self._incidents: dict[tuple[str, str], float] = {(a, r): 0.0 for a, rs in OUTCOMES.items() for r in rs}
        self._by_kind: dict[str, float] = dict.fromkeys(KINDS, 0.0)
        self._last_incident = 0.0
        self._detection = _Histogram()
        self._removal = _Histogram()
        self._collector = _StatusCollector(board, top_n)
        # Bumped by every incident: a rendered exposition older than that is stale.
        self.generation = 0

    def incident(self, inc: Incident) -> None:
        """IncidentSink: count an incident once, with its result, and observe its latencies."""
        self.generation += 1  # the HTTP endpoint's rendered copy is out of date
        if inc.result == "detected":
            return
        self.count(inc.action, inc.result, inc.detect_ms, inc.remove_ms, inc.workload)

    def count(
        self,
        action: str,
        result: str,
        detect_ms: float | None,
        remove_ms: float | None,
        workload: dict[str, Any] | None,
    ) -> None:
        """Count one incident and observe its latencies (None: not measured, e.g. report-only)."""
        kind = workload.get("kind") if isinstance(workload, dict) else None
        kind = kind if kind in KINDS else "cgroup"
        with self._lock:
            self.generation += 1
            self._incidents[(action, result)] = self._incidents.get((action, result), 0.0) + 1
            self._by_kind[kind] += 1
            self._last_incident = time.time()
            if detect_ms is not None and detect_ms >= 0:
                self._detection.observe(detect_ms / 1000.0)
            if remove_ms is not None and remove_ms >= 0:
                self._removal.observe(remove_ms / 1000.0)

    def _event_families(self) -> list[Metric]:
        with self._lock:
            inc = _family("cgguard_incidents_total", "counter", ("action", "result"))
            for labels, v in self._incidents.items():
                inc.add_metric(labels, v)
            kinds = _family("cgguard_incidents_by_kind_total", "counter", ("workload_kind",))
            for k, v in self._by_kind.items():
                kinds.add_metric((k,), v)
            last = _family("cgguard_last_incident_timestamp_seconds", "gauge")
            last.add_metric((), self._last_incident)
            return [inc, kinds, last, self._detection.family("cgguard_detection_latency_seconds"),
                    self._removal.family("cgguard_removal_latency_seconds")]

    def families(self) -> list[Metric]:
        """Every family, in exposition order: incident counters first, then the state's."""
        return [*self._event_families(), *self._collector.collect()]

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (body, content type); OpenMetrics if the Accept header asks for it."""
        if accept:
            openmetrics, ctype = negotiate(accept)
            return encode(self.families(), openmetrics), ctype
        return encode(self.families(), False), CONTENT_TYPE_LATEST


def reference_markdown() -> str:
    """The metrics reference table for the README (a test checks it against a real scrape)."""
    lines = ["| metric | type | labels | source | meaning |", "| --- | --- | --- | --- | --- |"]
    for m in METRICS:
        labels = ", ".join(f"`{x}`" for x in m.labels) or ""
        lines.append(f"| `{m.name}` | {m.type} | {labels} | {m.source} | {m.help} |")
    return "\n".join(lines) + "\n"
