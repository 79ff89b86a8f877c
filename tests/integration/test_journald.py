"""The journal sink against a real systemd-journald, started in a private mount namespace
(tests/journald_ns.py), so the host's journal is never touched."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from journald_ns import missing as journald_missing
from journald_ns import private_journald, wait_for

from cgguard.sinks.incidents import Incident
from cgguard.sinks.journald import MESSAGE_ID_ACTED, MESSAGE_ID_REPORTED, JournalSink


@pytest.fixture
def journald(tmp_path):
    reason = journald_missing()
    if reason:
        print(reason)
        pytest.skip(reason)
    with private_journald(tmp_path) as j:
        yield j


def text(v: Any) -> str:
    """journalctl prints values with control characters as byte arrays (without --all)."""
    return bytes(v).decode() if isinstance(v, list) else v


def incident(**kw: Any) -> Incident:
    base: dict[str, Any] = dict(
        cgroup="kubepods.slice/pod-x/cri-containerd-abc.scope",
        action="kill-cgroup",
        reasons=[{"detector": "lineage", "why": "replicating"}],
        tasks_at_detection=812,
        detector="lineage",
        peak_tasks=1024,
        detect_ms=42.5,
        origin={"pid": 4242, "start_ns": 123, "comm": "bash", "cmdline": "bash -c :(){ :|:& };:", "alive": True},
        family=800,
        depth=9,
        workload={"kind": "container", "name": "default/web/app", "pod_uid": "6b5a7f8e-1c2d", "container_id": "abc123",
                  "qos": "burstable", "runtime": "containerd", "unit": "cri-containerd-abc.scope"},
    )
    base.update(kw)
    return Incident(**base)


def finish(inc: Incident, result: str, **kw: Any) -> Incident:
    inc.result = result
    for k, v in kw.items():
        setattr(inc, k, v)
    return inc


def test_final_record_becomes_one_structured_entry(journald):
    sink = JournalSink(journald.socket)
    try:
        inc = incident()
        sink.incident(inc)  # detection: not a journal entry
        sink.incident(finish(inc, "removed", remove_ms=12.5, survivors=0))
        wait_for(lambda: sink.stats()["sent"] == 1, "the entry to be sent")
        (e,) = journald.wait_entries(1, f"CGGUARD_INCIDENT_ID={inc.id}")
    finally:
        sink.close()
    assert sink.stats() == {"sent": 1, "failed": 0}
    assert e["MESSAGE_ID"] == MESSAGE_ID_ACTED
    assert e["PRIORITY"] == "4"
    assert e["SYSLOG_IDENTIFIER"] == "cgguard"
    assert e["_TRANSPORT"] == "journal"
    want = {
        "CGGUARD_CGROUP": inc.cgroup,
        "CGGUARD_ACTION": "kill-cgroup",
        "CGGUARD_RESULT": "removed",
        "CGGUARD_DETECTOR": "lineage",
        "CGGUARD_ORIGIN_PID": "4242",
        "CGGUARD_ORIGIN_COMM": "bash",
        "CGGUARD_ORIGIN_CMDLINE": "bash -c :(){ :|:& };:",
        "CGGUARD_TASKS_AT_DETECTION": "812",
        "CGGUARD_PEAK_TASKS": "1024",
        "CGGUARD_DETECT_MS": "42.5",
        "CGGUARD_REMOVE_MS": "12.5",
        "CGGUARD_SURVIVORS": "0",
        "CGGUARD_DRY_RUN": "0",
        "CGGUARD_WORKLOAD_KIND": "container",
        "CGGUARD_WORKLOAD_NAME": "default/web/app",
        "CGGUARD_POD_UID": "6b5a7f8e-1c2d",
        "CGGUARD_CONTAINER_ID": "abc123",
        "CGGUARD_UNIT": "cri-containerd-abc.scope",
    }
    assert {k: e.get(k) for k in want} == want
    assert "\n" not in e["MESSAGE"]
    for needle in (inc.cgroup, "removed", "kill-cgroup", "4242", "bash"):
        assert needle in e["MESSAGE"]
    rec = json.loads(e["CGGUARD_INCIDENT_JSON"])
    assert rec["id"] == inc.id and rec["result"] == "removed" and rec["workload"]["qos"] == "burstable"


@pytest.mark.parametrize(
    "kw,result,prio,mid",
    [
        ({"action": "report"}, "reported", "5", MESSAGE_ID_REPORTED),
        ({"action": "report"}, "refused", "5", MESSAGE_ID_REPORTED),
        ({"action": "report"}, "allowed", "5", MESSAGE_ID_REPORTED),
        ({"action": "report", "dry_run": True}, "reported", "5", MESSAGE_ID_REPORTED),
        ({"action": "kill-lineage"}, "failed", "3", MESSAGE_ID_ACTED),
        ({"action": "freeze"}, "frozen", "4", MESSAGE_ID_ACTED),
        ({"action": "kill-cgroup"}, "timeout", "3", MESSAGE_ID_ACTED),
    ],
)
def test_message_ids_and_priorities(journald, kw, result, prio, mid):
    sink = JournalSink(journald.socket)
    try:
        inc = incident(**kw)
        sink.incident(finish(inc, result))
        (e,) = journald.wait_entries(1, f"CGGUARD_INCIDENT_ID={inc.id}")
    finally:
        sink.close()
    assert (e["MESSAGE_ID"], e["PRIORITY"], e["CGGUARD_RESULT"]) == (mid, prio, result)
    assert e["CGGUARD_DRY_RUN"] == ("1" if kw.get("dry_run") else "0")
    if kw.get("dry_run"):
        assert e["MESSAGE"].startswith("[dry-run]")
    # Both IDs select entries by themselves, as operators will query.
    assert any(x["CGGUARD_INCIDENT_ID"] == inc.id for x in journald.entries(f"MESSAGE_ID={mid}"))


def test_large_entry_goes_through_a_memfd(journald):
    sink = JournalSink(journald.socket)
    big = "x" * (1 << 20)  # beyond any datagram the socket takes (wmem_max, journald's SO_RCVBUF)
    try:
        inc = incident(notes=[big])
        sink.incident(finish(inc, "removed"))
        (e,) = journald.wait_entries(1, f"CGGUARD_INCIDENT_ID={inc.id}")
    finally:
        sink.close()
    assert sink.sent_memfd == 1 and sink.stats() == {"sent": 1, "failed": 0}
    assert json.loads(e["CGGUARD_INCIDENT_JSON"])["notes"] == [big]


def test_values_with_newlines_are_binary_safe(journald):
    sink = JournalSink(journald.socket)
    cmd = "sh -c 'f() {\n  f | f &\n}; f'"
    cg = "user.slice/odd\nname.scope"
    try:
        inc = incident(cgroup=cg, origin={"pid": 7, "start_ns": 1, "comm": "sh", "cmdline": cmd, "alive": False})
        sink.incident(finish(inc, "gone"))
        (e,) = journald.wait_entries(1, f"CGGUARD_INCIDENT_ID={inc.id}")
    finally:
        sink.close()
    assert text(e["CGGUARD_ORIGIN_CMDLINE"]) == cmd
    assert text(e["CGGUARD_CGROUP"]) == cg
    assert isinstance(e["MESSAGE"], str) and "\n" not in e["MESSAGE"]  # the readable line is one line
    assert e["CGGUARD_RESULT"] == "gone"


def test_unknown_and_missing_keys(journald):
    sink = JournalSink(journald.socket)
    try:
        inc = incident(origin=None, workload=None, peak_tasks=None)
        inc.tenant = "team-a"  # the schema grows: an unknown key rides along
        inc.evidence = {"forks": [1, 2, 3]}
        sink.incident(finish(inc, "removed"))
        (e,) = journald.wait_entries(1, f"CGGUARD_INCIDENT_ID={inc.id}")
    finally:
        sink.close()
    assert "CGGUARD_ORIGIN_PID" not in e and "CGGUARD_PEAK_TASKS" not in e and "CGGUARD_WORKLOAD_KIND" not in e
    assert e["CGGUARD_TENANT"] == "team-a"
    assert json.loads(e["CGGUARD_INCIDENT_JSON"])["evidence"] == {"forks": [1, 2, 3]}


def test_no_journal_socket_counts_failed(tmp_path):
    sink = JournalSink(str(tmp_path / "no-such-socket"))
    try:
        inc = incident()
        sink.incident(inc)
        sink.incident(finish(inc, "removed"))
        wait_for(lambda: sink.stats()["failed"] == 1, "the failure to be counted")
    finally:
        sink.close()
    assert sink.stats() == {"sent": 0, "failed": 1}


def test_full_socket_counts_failed_and_never_blocks(tmp_path):
    # A bound datagram socket nobody reads: the kernel queue fills after max_dgram_qlen entries,
    # then sends fail with EAGAIN. Every incident() call returns and each entry is accounted.
    path = str(tmp_path / "stuck.sock")
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind(path)
    sink = JournalSink(path, queue_size=8)
    n = 60
    try:
        for _ in range(n):
            sink.incident(finish(incident(), "removed"))
        wait_for(lambda: sum(sink.stats().values()) == n, "every entry to be sent or failed")
        st = sink.stats()
        assert st["failed"] > 0 and st["sent"] > 0
        received = 0
        stuck.setblocking(False)
        while True:
            try:
                stuck.recv(1 << 20)
                received += 1
            except BlockingIOError:
                break
        assert received == st["sent"]
    finally:
        sink.close()
        stuck.close()
