"""End to end: the real `cgguard run` against real bombs in real cgroups (contained, bounded)."""

import json
import os
import socket
import urllib.request

import pytest

from agentproc import AgentProc
from cgguard.testkit.corpus import WORKLOADS
from conftest import run_cli, wait_until


def bomb_argv(name="classic", secs=6):
    return WORKLOADS[name].make(secs)


@pytest.fixture
def agent_factory(tmp_path):
    started = []

    def start(watch, *extra, env=None):
        a = AgentProc(str(tmp_path / f"a{len(started)}"), watch, *extra, env=env)
        started.append(a)
        a.wait_ready()
        return a

    yield start
    for a in started:
        rc = a.stop()
        assert rc == 0, f"agent exit code {rc}: {a.output()}"


def test_newcomer_run_removes_bomb_and_spares_xargs_sibling(sandbox, agent_factory):
    x = sandbox.cgroup("X")
    bomb_cg = sandbox.cgroup("X/child")
    sib_cg = sandbox.cgroup("X/sibling")
    agent = agent_factory([f"{sandbox.name}/X/**"])
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/healthz", timeout=2) as r:
        assert r.status == 200
    xargs = sandbox.spawn(["bash", "-c", "seq 3000 | xargs -P 16 -n 1 true"], sib_cg, deadline_s=60)
    assert wait_until(lambda: sandbox.fs.procs(sib_cg)), "xargs never started"
    bomb = sandbox.spawn(bomb_argv(), bomb_cg, deadline_s=8)
    inc = agent.wait_incident(bomb_cg)
    assert inc["result"] in ("removed", "gone"), inc
    assert inc["survivors"] == 0
    assert inc["action"] in ("kill-cgroup", "kill-lineage")
    assert inc["reasons"] and all(r["detail"] for r in inc["reasons"])
    for key in ("tasks_at_detection", "peak_tasks", "detect_ms", "remove_ms"):
        assert isinstance(inc[key], (int, float)), key
    assert wait_until(lambda: sandbox.live_pids(bomb) == []), sandbox.live_pids(bomb)
    assert xargs.proc.wait(60) == 0  # ran to completion, untouched
    agent.caught_up()
    assert [i for i in agent.incidents() if i["cgroup"] != bomb_cg] == []
    assert x  # the parent was watched but the smallest cgroup holding the bomb was acted on
    st = agent.control({"cmd": "status"})["status"]
    assert {c["path"] for c in st["cgroups"]} >= {x, bomb_cg, sib_cg}


def test_dry_run_reports_and_kills_nothing(sandbox, agent_factory):
    cg = sandbox.cgroup("dry")
    agent = agent_factory([f"{sandbox.name}/*"], "--dry-run")
    bomb = sandbox.spawn(bomb_argv(secs=5), cg, deadline_s=7, cap=300)
    inc = agent.wait_incident(cg)
    assert inc["dry_run"] is True and inc["action"] == "report" and inc["result"] == "reported"
    assert len(sandbox.live_pids(bomb)) > 10  # still there: dry run acts on nothing
    sandbox.kill(bomb)


def test_protected_cgroup_is_never_touched(sandbox, agent_factory):
    cg = sandbox.cgroup("precious")
    agent = agent_factory([f"{sandbox.name}/*"], "--protect", f"{sandbox.name}/precious")
    bomb = sandbox.spawn(bomb_argv(secs=5), cg, deadline_s=7, cap=300)
    inc = agent.wait_incident(cg)
    assert inc["result"] == "refused" and inc["action"] == "report"
    assert any("protected" in n for n in inc["notes"])
    assert len(sandbox.live_pids(bomb)) > 10
    sandbox.kill(bomb)


def test_kill_budget_spent_freezes_the_next_runaway_instead(tmp_path, sandbox, agent_factory):
    """One tenant (the delegated tree sandbox/t, watched as t/**) with a budget of one kill: its
    second bomb is frozen -- it cannot grow -- and reported, never left running."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kill_budget: {max_actions: 1, per_seconds: 600}\n")
    a_cg, b_cg = sandbox.cgroup("t/a"), sandbox.cgroup("t/b")
    agent = agent_factory([f"{sandbox.name}/t/**"], "--config", str(cfg))
    sandbox.spawn(bomb_argv(secs=5), a_cg, deadline_s=7, cap=300)
    first = agent.wait_incident(a_cg)
    assert first["result"] in ("removed", "gone") and first["tenant"] == f"cgroup:{sandbox.name}/t"
    bomb2 = sandbox.spawn(bomb_argv(secs=5), b_cg, deadline_s=7, cap=300)
    second = agent.wait_incident(b_cg)
    assert second["action"] == "freeze" and second["result"] == "frozen", second
    assert any("budget" in n for n in second["notes"])
    assert sandbox.fs.frozen(b_cg) and len(sandbox.live_pids(bomb2)) > 10
    sandbox.fs.freeze(b_cg, False)
    sandbox.kill(bomb2)


def test_sd_notify_ready_and_status_cli(tmp_path, sandbox, agent_factory):
    sock_path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(15)
    sandbox.cgroup("svc")
    agent = agent_factory([f"{sandbox.name}/*"], env={"NOTIFY_SOCKET": sock_path})
    msg = s.recv(4096).decode()
    s.close()
    assert "READY=1" in msg
    r = run_cli("status", "--json", "--control-socket", agent.sock)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["ready"] is True and [c["path"] for c in st["cgroups"]] == [f"{sandbox.name}/svc"]
    r = run_cli("status", "--control-socket", agent.sock)
    assert r.returncode == 0 and f"{sandbox.name}/svc" in r.stdout


def test_status_without_agent_is_clean_error(tmp_path):
    r = run_cli("status", "--control-socket", str(tmp_path / "nobody.sock"))
    assert r.returncode == 2 and "no agent listening" in r.stderr


def test_agent_ignores_cgroup_vanishing_mid_run(sandbox, agent_factory):
    agent = agent_factory([f"{sandbox.name}/**"])
    for i in range(20):
        cg = sandbox.cgroup(f"churn{i}")
        w = sandbox.spawn(["true"], cg, deadline_s=5)
        w.proc.wait(5)
        os.rmdir(sandbox.fs.abspath(cg))
    agent.caught_up()
    assert agent.proc.poll() is None
    assert agent.incidents() == []


def test_a_thread_bomb_whose_main_thread_exited_is_removed(sandbox, agent_factory, tmp_path):
    """Its zombie leader ignores cgroup.kill's SIGKILL and /proc shows it in the v1 root: the agent
    must still find its budget and end it with populated 0, not a timeout."""
    import shutil

    from cgguard.testkit.corpus import leaderless_binary

    if shutil.which("gcc") is None:
        print("no gcc: cannot build the leaderless thread bomb")
        pytest.skip("no gcc: cannot build the leaderless thread bomb")
    prog = leaderless_binary(str(tmp_path))
    cg = sandbox.cgroup("leaderless")
    agent = agent_factory([f"{sandbox.name}/**"])
    bomb = sandbox.spawn([prog, "4", "30", "grow"], cg, deadline_s=30, cap=256)
    inc = agent.wait_incident(cg, timeout=60)
    assert inc["result"] == "removed" and inc["survivors"] == 0, inc
    assert wait_until(lambda: not sandbox.fs.populated(cg)), "threads left running"
    assert wait_until(lambda: sandbox.live_pids(bomb) == []), sandbox.live_pids(bomb)


def test_an_agent_started_under_a_c_fork_loop_gets_ready_and_removes_it(sandbox, tmp_path):
    """Every process of a C fork() loop holds its mmap_lock for writing most of the time, so a
    read of its /proc/<pid>/cmdline stalls: done on the loop's thread, the agent never got ready
    (found by the bench, F5). The loop is already running when the agent starts."""
    import shutil

    from cgguard.testkit.corpus import c_fork_binary

    if shutil.which("gcc") is None:
        print("no gcc: cannot build the C fork loop")
        pytest.skip("no gcc: cannot build the C fork loop")
    prog = c_fork_binary(str(tmp_path))
    cg = sandbox.cgroup("cfork")
    bomb = sandbox.spawn([prog, "120"], cg, deadline_s=120, cap=256)
    # Running and at its cap before the agent starts (the count is the sandbox's own kernel limit).
    assert wait_until(lambda: len(sandbox.live_pids(bomb)) >= 200, timeout=60), len(sandbox.live_pids(bomb))
    agent = AgentProc(str(tmp_path / "agent"), [f"{sandbox.name}/**"])
    try:
        agent.wait_ready(timeout=90)
        inc = agent.wait_incident(cg, timeout=90)
        assert inc["result"] == "removed" and inc["survivors"] == 0, inc
        assert wait_until(lambda: sandbox.live_pids(bomb) == [], timeout=30), sandbox.live_pids(bomb)
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output()


def test_a_parent_is_not_convicted_for_the_child_just_removed(sandbox, tmp_path):
    """The parent's count and budget include the child's: its v1 pids group here (found through
    the child's process), pids.current on pure v2. Once the child is removed, that past growth,
    the refusals and the zombies not yet reaped were the child's: nothing to convict the parent
    (which on a real node is a pod or a slice) for. Found by the bench (F4, F8)."""
    parent = sandbox.cgroup("P")
    child = sandbox.cgroup("P/C")
    agent = AgentProc(str(tmp_path / "agent"), [f"{sandbox.name}/P", f"{sandbox.name}/P/**"])
    try:
        agent.wait_ready()
        bomb = sandbox.spawn(WORKLOADS["zombies"].make(20), child, deadline_s=20, cap=256)
        inc = agent.wait_incident(child, timeout=60)
        assert inc["result"] == "removed", inc
        assert wait_until(lambda: sandbox.live_pids(bomb) == [], timeout=30), sandbox.live_pids(bomb)
        # The positive sign: the parent judged until it went calm, after the child's tasks
        # (zombies included) were gone from every count.
        if bomb.v1_dir is not None:
            assert wait_until(lambda: open(os.path.join(bomb.v1_dir, "pids.current")).read().strip() == "0", timeout=30)
        def parent_seen_empty():
            mine = [c for c in agent.status()["cgroups"] if c["path"] == parent]
            # Calm, empty and unpopulated: parked, judged again only when a task enters.
            return mine and mine[0]["tasks"] == 0 and not mine[0]["populated"] and mine[0]["state"] == "calm"

        assert wait_until(parent_seen_empty, timeout=60), json.dumps(agent.status()["cgroups"])
        agent.caught_up()
        on_parent = [i for i in agent.incidents() if i["cgroup"] == parent]
        assert on_parent == [], on_parent
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output()
