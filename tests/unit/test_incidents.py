import json
import os

import pytest
from conftest import run_cli

from cgguard.sinks.incidents import Incident, IncidentLog, read


def _inc(cg="a/b", **kw):
    return Incident(cgroup=cg, action="kill-cgroup", reasons=[{"rule": "r", "detail": "d", "values": {}}],
                    tasks_at_detection=10, detector="growth", **kw)


def test_detection_then_result_fold_by_id(tmp_path):
    log = IncidentLog(str(tmp_path))
    log.open()
    inc = _inc()
    log.append(inc)
    inc.result, inc.remove_ms, inc.survivors = "removed", 12.5, 0
    log.append(inc)
    lines = (tmp_path / "incidents.jsonl").read_text().splitlines()
    assert len(lines) == 2  # both writes are durable records
    rr = read(str(tmp_path))
    assert len(rr.incidents) == 1 and rr.incidents[0]["result"] == "removed" and not rr.torn_lines
    for key in ("id", "time", "cgroup", "action", "reasons", "tasks_at_detection", "peak_tasks",
                "detect_ms", "remove_ms", "survivors", "result"):
        assert key in rr.incidents[0]


def test_torn_last_line_is_reported_and_mended(tmp_path):
    log = IncidentLog(str(tmp_path))
    log.open()
    log.append(_inc("one"))
    with open(tmp_path / "incidents.jsonl", "a") as f:
        f.write('{"id": "torn", "cgroup": "x", "resu')  # crash mid-write
    rr = read(str(tmp_path))
    assert [i["cgroup"] for i in rr.incidents] == ["one"] and rr.torn_lines == [2]
    # Reopening (agent restart) terminates the torn line; the next record is intact.
    log2 = IncidentLog(str(tmp_path))
    log2.open()
    log2.append(_inc("two"))
    rr = read(str(tmp_path))
    assert [i["cgroup"] for i in rr.incidents] == ["one", "two"] and rr.torn_lines == [2]
    r = run_cli("incidents", "--state-dir", str(tmp_path))
    assert r.returncode == 0 and "one" in r.stdout and "two" in r.stdout
    assert "skipped 1 unreadable line" in r.stderr
    r = run_cli("incidents", "--state-dir", str(tmp_path), "--json")
    assert [json.loads(x)["cgroup"] for x in r.stdout.splitlines()] == ["one", "two"]


def test_incidents_cli_errors(tmp_path):
    r = run_cli("incidents", "--state-dir", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such directory" in r.stderr
    r = run_cli("incidents", "--state-dir", str(tmp_path))
    assert r.returncode == 0 and "no incidents" in r.stdout


def test_unwritable_state_dir_is_a_clean_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_cli("run", "--watch", "nothing-here/**", "--state-dir", str(blocker / "sub"), "--listen", "",
                "--control-socket", "", "--no-lineage")
    assert r.returncode == 2 and "state dir" in r.stderr and "Traceback" not in r.stderr
    assert os.path.isfile(blocker)


# -- crash recovery: incidents left at "detected" ------------------------------------------------
def test_open_incidents_are_those_still_detected(tmp_path):
    log = IncidentLog(str(tmp_path))
    log.open()
    done = _inc("done", time=100.0)
    log.append(done)
    done.result = "removed"
    log.append(done)
    older, newer = _inc("older", time=200.0), _inc("newer", time=300.0)
    log.append(newer)  # file order differs from time order on purpose
    log.append(older)
    # The agent was killed here. After a restart a fresh log object finds both, oldest first.
    log2 = IncidentLog(str(tmp_path))
    log2.open()
    opened = log2.open_incidents()
    assert [r["cgroup"] for r in opened] == ["older", "newer"]
    assert all(r["result"] == "detected" for r in opened)
    assert opened[0]["id"] == older.id and opened[0]["reasons"] == older.reasons


def test_close_interrupted_appends_a_final_record_with_the_same_id(tmp_path):
    log = IncidentLog(str(tmp_path))
    log.open()
    inc = _inc("cut", notes=["budget ok"])
    log.append(inc)
    path = tmp_path / "incidents.jsonl"
    before = path.read_bytes()
    log2 = IncidentLog(str(tmp_path))
    log2.open()
    (rec,) = log2.open_incidents()
    closed = log2.close_interrupted(rec, "agent restarted before the action finished")
    assert closed["id"] == inc.id and closed["result"] == "interrupted"
    assert closed["notes"] == ["budget ok", "agent restarted before the action finished"]
    assert rec["result"] == "detected" and rec["notes"] == ["budget ok"]  # the caller's dict is not changed
    after = path.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1  # appended, nothing rewritten
    assert json.loads(after.splitlines()[-1])["result"] == "interrupted"
    rr = read(str(tmp_path))
    assert len(rr.incidents) == 1 and not rr.torn_lines
    folded = rr.incidents[0]
    assert folded["result"] == "interrupted" and folded["cgroup"] == "cut" and folded["time"] == inc.time
    assert log2.open_incidents() == []
    assert log2.count() == 1


def test_a_torn_detection_is_not_an_open_incident(tmp_path):
    log = IncidentLog(str(tmp_path))
    log.open()
    log.append(_inc("whole"))
    with open(tmp_path / "incidents.jsonl", "a") as f:
        f.write('{"id": "torn", "cgroup": "x", "result": "dete')  # killed mid-write
    log2 = IncidentLog(str(tmp_path))
    log2.open()  # mends the tail
    assert [r["cgroup"] for r in log2.open_incidents()] == ["whole"]
    log2.close_interrupted(log2.open_incidents()[0], "restart")
    assert log2.open_incidents() == []
    assert read(str(tmp_path)).torn_lines == [2]


def test_close_interrupted_refuses_what_is_not_a_record(tmp_path):
    log = IncidentLog(str(tmp_path))
    log.open()
    for bad in ({}, {"id": ["x"], "time": 1.0, "cgroup": "c", "action": "a", "result": "detected"}):
        with pytest.raises(ValueError):
            log.close_interrupted(bad, "n")
    assert read(str(tmp_path)).incidents == []
