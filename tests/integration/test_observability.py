"""Issue 'deployment and observability', done means: a real bomb in a pod-shaped cgroup, a real
agent, real scrapes: incidents_total up by one, a removal-latency observation, the workload named."""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from agentproc import AgentProc
from cgguard.testkit.corpus import WORKLOADS

UID = "6b5a7f8e-1c2d-4e3f-9a0b-1c2d3e4f5a6b"
CID = "3f1c9a0e" * 8


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_scrape_after_bomb_in_pod_cgroup(tmp_path, sandbox):
    pod = sandbox.cgroup(
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"
    )
    ctr = sandbox.cgroup(pod.removeprefix(sandbox.name + "/") + f"/cri-containerd-{CID}.scope")
    agent = AgentProc(str(tmp_path / "a"), [f"{sandbox.name}/kubepods.slice/**"])
    try:
        agent.wait_ready()
        before = scrape(agent.port)
        assert value(before, "cgguard_ready") == 1
        assert value(before, "cgguard_watched_cgroups") >= 4
        sandbox.spawn(WORKLOADS["classic"].make(6), ctr, deadline_s=8)
        inc = agent.wait_incident(ctr)
        assert inc["result"] in ("removed", "gone") and inc["survivors"] == 0
        wl = inc["workload"]
        assert wl["kind"] == "pod" and wl["pod_uid"] == UID and wl["qos"] == "burstable"
        assert wl["container_id"] == CID and wl["runtime"] == "containerd"
        # An incident makes the next scrape read a fresh status (no cache to wait out).
        after = scrape(agent.port)
        key = dict(action=inc["action"], result=inc["result"])
        assert value(after, "cgguard_incidents_total", **key) == value(before, "cgguard_incidents_total", **key) + 1
        assert value(after, "cgguard_removal_latency_seconds_count") == value(before, "cgguard_removal_latency_seconds_count") + 1
        assert value(after, "cgguard_detection_latency_seconds_count") == value(before, "cgguard_detection_latency_seconds_count") + 1
        assert value(after, "cgguard_procconn_events_received_total") > value(before, "cgguard_procconn_events_received_total")
        assert value(after, "cgguard_lineage_records") >= 0
    finally:
        assert agent.stop() == 0, agent.output()
