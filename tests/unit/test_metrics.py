"""Metrics and the HTTP endpoint, scraped over real HTTP from a server on 127.0.0.1:0."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cgguard.attribution import attribute
from cgguard.sinks.http import Server, serve
from cgguard.sinks.incidents import Incident
from cgguard.state.status import CgroupStatus, ConnectorStatus, IncidentsStatus, Status, StatusBoard, TrackingStatus
from cgguard.sinks.metrics import LATENCY_BUCKETS, METRICS, OTHER, OUTCOMES, TOP_CGROUPS, Metrics, reference_markdown

REPO = Path(__file__).resolve().parents[2]
CID = "3f1c9a0e" * 8
POD = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6b5a7f8e_1c2d_4e3f_9a0b_1c2d3e4f5a6b.slice/cri-containerd-{CID}.scope"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def full_status(n_cgroups: int = 3) -> Status:
    cgroups = [
        CgroupStatus(path=POD, tasks=40, source="pids.current", pids_max=4096, state="active",
                     workload=attribute(POD).to_dict()),
        CgroupStatus(path="system.slice/nginx.service", tasks=9, source="pids.current", state="calm",
                     workload=attribute("system.slice/nginx.service").to_dict()),
        # no workload: the collector attributes the path itself
        CgroupStatus(path="user.slice/user-1000.slice/session-3.scope", tasks=2, source="cgroup.threads", state="calm"),
    ]
    for i in range(max(0, n_cgroups - 3)):
        cgroups.append(CgroupStatus(path=f"system.slice/s{i:04d}.service", tasks=1 + i % 7, state="calm"))
    by_state: dict[str, int] = {}
    for c in cgroups:
        by_state[c.state] = by_state.get(c.state, 0) + 1
    return Status(
        ready=True,
        cgroup_root="/sys/fs/cgroup",
        cgroups=cgroups,
        watched=len(cgroups),
        by_state=by_state,
        connector=ConnectorStatus(mode="event-filter", received=123456, lost_estimate=7, overflows=1, rescans=2),
        tracking=TrackingStatus(enabled=True, reset_interval_ms=30000, records=321, live=300, placeholders=21,
                                aging_runs=4, forgotten_total=1000),
        incidents=IncidentsStatus(since_start=2, recorded=5, not_removed={"budget": 1}),
        inotify_overflows=3,
        sinks={"journal": {"sent": 4}, "hooks": {"ok": 2, "timeout": 1}, "webhook": {"delivered": 2}},
    )


def board_of(st: Status) -> StatusBoard:
    b = StatusBoard()
    b.publish(st, float("inf"))  # never stale: no loop to ask
    return b


def incident(action: str, result: str, detect_ms, remove_ms, workload) -> Incident:
    return Incident(cgroup="x", action=action, reasons=[], tasks_at_detection=1, detector="growth", result=result,
                    detect_ms=detect_ms, remove_ms=remove_ms, workload=workload)


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def get(url: str, accept: str | None = None, method: str = "GET") -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, method=method, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


class Agent:
    """A stand-in for the agent: a published status and readiness, served for real."""

    def __init__(self, st: Status):
        self.board = board_of(st)
        self.ready = False
        self.metrics = Metrics(self.board)
        self.server: Server = serve("127.0.0.1:0", lambda: self.ready, self.metrics,
                                    extra={"/status": lambda: (200, "application/json", b'{"ok": true}\n'),
                                           "/boom": self._boom})

    @staticmethod
    def _boom() -> tuple[int, str, bytes]:
        raise RuntimeError("page failed")

    def scrape(self) -> Samples:
        status, ctype, body = get(self.server.url + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        return parse(body.decode())


@pytest.fixture
def agent():
    a = Agent(full_status())
    try:
        yield a
    finally:
        a.server.close()


def test_scrape_values(agent: Agent) -> None:
    s = agent.scrape()
    assert value(s, "cgguard_ready") == 1
    assert value(s, "cgguard_dry_run") == 0
    assert value(s, "cgguard_watched_cgroups") == 3
    assert value(s, "cgguard_incidents_recorded") == 5
    assert value(s, "cgguard_cgroups_by_state", state="calm") == 2
    assert value(s, "cgguard_cgroups_by_state", state="active") == 1
    pod = value(s, "cgguard_cgroup_tasks", cgroup=POD, workload_kind="pod", workload=f"pod 6b5a7f8e-1c2d-4e3f-9a0b-1c2d3e4f5a6b container {CID[:12]}",
                pod_uid="6b5a7f8e-1c2d-4e3f-9a0b-1c2d3e4f5a6b", container_id=CID, qos="burstable", runtime="containerd")
    assert pod == 40
    # attributed by the collector (the status entry had no workload)
    assert value(s, "cgguard_cgroup_tasks", cgroup="user.slice/user-1000.slice/session-3.scope", workload_kind="session",
                 workload="session 3 of uid 1000", pod_uid="", container_id="", qos="", runtime="") == 2
    assert len(series(s, "cgguard_cgroup_pids_max")) == 1  # only where pids.max is set
    assert value(s, "cgguard_procconn_events_received_total") == 123456
    assert value(s, "cgguard_procconn_events_lost_total") == 7
    assert value(s, "cgguard_procconn_overflows_total") == 1
    assert value(s, "cgguard_procconn_rescans_total") == 2
    assert value(s, "cgguard_inotify_overflows_total") == 3
    assert value(s, "cgguard_incidents_not_removed_total", reason="budget") == 1
    assert value(s, "cgguard_incidents_not_removed_total", reason="dry-run") == 0  # every reason, from 0
    assert value(s, "cgguard_hook_runs_total", result="timeout") == 1
    assert value(s, "cgguard_hook_runs_total", result="dropped") == 0
    assert value(s, "cgguard_journal_entries_total", result="sent") == 4
    assert value(s, "cgguard_procconn_info", mode="event-filter") == 1
    assert value(s, "cgguard_lineage_tracking") == 1
    assert value(s, "cgguard_lineage_reset_interval_seconds") == 30
    assert value(s, "cgguard_lineage_records") == 321
    assert value(s, "cgguard_lineage_live_processes") == 300
    assert value(s, "cgguard_lineage_placeholders") == 21
    assert value(s, "cgguard_lineage_aging_runs_total") == 4
    assert value(s, "cgguard_lineage_records_forgotten_total") == 1000
    assert value(s, "cgguard_agent_resident_memory_bytes") > 1 << 20
    assert value(s, "cgguard_agent_cpu_seconds_total") > 0
    (build,) = series(s, "cgguard_build_info")
    assert dict(build)["version"] and dict(build)["kernel"] == os.uname().release
    assert value(s, "cgguard_status_errors_total") == 0
    # every pre-initialised incident series is there, at 0
    pre = series(s, "cgguard_incidents_total")
    assert len(pre) == sum(len(r) for r in OUTCOMES.values())
    for a, results in OUTCOMES.items():
        for r in results:
            assert value(s, "cgguard_incidents_total", action=a, result=r) == 0


def test_scrape_follows_the_status(agent: Agent) -> None:
    st = full_status()
    st.connector.received += 1000
    st.cgroups[0].tasks = 900
    agent.board.publish(st, float("inf"))
    s = agent.scrape()
    assert value(s, "cgguard_procconn_events_received_total") == 124456
    assert max(series(s, "cgguard_cgroup_tasks").values()) == 900


def test_cardinality_bounded_with_500_cgroups(agent: Agent) -> None:
    st = full_status(500)
    agent.board.publish(st, float("inf"))
    s = agent.scrape()
    tasks = series(s, "cgguard_cgroup_tasks")
    assert len(tasks) == TOP_CGROUPS + 1
    assert value(s, "cgguard_watched_cgroups") == 500
    other = [v for labels, v in tasks.items() if dict(labels)["cgroup"] == OTHER]
    assert len(other) == 1
    everything = sum(c.tasks for c in st.cgroups)
    assert sum(tasks.values()) == everything  # nothing lost, only folded
    # the exported ones are the biggest: none folded into _other is larger than any exported one
    exported = sorted((v for labels, v in tasks.items() if dict(labels)["cgroup"] != OTHER), reverse=True)
    folded = sorted((c.tasks for c in st.cgroups), reverse=True)[TOP_CGROUPS:]
    assert min(exported) >= max(folded)
    assert exported[0] == 40  # the pod
    # every label set of the family has the same names (an invalid exposition otherwise)
    assert len({frozenset(dict(labels)) for labels in tasks}) == 1


def test_top_n_is_configurable() -> None:
    m = Metrics(board_of(full_status(40)), top_n=5)
    s = parse(m.render()[0].decode())
    assert len(series(s, "cgguard_cgroup_tasks")) == 6


def test_incident_increments_counter_and_histograms(agent: Agent) -> None:
    before = agent.scrape()
    agent.metrics.incident(incident("kill-cgroup", "removed", 30.0, 7.0, attribute(POD).to_dict()))
    after = agent.scrape()
    key = dict(action="kill-cgroup", result="removed")
    assert value(after, "cgguard_incidents_total", **key) == value(before, "cgguard_incidents_total", **key) + 1
    assert value(after, "cgguard_incidents_total", action="kill-lineage", result="removed") == 0
    assert value(after, "cgguard_incidents_by_kind_total", workload_kind="pod") == 1
    assert value(after, "cgguard_last_incident_timestamp_seconds") > 1.6e9
    for name, secs in (("cgguard_detection_latency_seconds", 0.030), ("cgguard_removal_latency_seconds", 0.007)):
        assert value(after, f"{name}_count") == value(before, f"{name}_count") + 1
        assert value(after, f"{name}_sum") == pytest.approx(secs)
        for le in LATENCY_BUCKETS:
            want = 1 if secs <= le else 0
            assert value(after, f"{name}_bucket", le=str(le)) == want, (name, le)
    # an unmeasured latency adds no observation; an unknown result is still counted
    agent.metrics.incident(incident("report", "weird", None, None, None))
    agent.metrics.incident(incident("report", "detected", None, None, None))  # counted once, with its result
    later = agent.scrape()
    assert value(later, "cgguard_detection_latency_seconds_count") == 1
    assert value(later, "cgguard_incidents_total", action="report", result="weird") == 1
    assert value(later, "cgguard_incidents_by_kind_total", workload_kind="cgroup") == 1


def test_health_ready_404_extra(agent: Agent) -> None:
    url = agent.server.url
    assert get(url + "/healthz") == (200, "text/plain; charset=utf-8", b"ok\n")
    assert get(url + "/readyz")[0] == 503
    agent.ready = True
    assert get(url + "/readyz")[:3:2] == (200, b"ready\n")
    assert get(url + "/readyz?verbose=1")[0] == 200
    assert get(url + "/nope")[0] == 404
    assert get(url + "/")[0] == 404
    assert get(url + "/status") == (200, "application/json", b'{"ok": true}\n')
    assert get(url + "/boom")[0] == 500
    status, _, body = get(url + "/metrics", method="HEAD")
    assert status == 200 and body == b""
    # the server survived all of that
    assert get(url + "/healthz")[0] == 200


def test_ready_callable_raising_means_not_ready() -> None:
    def broken() -> bool:
        raise RuntimeError("x")

    srv = serve("127.0.0.1:0", broken, None)
    try:
        assert get(srv.url + "/readyz")[0] == 503
        assert get(srv.url + "/metrics")[0] == 404  # no Metrics: no /metrics
    finally:
        srv.close()


def test_empty_status_and_failing_board() -> None:
    s = parse(Metrics(StatusBoard()).render()[0].decode())  # nothing published yet
    assert value(s, "cgguard_ready") == 0
    assert value(s, "cgguard_watched_cgroups") == 0

    class Failing(StatusBoard):
        calls = 0

        def latest(self, max_age_s: float = 1.0, timeout_s: float = 1.0) -> Status:
            Failing.calls += 1
            raise OSError("agent state unavailable")

    m = Metrics(Failing())
    parse(m.render()[0].decode())
    s = parse(m.render()[0].decode())
    assert Failing.calls == 2
    assert value(s, "cgguard_status_errors_total") == 2
    assert value(s, "cgguard_agent_resident_memory_bytes") > 0
    assert not series(s, "cgguard_ready")


def test_board_asks_the_loop_for_a_fresh_status_at_most_once() -> None:
    b = StatusBoard()
    asked = []
    b.bind(lambda: asked.append(1))
    b.publish(full_status(), 0.0)  # long stale
    assert b.latest(timeout_s=0.05).ready is True  # nobody answered: the last one
    assert asked == [1]
    b.latest(timeout_s=0.05)
    assert asked == [1]  # a request is pending: not asked again
    threading.Timer(0.05, lambda: b.publish(Status(ready=False), float("inf"))).start()
    assert b.latest(timeout_s=5).ready is False


def test_openmetrics_negotiation(agent: Agent) -> None:
    status, ctype, body = get(agent.server.url + "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_concurrent_scrapes(agent: Agent) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                agent.scrape()
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


def test_close_releases_the_port() -> None:
    srv = serve("127.0.0.1:0", lambda: True, None)
    port = srv.port
    srv.close()
    srv.close()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again = serve(f"127.0.0.1:{port}", lambda: True, None)  # rebinding works at once
    try:
        assert get(again.url + "/healthz")[0] == 200
    finally:
        again.close()


def test_ipv6_listen() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python")
    try:
        srv = serve("[::1]:0", lambda: True, None)
    except OSError as e:
        pytest.skip(f"cannot bind [::1]: {e}")
    try:
        assert srv.url.startswith("http://[::1]:")
        assert get(srv.url + "/healthz")[0] == 200
    finally:
        srv.close()


def test_reference_matches_scrape_and_readme() -> None:
    m = Metrics(board_of(full_status()))
    m.incident(incident("kill-cgroup", "removed", 10, 10, None))
    fams = {f.name: f for f in text_string_to_metric_families(m.render()[0].decode())}
    spec = {x.name: x for x in METRICS}

    def exposed(name: str, typ: str) -> str:
        return f"{name}_total" if typ == "counter" else name

    scraped = {exposed(f.name, f.type): f for f in fams.values()}
    assert set(scraped) == set(spec), "METRICS and the exposition differ"
    for name, fam in scraped.items():
        assert fam.type == spec[name].type, name
        assert fam.documentation == spec[name].help, name
        for s in fam.samples:
            assert set(s.labels) <= set(spec[name].labels) | {"le"}, (name, s.labels)
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "README.md metrics table is stale: paste metrics.reference_markdown()"


def test_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        reason = "promtool not installed (Debian: apt-get install -y --no-install-recommends prometheus)"
        print(reason)
        pytest.skip(reason)
    m = Metrics(board_of(full_status(500)))
    m.incident(incident("kill-lineage", "removed", 12, 80, attribute(POD).to_dict()))
    body, _ = m.render()
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert not (r.stdout + r.stderr).strip(), (r.stdout + r.stderr).decode()  # lint warnings too
