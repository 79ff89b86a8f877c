import json
import os

from cgguard.sinks.incidents import Incident, IncidentLog, read
from conftest import run_cli


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
