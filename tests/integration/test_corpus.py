"""The whole corpus against one real agent with default settings: every bomb removed with 0
survivors and an incident each; every benign workload runs to completion untouched.

Bombs are bounded (deadline) and contained (kernel task cap) by cgguard.testkit.sandbox.Sandbox.
"""

import tempfile

import pytest

from agentproc import AgentProc
from cgguard.testkit.sandbox import Sandbox
from cgguard.testkit.corpus import BENIGN, BOMBS, WORKLOADS
from conftest import _fs_or_reason, wait_until


@pytest.fixture(scope="module")
def corpus_env(tmp_path_factory):
    fs, why = _fs_or_reason()
    if fs is None:
        pytest.skip(why)
    sb = Sandbox.create(fs, prefix="cgguard-test", cap=1024)
    tmp = tmp_path_factory.mktemp("corpus")
    # Defaults everywhere but the kill budget (5 a minute): the corpus removes 8 bombs in less.
    (tmp / "cfg.yaml").write_text("kill_budget: {max_actions: 100, per_seconds: 60}\n")
    agent = AgentProc(str(tmp), [f"{sb.name}/**"], "--config", str(tmp / "cfg.yaml"))
    try:
        agent.wait_ready()
        yield sb, agent
    finally:
        rc = agent.stop()
        left = sb.close()
        assert rc == 0, agent.output()
        assert not left, left


def _idle(sb, cg):
    # The next workload starts once nothing of this one runs (its processes would compete for
    # the CPU and blur what the next trial measures).
    assert wait_until(lambda: not sb.fs.populated(cg), timeout=60), f"{cg} still populated"


@pytest.mark.parametrize("name", [w.name for w in BENIGN])
def test_benign_runs_to_completion_untouched(corpus_env, name):
    sb, agent = corpus_env
    w = WORKLOADS[name]
    if w.missing():
        pytest.skip(w.missing())
    cg = sb.cgroup(f"benign-{name}")
    cwd = None
    if w.setup is not None:
        cwd = tempfile.mkdtemp(prefix=f"cgguard-{name}-")
        w.setup(cwd)
    argv = w.make(30)
    if cwd:
        argv = ["sh", "-c", f'cd "{cwd}" && exec "$@"', "sh", *argv]
    run = sb.spawn(argv, cg, deadline_s=90)
    rc = run.proc.wait(90)
    assert rc == 0, f"{name} exited with {rc} (killed?)"
    agent.caught_up()  # every event of the workload has been judged
    mine = [i for i in agent.incidents() if i["cgroup"].startswith(cg)]
    assert mine == [], f"false verdict on {name}: {mine}"
    _idle(sb, cg)


@pytest.mark.parametrize("name", [w.name for w in BOMBS])
def test_bomb_removed_with_no_survivors(corpus_env, name):
    sb, agent = corpus_env
    w = WORKLOADS[name]
    if w.missing():
        pytest.skip(w.missing())
    if w.zombies and sb.mode == "rlimit":
        reason = "a zombie pile is visible only through a pids controller's count (v1 or v2); this host has neither"
        print(reason)
        pytest.skip(reason)
    cg = sb.cgroup(f"bomb-{name}")
    innocents = [sb.spawn(["sleep", "60"], cg, deadline_s=60) for _ in range(w.extra.get("innocents", 0))]
    assert wait_until(lambda: len(sb.fs.procs(cg)) >= len(innocents))
    bomb = sb.spawn(w.make(8), cg, deadline_s=10)
    inc = agent.wait_incident(cg, timeout=20)
    assert inc["result"] in ("removed", "gone"), inc
    assert inc["survivors"] == 0, inc
    assert inc["reasons"], inc
    assert wait_until(lambda: sb.live_pids(bomb) == []), f"{name}: bomb processes survived: {sb.live_pids(bomb)}"
    assert [i.proc.poll() for i in innocents] == [None] * len(innocents), f"{name}: an innocent process was killed"
    for i in innocents:
        i.proc.kill()  # just this process: the cgroup is shared
        i.proc.wait(5)
    _idle(sb, cg)
