"""Prometheus metrics of the agent.

Two sources, so the hot path pays nothing for metrics it does not produce:

* **events** (:meth:`Metrics.incident`) update counters and histograms as they happen;
* **state** (gauges, and counters the agent already keeps, such as proc connector events) is read
  from the agent's ``snapshot()`` by a custom collector only when someone scrapes ``/metrics``.

The registry is private to each :class:`Metrics` (not the process-global default), so tests and
an agent restarted in-process never see duplicate-registration errors or stale series.

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
import os
import platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cgguard import __version__
from cgguard.attribution import KINDS, LABEL_NAMES, attribute

log = logging.getLogger(__name__)

TOP_CGROUPS = 50
OTHER = "_other"

# The (action, result) pairs the agent produces (cgguard.act, cgguard.agent), pre-initialised
# to 0 so that the first incident shows as an increase (rate() and increase() need a sample
# before it). Dry runs, protected cgroups and an exhausted kill budget are action "report".
# Pairs outside this table are still counted; they just start at their first event.
OUTCOMES: dict[str, tuple[str, ...]] = {
    "kill-cgroup": ("removed", "gone", "timeout", "failed"),
    "kill-lineage": ("removed", "gone", "timeout", "failed", "not-found"),
    "freeze": ("frozen", "gone", "timeout", "failed"),
    "report": ("reported", "refused"),
}
ACTIONS: tuple[str, ...] = tuple(OUTCOMES)
RESULTS: tuple[str, ...] = tuple(dict.fromkeys(r for rs in OUTCOMES.values() for r in rs))

# Detection of a bomb takes from a few ms (the lineage detector under a fast bomb) to seconds
# (saturation holds); removal from ms (cgroup.kill of a small tree) to remove_timeout_ms (5 s).
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_CGROUP_LABELS: tuple[str, ...] = ("cgroup", *LABEL_NAMES)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # as exposed (counters with _total)
    type: str
    labels: tuple[str, ...]
    help: str
    source: str  # "snapshot" (filled at scrape time), "event" or "process"


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("cgguard_build_info", "gauge", ("version", "python", "kernel"), "Build and host information; always 1.", "process"),
    MetricSpec("cgguard_ready", "gauge", (), "1 once the agent watches every configured cgroup and reads the proc connector (as /readyz).", "snapshot"),
    MetricSpec("cgguard_dry_run", "gauge", (), "1 if the agent only detects and records, never acts.", "snapshot"),
    MetricSpec("cgguard_watched_cgroups", "gauge", (), "Cgroups currently watched.", "snapshot"),
    MetricSpec("cgguard_cgroups_by_state", "gauge", ("state",), "Watched cgroups per detector state.", "snapshot"),
    MetricSpec("cgguard_cgroup_tasks", "gauge", _CGROUP_LABELS,
               f"Tasks (threads) per watched cgroup: the largest (top {TOP_CGROUPS} by default), the rest summed into cgroup=\"{OTHER}\".", "snapshot"),
    MetricSpec("cgguard_cgroup_pids_max", "gauge", _CGROUP_LABELS, "pids.max of the cgroups exported in cgguard_cgroup_tasks, where set.", "snapshot"),
    MetricSpec("cgguard_incidents_total", "counter", ("action", "result"), "Bombs acted on (or reported) since the agent started.", "event"),
    MetricSpec("cgguard_incidents_by_kind_total", "counter", ("workload_kind",), "Incidents per kind of workload owning the cgroup.", "event"),
    MetricSpec("cgguard_last_incident_timestamp_seconds", "gauge", (), "Unix time of the last incident (0: none since start).", "event"),
    MetricSpec("cgguard_incidents_recorded", "gauge", (), "Incidents in the state directory's record, including earlier runs.", "snapshot"),
    MetricSpec("cgguard_detection_latency_seconds", "histogram", (), "From the first sign of growth to the verdict.", "event"),
    MetricSpec("cgguard_removal_latency_seconds", "histogram", (), "From the verdict to the cgroup (or lineage) being empty.", "event"),
    MetricSpec("cgguard_procconn_info", "gauge", ("mode",), "Proc connector mode (e.g. filtered, all, off); always 1.", "snapshot"),
    MetricSpec("cgguard_procconn_events_received_total", "counter", (), "Proc connector events read.", "snapshot"),
    MetricSpec("cgguard_procconn_events_lost_total", "counter", (), "Proc connector events lost (sequence gaps, overflows).", "snapshot"),
    MetricSpec("cgguard_procconn_enobufs_total", "counter", (), "Receive-buffer overflows reported by the kernel (ENOBUFS).", "snapshot"),
    MetricSpec("cgguard_procconn_resyncs_total", "counter", (), "Lineage resynchronisations from /proc after a loss.", "snapshot"),
    MetricSpec("cgguard_lineage_tracking", "gauge", (), "1 while lineage tracking is enabled.", "snapshot"),
    MetricSpec("cgguard_lineage_reset_interval_seconds", "gauge", (), "Aging interval (the seed's reset_interval).", "snapshot"),
    MetricSpec("cgguard_lineage_records", "gauge", (), "Lineage records held, live and placeholders.", "snapshot"),
    MetricSpec("cgguard_lineage_live_processes", "gauge", (), "Tracked processes that are alive.", "snapshot"),
    MetricSpec("cgguard_lineage_placeholders", "gauge", (), "Records of exited processes kept for their children.", "snapshot"),
    MetricSpec("cgguard_lineage_aging_runs_total", "counter", (), "Aging runs.", "snapshot"),
    MetricSpec("cgguard_lineage_records_forgotten_total", "counter", (), "Records forgotten by aging.", "snapshot"),
    MetricSpec("cgguard_agent_cpu_seconds_total", "counter", (), "CPU time (user + system) used by the agent process.", "process"),
    MetricSpec("cgguard_agent_resident_memory_bytes", "gauge", (), "Resident memory of the agent process.", "process"),
    MetricSpec("cgguard_snapshot_errors_total", "counter", (), "Scrapes where the agent's snapshot() raised; state metrics were skipped.", "process"),
)
_HELP = {m.name: m.help for m in METRICS}


def _base(name: str) -> str:
    # prometheus_client's counters take the name without the _total they add themselves.
    return name.removesuffix("_total")


def _num(d: Any, key: str) -> float | None:
    """A number from a snapshot section, or None if it is missing or not a number."""
    if not isinstance(d, dict):
        return None
    v = d.get(key)
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _gauge(name: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, _HELP[name], value=value)


def _counter(name: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield CounterMetricFamily(_base(name), _HELP[name], value=value)


def _cgroup_labels(entry: dict[str, Any]) -> list[str]:
    path = str(entry.get("path", ""))
    wd = entry.get("workload")
    if isinstance(wd, dict) and wd.get("kind"):
        labels = {
            "workload_kind": wd.get("kind"),
            "workload": wd.get("name"),
            "pod_uid": wd.get("pod_uid"),
            "container_id": wd.get("container_id"),
            "qos": wd.get("qos"),
            "runtime": wd.get("runtime"),
        }
    else:
        labels = dict(attribute(path).labels())  # cached: cheap on every scrape
    return [path, *(str(labels.get(k) or "") for k in LABEL_NAMES)]


def top_cgroups(cgroups: Iterable[Any], top_n: int) -> tuple[list[dict[str, Any]], int, int]:
    """The ``top_n`` entries by tasks (ties by path, so scrapes are stable) and the rest summed.

    Returns (top entries, tasks of the rest, number of the rest). Malformed entries are skipped.
    """
    valid = [c for c in cgroups if isinstance(c, dict) and isinstance(c.get("path"), str) and _num(c, "tasks") is not None]
    valid.sort(key=lambda c: (-(_num(c, "tasks") or 0.0), c["path"]))
    rest = valid[top_n:]
    return valid[:top_n], int(sum(_num(c, "tasks") or 0.0 for c in rest)), len(rest)


class _SnapshotCollector(Collector):
    """Builds the state metrics from one snapshot() per scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], top_n: int):
        self._snapshot = snapshot
        self._top_n = top_n
        self._errors = 0
        self._proc = psutil.Process()
        self._build = {"version": __version__, "python": platform.python_version(), "kernel": os.uname().release}

    def describe(self) -> list[Metric]:
        # Without describe() the registry would call collect() -- and so snapshot() -- at
        # registration, before the agent is up. Names are unique by construction.
        return []

    def collect(self) -> Iterator[Metric]:
        # A gauge fixed at 1 (the text format has no info type): join on it for versions.
        info = GaugeMetricFamily("cgguard_build_info", _HELP["cgguard_build_info"], labels=list(self._build))
        info.add_metric(list(self._build.values()), 1.0)
        yield info
        yield from self._process()
        try:
            snap = self._snapshot()
            if not isinstance(snap, dict):
                raise TypeError(f"snapshot() returned {type(snap).__name__}, not dict")
        except Exception:  # a broken snapshot must not take /metrics down with it
            self._errors += 1
            log.exception("metrics: snapshot() failed")
            snap = None
        yield CounterMetricFamily(_base("cgguard_snapshot_errors_total"), _HELP["cgguard_snapshot_errors_total"], value=self._errors)
        if snap is not None:
            yield from self._state(snap)

    def _process(self) -> Iterator[Metric]:
        try:
            with self._proc.oneshot():
                t = self._proc.cpu_times()
                rss = self._proc.memory_info().rss
        except psutil.Error:
            return
        yield CounterMetricFamily(_base("cgguard_agent_cpu_seconds_total"), _HELP["cgguard_agent_cpu_seconds_total"], value=t.user + t.system)
        yield GaugeMetricFamily("cgguard_agent_resident_memory_bytes", _HELP["cgguard_agent_resident_memory_bytes"], value=rss)

    def _state(self, snap: dict[str, Any]) -> Iterator[Metric]:
        yield from _gauge("cgguard_ready", 1.0 if snap.get("ready") else 0.0)
        yield from _gauge("cgguard_dry_run", 1.0 if snap.get("dry_run") else 0.0)
        yield from _gauge("cgguard_incidents_recorded", _num(snap.get("incidents"), "total"))

        cgroups = snap.get("cgroups")
        if isinstance(cgroups, list):
            yield from self._cgroups(cgroups)

        pc = snap.get("procconn")
        if isinstance(pc, dict):
            if isinstance(pc.get("mode"), str):
                fam = GaugeMetricFamily("cgguard_procconn_info", _HELP["cgguard_procconn_info"], labels=["mode"])
                fam.add_metric([pc["mode"]], 1.0)
                yield fam
            yield from _counter("cgguard_procconn_events_received_total", _num(pc, "received"))
            yield from _counter("cgguard_procconn_events_lost_total", _num(pc, "lost"))
            yield from _counter("cgguard_procconn_enobufs_total", _num(pc, "enobufs"))
            yield from _counter("cgguard_procconn_resyncs_total", _num(pc, "resyncs"))

        ln = snap.get("lineage")
        if isinstance(ln, dict):
            yield from _gauge("cgguard_lineage_tracking", _num(ln, "tracking"))
            ms = _num(ln, "reset_interval_ms")
            yield from _gauge("cgguard_lineage_reset_interval_seconds", None if ms is None else ms / 1000.0)
            yield from _gauge("cgguard_lineage_records", _num(ln, "records"))
            yield from _gauge("cgguard_lineage_live_processes", _num(ln, "live"))
            yield from _gauge("cgguard_lineage_placeholders", _num(ln, "placeholders"))
            yield from _counter("cgguard_lineage_aging_runs_total", _num(ln, "aging_runs"))
            yield from _counter("cgguard_lineage_records_forgotten_total", _num(ln, "forgotten_total"))

    def _cgroups(self, cgroups: list[Any]) -> Iterator[Metric]:
        yield from _gauge("cgguard_watched_cgroups", float(len(cgroups)))
        states: dict[str, int] = {}
        for c in cgroups:
            if isinstance(c, dict):
                st = str(c.get("state") or "unknown")
                states[st] = states.get(st, 0) + 1
        by_state = GaugeMetricFamily("cgguard_cgroups_by_state", _HELP["cgguard_cgroups_by_state"], labels=["state"])
        for st, n in sorted(states.items()):
            by_state.add_metric([st], float(n))
        yield by_state

        top, rest_tasks, rest_n = top_cgroups(cgroups, self._top_n)
        tasks = GaugeMetricFamily("cgguard_cgroup_tasks", _HELP["cgguard_cgroup_tasks"], labels=list(_CGROUP_LABELS))
        pmax = GaugeMetricFamily("cgguard_cgroup_pids_max", _HELP["cgguard_cgroup_pids_max"], labels=list(_CGROUP_LABELS))
        seen: set[tuple[str, ...]] = set()
        for c in top:
            labels = _cgroup_labels(c)
            if tuple(labels) in seen:  # a duplicate path in the snapshot would be an invalid exposition
                continue
            seen.add(tuple(labels))
            tasks.add_metric(labels, _num(c, "tasks") or 0.0)
            pm = _num(c, "pids_max")
            if pm is not None:
                pmax.add_metric(labels, pm)
        if rest_n:
            tasks.add_metric([OTHER, OTHER, *([""] * (len(LABEL_NAMES) - 1))], float(rest_tasks))
        yield tasks
        yield pmax


class Metrics:
    """The agent's metrics: a private registry, event counters and the snapshot collector."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], top_n: int = TOP_CGROUPS):
        if top_n < 1:
            raise ValueError("top_n must be at least 1")
        # The *_created series double the series count and say nothing here (the agent's start
        # time is known); the switch is process-wide, and cgguard owns its process.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.incidents = Counter(
            _base("cgguard_incidents_total"), _HELP["cgguard_incidents_total"], ["action", "result"], registry=self.registry
        )
        for a, results in OUTCOMES.items():
            for r in results:
                self.incidents.labels(a, r)
        self.incidents_by_kind = Counter(
            _base("cgguard_incidents_by_kind_total"), _HELP["cgguard_incidents_by_kind_total"], ["workload_kind"], registry=self.registry
        )
        for k in KINDS:
            self.incidents_by_kind.labels(k)
        self.last_incident = Gauge(
            "cgguard_last_incident_timestamp_seconds", _HELP["cgguard_last_incident_timestamp_seconds"], registry=self.registry
        )
        self.detection = Histogram(
            "cgguard_detection_latency_seconds", _HELP["cgguard_detection_latency_seconds"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.removal = Histogram(
            "cgguard_removal_latency_seconds", _HELP["cgguard_removal_latency_seconds"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.registry.register(_SnapshotCollector(snapshot, top_n))

    def incident(
        self,
        action: str,
        result: str,
        detect_ms: float | None,
        remove_ms: float | None,
        workload: dict[str, Any] | None,
    ) -> None:
        """Count one incident and observe its latencies (None: not measured, e.g. report-only)."""
        self.incidents.labels(action, result).inc()
        kind = workload.get("kind") if isinstance(workload, dict) else None
        self.incidents_by_kind.labels(kind if kind in KINDS else "cgroup").inc()
        self.last_incident.set_to_current_time()
        if detect_ms is not None and detect_ms >= 0:
            self.detection.observe(detect_ms / 1000.0)
        if remove_ms is not None and remove_ms >= 0:
            self.removal.observe(remove_ms / 1000.0)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (body, content type); OpenMetrics if the Accept header asks for it."""
        if accept:
            encoder, ctype = choose_encoder(accept)
            return encoder(self.registry), ctype
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def reference_markdown() -> str:
    """The metrics reference table for the README (a test checks it against a real scrape)."""
    lines = ["| metric | type | labels | source | meaning |", "| --- | --- | --- | --- | --- |"]
    for m in METRICS:
        labels = ", ".join(f"`{x}`" for x in m.labels) or ""
        lines.append(f"| `{m.name}` | {m.type} | {labels} | {m.source} | {m.help} |")
    return "\n".join(lines) + "\n"
