"""A hostile or damaged incident log must not take 'cgguard incidents' down.

Before the fix, valid JSON lines of the wrong shape (an ``id`` that is a list, ``time: null``,
strings for numbers, reasons that are not a list, deep nesting) crashed the command with
"internal error", and ``--last -1`` silently dropped the first incident.
"""

import hashlib
import json

import pytest
from conftest import run_cli

from cgguard.sinks.incidents import Incident, IncidentLog, read


def _good(log: IncidentLog, cgroup: str) -> Incident:
    inc = Incident(cgroup=cgroup, action="kill-cgroup", reasons=[{"rule": "r", "detail": "d", "values": {}}],
                   tasks_at_detection=10, detector="growth")
    log.append(inc)
    inc.result, inc.remove_ms, inc.survivors = "removed", 3.0, 0
    log.append(inc)
    return inc


def _record(**over):
    rec = {"id": "x1", "time": 1.0, "cgroup": "c", "action": "report", "result": "reported", "detector": "growth",
           "reasons": [], "notes": []}
    rec.update(over)
    return json.dumps(rec)


BAD_LINES = [
    _record(id=["a", "b"]),
    _record(id={"a": 1}),
    _record(id=None),
    _record(id=""),
    _record(time=None),
    _record(time="yesterday"),
    _record(time=[1]),
    _record(cgroup=7),
    _record(action=None),
    _record(result=["removed"]),
    _record(tasks_at_detection="many"),
    _record(peak_tasks=True),
    _record(remove_ms="fast"),
    _record(survivors={"n": 1}),
    _record(reasons="growth"),
    _record(reasons=[1, 2]),
    _record(reasons=[{"rule": ["r"], "detail": "d"}]),
    _record(origin="pid 1"),
    _record(origin=[1]),
    _record(notes="n"),
    _record(notes=[{"n": 1}]),
    _record(workload=5),
    _record(dry_run="yes"),
    _record(origin={"pid": 1, "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}),
    '{"id": "deep", "x": ' + "[" * 100000 + "]" * 100000 + "}",  # RecursionError in json
    "[" * 100000 + "]" * 100000,
    '"just a string"',
    "12",
    "null",
    "[]",
    '{"id": "nan", "time": NaN, "cgroup": "c", "action": "report", "result": "reported"}',
    '{"id": "inf", "time": Infinity, "cgroup": "c", "action": "report", "result": "reported"}',
    "\xff\xfe not utf-8",
]


def _write_log(tmp_path, bad_lines):
    log = IncidentLog(str(tmp_path))
    log.open()
    _good(log, "first")
    path = tmp_path / "incidents.jsonl"
    with open(path, "ab") as f:
        f.writelines((b.encode("latin-1") if b.startswith("\xff") else b.encode()) + b"\n" for b in bad_lines)
    _good(log, "last")
    return path


@pytest.mark.parametrize("bad", BAD_LINES, ids=[f"bad{i}" for i in range(len(BAD_LINES))])
def test_wrong_shape_line_is_skipped_and_reported(tmp_path, bad):
    path = _write_log(tmp_path, [bad])
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    rr = read(str(tmp_path))
    assert [i["cgroup"] for i in rr.incidents] == ["first", "last"]
    assert rr.torn_lines == [3]
    for args in ((), ("--json", "--last", "1")):
        r = run_cli("incidents", "--state-dir", str(tmp_path), *args)
        assert r.returncode == 0, (args, r.stderr)
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr
        assert "skipped 1 unreadable line" in r.stderr and "line 3" in r.stderr
        assert "last" in r.stdout
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the reader never rewrites


def test_many_bad_lines_all_reported_nothing_lost(tmp_path):
    path = _write_log(tmp_path, BAD_LINES)
    size = path.stat().st_size
    rr = read(str(tmp_path))
    assert [i["cgroup"] for i in rr.incidents] == ["first", "last"]
    assert rr.torn_lines == list(range(3, 3 + len(BAD_LINES)))
    r = run_cli("incidents", "--state-dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["cgroup"] for x in r.stdout.splitlines()] == ["first", "last"]
    assert f"skipped {len(BAD_LINES)} unreadable line" in r.stderr
    assert path.stat().st_size == size


def test_a_bad_line_does_not_poison_a_good_incident_with_the_same_id(tmp_path):
    log = IncidentLog(str(tmp_path))
    log.open()
    inc = _good(log, "victim")
    with open(tmp_path / "incidents.jsonl", "a") as f:
        f.write(_record(id=inc.id, cgroup="victim", time=None) + "\n")
    rr = read(str(tmp_path))
    assert len(rr.incidents) == 1 and rr.incidents[0]["result"] == "removed" and rr.torn_lines == [3]


def test_control_characters_are_not_sent_to_the_terminal(tmp_path):
    # cgroup names and command lines come from tenants: an escape sequence in either must not
    # reach the operator's terminal raw.
    log = IncidentLog(str(tmp_path))
    log.open()
    inc = Incident(cgroup="evil\x1b]0;pwned\x07\nfake line", action="report", reasons=[{"rule": "r\x1b[2J", "detail": "d"}],
                   tasks_at_detection=1, detector="growth", origin={"pid": 1, "cmdline": "sh\r\x1b[1A", "alive": True})
    log.append(inc)
    r = run_cli("incidents", "--state-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\r" not in r.stdout
    assert len(r.stdout.splitlines()) == 2  # the incident line and its one reason
    r = run_cli("incidents", "--state-dir", str(tmp_path), "--json")
    assert json.loads(r.stdout)["cgroup"] == inc.cgroup  # JSON keeps the exact value, escaped


@pytest.mark.parametrize("n", ["-1", "0", "-100"])
def test_last_must_be_at_least_one(tmp_path, n):
    log = IncidentLog(str(tmp_path))
    log.open()
    _good(log, "first")
    _good(log, "second")
    r = run_cli("incidents", "--state-dir", str(tmp_path), "--last", n)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--last" in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_last_n_keeps_the_newest(tmp_path):
    log = IncidentLog(str(tmp_path))
    log.open()
    for c in ("a", "b", "c"):
        _good(log, c)
    r = run_cli("incidents", "--state-dir", str(tmp_path), "--json", "--last", "2")
    assert r.returncode == 0 and [json.loads(x)["cgroup"] for x in r.stdout.splitlines()] == ["b", "c"]
    r = run_cli("incidents", "--state-dir", str(tmp_path), "--json", "--last", "10")
    assert [json.loads(x)["cgroup"] for x in r.stdout.splitlines()] == ["a", "b", "c"]
