"""Operators see cgguard and steer it: the real ``cgguard run`` against real contained bombs, with
every operator surface live at once.

* a real systemd-journald in a private mount namespace (tests/journald_ns.py), read back with
  ``journalctl -o json MESSAGE_ID=...``;
* a hook command (a script that records its stdin and environment) and a webhook to a real
  local HTTP server;
* two real scrapes of ``/metrics`` (before and after), evaluated against
  deploy/prometheus/cgguard-rules.yaml with ``promtool test rules``;
* hooks that hang and a webhook nobody answers, which must not hold up a removal;
* allow-lists: a recursive tool that fires and forgets its copies (which lineage alone would
  convict, MODEL.md's documented limit) runs to completion next to a bomb that is removed, and
  an allow-listed tool that turns into a runaway is still removed by the budget rules.
"""

from __future__ import annotations

import json
import os
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from agentproc import AgentProc, free_port
from journald_ns import Journald, private_journald, wait_for
from journald_ns import missing as journald_missing
from unit.test_alerting import (
    RULES,
    alerts,
    promtool,
    run,
    scrape,
    scrapes_to_input_series,
)

from cgguard.sinks.journald import MESSAGE_ID_ACTED, MESSAGE_ID_REPORTED
from cgguard.testkit.corpus import WORKLOADS

# What the issue names, spelled out here so a renamed constant cannot make these tests agree
# with a changed ID.
ACTED = "2efd8b6eb6a7405691d65a1fcedb0bb7"
REFUSED = "06799536a487462698aa39b57ca4930d"


def classic(secs: int = 6) -> list[str]:
    return WORKLOADS["classic"].make(secs)


# -- the operator's tools, real -----------------------------------------------------------------
@pytest.fixture
def journald(tmp_path) -> Iterator[Journald]:
    reason = journald_missing()
    if reason:
        print(reason)
        pytest.skip(reason)
    d = tmp_path / "journald"
    d.mkdir()
    with private_journald(d) as j:
        yield j


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    url: str
    posts: list[Post] = field(default_factory=list)

    def for_incident(self, inc_id: str) -> list[Post]:
        return [p for p in list(self.posts) if p.body.get("id") == inc_id]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A chat-style webhook receiver: records each POST, answers 204."""
    rx = Receiver("")

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rx.posts.append(Post(self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    rx.url = f"http://127.0.0.1:{srv.server_port}/hooks/cgguard"
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield rx
    finally:
        srv.shutdown()
        srv.server_close()


@dataclass
class HookRuns:
    """What the recording hook left behind: <id>.<phase>.env and <id>.<phase>.json."""

    dir: Path

    def runs(self, inc_id: str) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
        out = {}
        for f in self.dir.glob(f"{inc_id}.*.json"):
            phase = f.name.split(".")[1]
            env = dict(line.split("=", 1) for line in (self.dir / f"{inc_id}.{phase}.env").read_text().splitlines() if "=" in line)
            out[phase] = (json.loads(f.read_text()), env)
        return out


def recording_hook(tmp_path: Path) -> tuple[str, HookRuns]:
    d = tmp_path / "hook-runs"
    d.mkdir()
    script = tmp_path / "record-hook.sh"
    # The .json appears last and whole (rename), so a reader never sees half a run.
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        f="{d}/$CGGUARD_INCIDENT_ID.$CGGUARD_PHASE"
        env > "$f.env"
        cat > "$f.tmp"
        mv "$f.tmp" "$f.json"
        """))
    script.chmod(0o755)
    return str(script), HookRuns(d)


def write_config(path: Path, **sections: Any) -> str:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return str(path)


@pytest.fixture
def agents(tmp_path) -> Iterator[Callable[..., AgentProc]]:
    started: list[AgentProc] = []

    def start(watch: list[str], *extra: str) -> AgentProc:
        a = AgentProc(str(tmp_path / f"agent{len(started)}"), watch, *extra)
        started.append(a)
        a.wait_ready()
        return a

    yield start
    for a in started:
        rc = a.stop()
        assert rc == 0, f"agent exit code {rc}: {a.output()}"


# -- metrics through the alert rules --------------------------------------------------------------
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def value(s: Series, name: str, **labels: str) -> float:
    return s.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_when(url: str, cond: Callable[[Series], bool], what: str) -> Series:
    """A scrape that shows ``cond``: counters and sink stats reach /metrics a moment after the
    incident record does."""
    box: list[Series] = []

    def ok() -> bool:
        s = scrape(url)
        box[:] = [s]
        return cond(s)

    wait_for(ok, what)
    return box[0]


def promtool_fires(tmp_path: Path, before: Series, after: Series, port: int, expect: list[dict[str, str]]) -> None:
    """promtool test rules on two real scrapes (the first held 6 minutes, the second 20): nothing
    fires on the first; exactly ``expect`` fires at the first evaluation that sees the second;
    the event alerts have resolved 10 minutes later."""
    tool = promtool()
    target = {"job": "cgguard", "instance": f"127.0.0.1:{port}"}
    sev = {r["alert"]: r["labels"]["severity"] for r in alerts()}

    def firing(labels: list[dict[str, str]]) -> list[dict[str, Any]]:
        out = []
        for a in labels:
            lbl = {"alertname": a["alertname"], "alertstate": "firing", "severity": sev[a["alertname"]], **target, **a}
            esc = ",".join(f'{k}="{v}"' for k, v in sorted(lbl.items()))
            out.append({"labels": f"ALERTS{{{esc}}}", "value": 1})
        return out

    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": scrapes_to_input_series([(before, 6), (after, 20)], target),
            "promql_expr_test": [
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "5m", "exp_samples": []},
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "6m", "exp_samples": firing(expect)},
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "17m", "exp_samples": []},
            ],
        }],
    }
    f = tmp_path / "operating-alerts.yaml"
    f.write_text(yaml.safe_dump(test, sort_keys=False))
    r = run([tool, "test", "rules", str(f)])
    assert r.returncode == 0, r.stdout + r.stderr


# -- 1. a bomb, seen everywhere an operator looks -------------------------------------------------
def test_removed_bomb_reaches_journal_hooks_webhook_and_alerts(tmp_path, sandbox, agents, journald, receiver):
    hook, hook_runs = recording_hook(tmp_path)
    cfg = write_config(
        tmp_path / "cgguard.yaml",
        journal={"enabled": True, "socket": journald.socket},
        hooks={"on_incident": [[hook]], "webhook": {"url": receiver.url}},
    )
    cg = sandbox.cgroup("web")
    agent = agents([f"{sandbox.name}/*"], "--config", cfg)
    url = f"http://127.0.0.1:{agent.port}"
    before = scrape(url)
    assert value(before, "cgguard_incidents_total", action="kill-cgroup", result="removed") == 0

    bomb = sandbox.spawn(classic(), cg, deadline_s=8)
    inc = agent.wait_incident(cg)
    assert inc["result"] == "removed" and inc["survivors"] == 0, inc
    assert inc["action"] in ("kill-cgroup", "kill-lineage")
    assert inc["origin"] and inc["origin"]["pid"], inc
    wait_for(lambda: sandbox.live_pids(bomb) == [], "the bomb's processes to be gone")

    # The journal: one entry under the "acted" ID, the incident's fields, the whole record.
    (e,) = journald.wait_entries(1, f"MESSAGE_ID={ACTED}")
    assert e["MESSAGE_ID"] == MESSAGE_ID_ACTED == ACTED
    assert (e["SYSLOG_IDENTIFIER"], e["PRIORITY"], e["CGGUARD_INCIDENT_ID"]) == ("cgguard", "4", inc["id"])
    want = {
        "CGGUARD_CGROUP": cg,
        "CGGUARD_ACTION": inc["action"],
        "CGGUARD_RESULT": "removed",
        "CGGUARD_DETECTOR": inc["detector"],
        "CGGUARD_ORIGIN_PID": str(inc["origin"]["pid"]),
        "CGGUARD_ORIGIN_COMM": inc["origin"]["comm"],
        "CGGUARD_SURVIVORS": "0",
        "CGGUARD_DRY_RUN": "0",
    }
    assert {k: e.get(k) for k in want} == want
    assert json.loads(e["CGGUARD_INCIDENT_JSON"]) == inc
    assert cg in e["MESSAGE"] and "removed" in e["MESSAGE"]
    assert journald.entries(f"MESSAGE_ID={REFUSED}") == []

    # The hook: twice, detection then result, the record on stdin and CGGUARD_* in its env.
    runs = wait_for(lambda: (r := hook_runs.runs(inc["id"])) and len(r) == 2 and r, "both hook runs")
    assert set(runs) == {"detected", "final"}
    for phase, (rec, env) in runs.items():
        assert rec["id"] == inc["id"] and rec["cgroup"] == cg
        assert env["CGGUARD_PHASE"] == phase and env["CGGUARD_INCIDENT_ID"] == inc["id"]
        assert env["CGGUARD_CGROUP"] == cg and env["CGGUARD_DRY_RUN"] == "0"
        assert "NOTIFY_SOCKET" not in env
    assert runs["detected"][0]["result"] == "detected"
    assert runs["final"][0] == inc and runs["final"][1]["CGGUARD_RESULT"] == "removed"
    assert runs["final"][1]["CGGUARD_ACTION"] == inc["action"]

    # The webhook: the same record, at detection and with the result.
    posts = wait_for(lambda: len(p := receiver.for_incident(inc["id"])) == 2 and p, "two webhook POSTs")
    assert [p.headers["x-cgguard-phase"] for p in posts] == ["detected", "final"]
    assert posts[1].body == inc and posts[0].body["result"] == "detected"
    assert all(p.path == "/hooks/cgguard" and p.headers["content-type"] == "application/json" for p in posts)

    # The alert: from a real scrape after the removal, with every sink counted as delivered.
    after = scrape_when(url, lambda s: (
        value(s, "cgguard_incidents_total", action=inc["action"], result="removed") == 1
        and value(s, "cgguard_journal_entries_total", result="sent") == 1
        and value(s, "cgguard_hook_runs_total", result="ok") == 2
        and value(s, "cgguard_webhook_deliveries_total", result="delivered") == 2
    ), "the removal and the sinks' deliveries in /metrics")
    promtool_fires(tmp_path, before, after, agent.port,
                   [{"alertname": "CgguardBombRemoved", "action": inc["action"], "result": "removed"}])


def test_refused_bomb_reaches_journal_and_alerts(tmp_path, sandbox, agents, journald):
    cfg = write_config(tmp_path / "cgguard.yaml", journal={"enabled": True, "socket": journald.socket})
    cg = sandbox.cgroup("precious")
    agent = agents([f"{sandbox.name}/*"], "--config", cfg, "--protect", cg)
    url = f"http://127.0.0.1:{agent.port}"
    before = scrape(url)

    bomb = sandbox.spawn(classic(5), cg, deadline_s=7, cap=300)
    inc = agent.wait_incident(cg)
    assert (inc["action"], inc["result"]) == ("report", "refused"), inc
    assert len(sandbox.live_pids(bomb)) > 10  # refused: cgguard did not touch it
    sandbox.kill(bomb)

    (e,) = journald.wait_entries(1, f"MESSAGE_ID={REFUSED}")
    assert e["MESSAGE_ID"] == MESSAGE_ID_REPORTED == REFUSED
    assert (e["CGGUARD_INCIDENT_ID"], e["CGGUARD_CGROUP"], e["CGGUARD_RESULT"], e["PRIORITY"]) == (inc["id"], cg, "refused", "5")
    assert e["CGGUARD_ACTION"] == "report"
    assert json.loads(e["CGGUARD_INCIDENT_JSON"]) == inc
    assert journald.entries(f"MESSAGE_ID={ACTED}") == []

    after = scrape_when(url, lambda s: (
        value(s, "cgguard_incidents_not_removed_total", reason="protected") == 1
        and value(s, "cgguard_journal_entries_total", result="sent") == 1
    ), "the refusal in /metrics")
    promtool_fires(tmp_path, before, after, agent.port, [{"alertname": "CgguardRunawayNotRemoved", "reason": "protected"}])


# -- 2. hooks that hang and a webhook nobody answers hold nothing up ------------------------------
def alive(pid: int) -> bool:
    """Is ``pid`` a live (not zombie) process still running the hook's sleep?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return state != "Z" and argv[0] == b"sleep"


def test_hanging_hook_and_dead_webhook_do_not_hold_up_removal(tmp_path, sandbox, agents):
    pids = tmp_path / "hook-pids"
    pids.mkdir()
    hook = tmp_path / "hang.sh"
    hook.write_text(f'#!/bin/sh\necho $$ > "{pids}/$CGGUARD_INCIDENT_ID.$CGGUARD_PHASE.pid"\nexec sleep 3600\n')
    hook.chmod(0o755)
    cfg = write_config(
        tmp_path / "cgguard.yaml",
        # One hook at a time, each allowed 10 minutes: the first run blocks every later one.
        hooks={
            "on_incident": [[str(hook)]], "timeout_ms": 600_000, "max_concurrent": 1,
            # A closed port: every attempt is refused, retried once, then counted failed.
            "webhook": {"url": f"http://127.0.0.1:{free_port()}/", "retries": 1, "backoff_ms": 100},
        },
    )
    agent = agents([f"{sandbox.name}/*"], "--config", cfg)

    def hook_pid(inc_id: str, phase: str) -> int:
        f = pids / f"{inc_id}.{phase}.pid"
        return int(wait_for(lambda: f.exists() and f.read_text().strip(), f"the {phase} hook of {inc_id} to start"))

    first_cg, second_cg = sandbox.cgroup("first"), sandbox.cgroup("second")
    b1 = sandbox.spawn(classic(), first_cg, deadline_s=8)
    first = agent.wait_incident(first_cg)
    assert first["result"] == "removed" and first["survivors"] == 0, first
    # The removal is on record and the hook run at its detection has not ended: the agent did
    # not wait for it (it would end only at its 10-minute timeout).
    hung = hook_pid(first["id"], "detected")
    wait_for(lambda: alive(hung), "the hook to exec its sleep")
    wait_for(lambda: sandbox.live_pids(b1) == [], "the first bomb's processes to be gone")

    # A second bomb while the only hook slot hangs and the webhook keeps failing.
    b2 = sandbox.spawn(classic(), second_cg, deadline_s=8)
    second = agent.wait_incident(second_cg)
    assert second["result"] == "removed" and second["survivors"] == 0, second
    wait_for(lambda: sandbox.live_pids(b2) == [], "the second bomb's processes to be gone")
    assert alive(hung)
    assert not list(pids.glob(f"{second['id']}.*.pid"))  # still queued behind the hung run

    sinks = wait_for(lambda: (s := agent.status()["sinks"])["webhook"]["failed"] >= 1 and s, "a failed webhook delivery")
    assert sinks["webhook"]["delivered"] == 0
    assert sinks["hooks"]["ok"] == sinks["hooks"]["timeout"] == 0

    # Stopping the agent ends the hung hook (its process group is killed), not the other way.
    assert agent.stop() == 0
    wait_for(lambda: not alive(hung), "the hung hook to be killed at agent stop")


# -- 3. allow-lists: "will this kill make?" ---------------------------------------------------------
FANOUT = """#!/bin/bash
# fanout.sh DEPTH OUT DEADLINE: a recursive tool that starts two copies of itself one level down
# and exits without waiting for them (fire and forget); the leaves do the work. DEPTH 6 is 63
# abandoning members over 6 generations: the shape lineage alone calls a bomb (MODEL.md's
# documented limit). A negative DEPTH never reaches 0 -- the tool's bug that turns it into a
# runaway; DEADLINE (epoch seconds, or +SECS from the first copy's start) bounds even that.
d=$1 out=$2 deadline=$3
[[ $deadline == +* ]] && deadline=$((EPOCHSECONDS + ${deadline#+}))
if (( d != 0 )); then
  (( EPOCHSECONDS < deadline )) || exit 0
  "$0" $((d - 1)) "$out" "$deadline" &
  "$0" $((d - 1)) "$out" "$deadline" &
  exit 0
fi
sleep 2
echo leaf >> "$out"
"""
DEPTH = 6
LEAVES = 2**DEPTH


@pytest.fixture
def fanout(tmp_path) -> Callable[..., tuple[list[str], Path]]:
    """(argv, output file) of a fanout.sh run of ``depth`` that stops forking after ``secs``."""
    tool = tmp_path / "bin" / "fanout.sh"
    tool.parent.mkdir()
    tool.write_text(FANOUT)
    tool.chmod(0o755)

    def make(name: str, depth: int = DEPTH, secs: int = 20) -> tuple[list[str], Path]:
        out = tmp_path / f"{name}.out"
        out.touch()
        return [str(tool), str(depth), str(out), f"+{secs}"], out

    return make


def leaves(out: Path) -> int:
    return len(out.read_text().splitlines())


def incidents_of(agent: AgentProc, cg: str) -> list[dict[str, Any]]:
    return [i for i in agent.incidents() if i["cgroup"] == cg]


def relax(glob: str) -> dict[str, Any]:
    return {"match": glob, "cmdline": r"/fanout\.sh ", "mode": "relax"}


def from_a_shell(argv: list[str], gate: Path | None = None) -> list[str]:
    """As a build runs a tool: a shell already in the cgroup (so tracked) forks and execs it.
    The tool's first copy then exits within milliseconds of its exec, before the agent may have
    read what it ran: the allow rule must still recognise it. With ``gate`` (a FIFO) the shell
    waits for a line on it before it starts the tool."""
    if gate is None:
        return ["bash", "-c", '"$@"; wait', "build", *argv]
    return ["bash", "-c", 'read -r _ < "$0"; "$@"; wait', str(gate), *argv]


def test_allow_listed_recursive_tool_runs_while_a_bomb_next_to_it_is_removed(tmp_path, sandbox, agents, fanout):
    tools, other, bombs = sandbox.cgroup("tools"), sandbox.cgroup("other"), sandbox.cgroup("bomb")
    cfg = write_config(tmp_path / "cgguard.yaml", allow=[relax(tools)])
    agent = agents([f"{sandbox.name}/*"], "--config", cfg)

    # Control: the same tool where the rule does not apply is convicted on lineage alone.
    argv, out = fanout("other")
    unlisted = sandbox.spawn(from_a_shell(argv), other, deadline_s=30)
    inc = agent.wait_incident(other)
    assert (inc["evidence"], inc["result"]) == ("lineage", "removed"), inc
    wait_for(lambda: sandbox.live_pids(unlisted) == [], "the unlisted tool to be gone")
    assert leaves(out) < LEAVES

    # Allowed: the tool runs to completion while a classic bomb next to it is removed.
    argv, out = fanout("tools")
    tool = sandbox.spawn(from_a_shell(argv), tools, deadline_s=30)
    bomb = sandbox.spawn(classic(), bombs, deadline_s=8)
    removed = agent.wait_incident(bombs)
    assert removed["result"] == "removed" and removed["survivors"] == 0, removed
    wait_for(lambda: sandbox.live_pids(bomb) == [], "the bomb's processes to be gone")
    wait_for(lambda: leaves(out) == LEAVES and sandbox.live_pids(tool) == [], "every leaf of the allowed tool to finish", 30)

    (allowed,) = incidents_of(agent, tools)
    assert (allowed["action"], allowed["result"], allowed["evidence"]) == ("report", "allowed", "lineage"), allowed
    rule = f"allow rule (relax: cmdline~'/fanout\\\\.sh ' in {tools})"
    assert any(rule in n for n in allowed["notes"]), allowed["notes"]


def test_allow_listed_tool_that_runs_away_is_still_removed(tmp_path, sandbox, agents, fanout):
    """relax only takes lineage out of the decision: a tool on the list that grows past its
    budget (the kernel cap of 300 here) is removed by the budget rules."""
    tools = sandbox.cgroup("tools")
    cfg = write_config(tmp_path / "cgguard.yaml", allow=[relax(tools)])
    argv, _ = fanout("runaway", depth=-1, secs=8)
    gate = tmp_path / "go"
    os.mkfifo(gate)
    tool = sandbox.spawn(from_a_shell(argv, gate), tools, deadline_s=10, cap=300)
    # The build's shell sits in its kernel cap group before the agent starts, so the agent reads
    # the cap as the budget from its first look (a cgroup that fills up while its first process
    # is still being moved into its v1 group has the default budget until it is resolved again).
    wait_for(lambda: sandbox.v1_current(tool) == 1, "the shell to enter its cap group")
    agent = agents([f"{sandbox.name}/*"], "--config", cfg)
    (budget,) = [c for c in agent.status()["cgroups"] if c["path"] == tools]
    assert budget["budget"] == 300, budget
    with open(gate, "w") as g:
        g.write("go\n")

    def removal() -> dict[str, Any] | None:
        return next((i for i in incidents_of(agent, tools) if i["result"] not in ("detected", "allowed")), None)

    try:
        inc = wait_for(removal, "the runaway to be acted on", 9)
    except AssertionError as e:
        st = [c for c in agent.status()["cgroups"] if c["path"] == tools]
        raise AssertionError(f"{e}: cap group holds {sandbox.v1_current(tool)}, agent status {st}, "
                             f"incidents {incidents_of(agent, tools)}, log {agent.output()}") from None
    assert inc["result"] == "removed" and inc["evidence"] != "lineage", inc
    wait_for(lambda: sandbox.live_pids(tool) == [], "the runaway's processes to be gone")
    allowed = [i for i in incidents_of(agent, tools) if i["result"] == "allowed"]
    assert all(i["evidence"] == "lineage" for i in allowed), allowed
    assert [i for i in incidents_of(agent, tools) if i["evidence"] == "lineage"] == allowed


# -- the benchmark scenario (cgguard/bench/operating.py) runs: its timing is the bench's to judge ---
@pytest.mark.slow
def test_bench_sink_overhead_scenario_runs(cgfs):
    from cgguard.bench.operating import sink_overhead
    from cgguard.bench.runner import Bench
    from cgguard.testkit.sandbox import Sandbox

    sb = Sandbox.create(cgfs, prefix="cgguard-test", cap=1024)
    b = Bench(cgfs, sb, cap=1024, log=lambda _: None)
    try:
        res = sink_overhead(b, runs=1)
    finally:
        left = sb.close()
        b.close()
    assert not left, left
    assert res["plain"]["removed"] == res["hung_sinks"]["removed"] == 1, res
    assert res["hooks_started"] >= 1 and res["hooks_left_running"] == [], res  # hung, then ended with the agent
    assert not any("no hook started" in n for n in res["hung_sinks"]["notes"]), res
    for variant in ("plain", "hung_sinks"):
        assert isinstance(res[variant]["median_start_to_gone_ms"], float), res
    assert isinstance(res["slowdown_pct"], float) and res["target_pct"] == 10.0
