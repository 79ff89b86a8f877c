"""Formatting of journal entries: the native protocol's encoding, MESSAGE_IDs, priorities, the
readable MESSAGE line, and tolerance of records with missing or unknown keys."""

from __future__ import annotations

import json
import struct

import pytest

from cgguard.sinks.incidents import Incident
from cgguard.sinks.journald import (
    MESSAGE_ID_ACTED,
    MESSAGE_ID_REPORTED,
    encode,
    fields,
    message,
    message_id,
    priority,
)


def decode(data: bytes) -> list[tuple[str, bytes]]:
    """journald's parser for the native protocol, as documented by systemd."""
    out = []
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out.append((k.decode(), v))
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            v = data[nl + 9 : nl + 9 + n]
            assert data[nl + 9 + n : nl + 10 + n] == b"\n"
            out.append((line.decode(), v))
            i = nl + 10 + n
    return out


def test_encode_plain_and_binary_safe():
    entry = [("MESSAGE", "one line"), ("CGGUARD_ORIGIN_CMDLINE", "a\nb=c\n"), ("EMPTY", ""), ("UTF", "naïve ☃")]
    got = decode(encode(entry))
    assert got == [(k, v.encode()) for k, v in entry]
    raw = encode(entry)
    assert b"MESSAGE=one line\n" in raw and b"CGGUARD_ORIGIN_CMDLINE\n" + struct.pack("<Q", 6) in raw


@pytest.mark.parametrize(
    "rec,mid,prio",
    [
        ({"action": "kill-cgroup", "result": "removed"}, MESSAGE_ID_ACTED, 4),
        ({"action": "kill-lineage", "result": "gone"}, MESSAGE_ID_ACTED, 4),
        ({"action": "freeze", "result": "frozen"}, MESSAGE_ID_ACTED, 4),
        ({"action": "kill-cgroup", "result": "failed"}, MESSAGE_ID_ACTED, 3),
        ({"action": "kill-cgroup", "result": "timeout"}, MESSAGE_ID_ACTED, 3),
        ({"action": "kill-lineage", "result": "not-found"}, MESSAGE_ID_ACTED, 4),
        ({"action": "kill-cgroup", "result": "interrupted"}, MESSAGE_ID_ACTED, 4),
        ({"action": "report", "result": "reported"}, MESSAGE_ID_REPORTED, 5),
        ({"action": "report", "result": "refused"}, MESSAGE_ID_REPORTED, 5),
        ({"action": "report", "result": "allowed"}, MESSAGE_ID_REPORTED, 5),
        ({"action": "kill-cgroup", "result": "reported", "dry_run": True}, MESSAGE_ID_REPORTED, 5),
        ({"action": "some-future-action", "result": "some-future-result"}, MESSAGE_ID_ACTED, 4),
        ({}, MESSAGE_ID_ACTED, 4),
    ],
)
def test_message_id_and_priority(rec, mid, prio):
    assert message_id(rec) == mid
    assert priority(rec) == prio


def test_message_is_one_readable_line():
    inc = Incident(
        cgroup="system.slice/web.service",
        action="kill-cgroup",
        reasons=[],
        tasks_at_detection=700,
        detector="growth",
        peak_tasks=900,
        remove_ms=8.25,
        survivors=2,
        result="removed",
        origin={"pid": 99, "comm": "bash", "cmdline": "bash -c 'x\ny'" + "z" * 500, "alive": False},
        workload={"kind": "service", "name": "web.service"},
    )
    m = message(inc.to_dict())
    assert "\n" not in m and len(m) < 500
    for needle in ("system.slice/web.service", "service web.service", "growth", "700 tasks", "peak 900",
                   "kill-cgroup -> removed in 8.25 ms", "2 survivors", "origin pid 99 (bash)", "[exited]"):
        assert needle in m, (needle, m)


def test_missing_and_unknown_keys_are_tolerated():
    f = dict(fields({}))
    assert f["MESSAGE_ID"] == MESSAGE_ID_ACTED and f["SYSLOG_IDENTIFIER"] == "cgguard"
    assert json.loads(f["CGGUARD_INCIDENT_JSON"]) == {}
    f = dict(fields({"id": "x", "origin": "not a dict", "workload": ["odd"], "tenant": {"id": 1}, "evidence": object()}))
    assert "CGGUARD_ORIGIN_PID" not in f and "CGGUARD_TENANT" not in f
    assert json.loads(f["CGGUARD_INCIDENT_JSON"])["id"] == "x"


def test_fields_are_valid_journal_names():
    inc = Incident(cgroup="a", action="freeze", reasons=[], tasks_at_detection=1, detector="d", result="frozen",
                   origin={"pid": 1, "comm": "c", "cmdline": "c", "alive": True},
                   workload={"kind": "pod", "name": "n", "pod_uid": "u", "container_id": "c", "unit": "x"})
    for name, _ in fields(inc.to_dict()):
        assert not name.startswith("_") and len(name) <= 64 and all(c.isupper() or c.isdigit() or c == "_" for c in name)
