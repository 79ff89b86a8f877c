"""Restart and late start: the agent meets runaways that began before it was running.

A /proc snapshot at start-up has no exited processes in it, so the lineage of anything that
started earlier is only partly known. The fail-safe rule: a runaway whose family is only partly
known is removed whole (kill-cgroup), in one action; nothing of it is called "innocent".

Each bomb is started before the agent process: at least ``LATE_S`` before, and only once it
really runs (``RUNNING`` processes: on a loaded machine the sandbox's shell may take longer than
that to exec the bomb). The agent then needs a second or more to import and scan, so by the time
it looks the bomb is at or near its cap.
"""

import os
import time

from faultkit import (  # noqa: F401 (fixture)
    agents_fixture,
    assert_removed_whole,
    classic,
    fork_loop,
    wait_until,
)

LATE_S = 0.5
RUNNING = 50


def start_before_agent(sandbox, w, running: int = RUNNING) -> None:
    t0 = time.monotonic()
    wait_until(lambda: (sandbox.v1_current(w) or len(sandbox.live_pids(w))) >= running, 30, f"the bomb to run {running} tasks")
    time.sleep(max(0.0, LATE_S - (time.monotonic() - t0)))


def test_late_start_classic_bomb_is_removed_whole_in_one_action(sandbox, agents):
    """Classic bash bomb started before the agent.

    Old agent: decided on the part of the family it had seen fork since it started, killed that
    part surgically (kill-lineage) and reported the rest of the bomb -- hundreds of its own
    members, orphans known only from /proc -- as "innocent processes left running", then did it
    again for the next fragment, spending the kill budget on one bomb.
    """
    cg = sandbox.cgroup("late")
    bomb = sandbox.spawn(classic(8), cg, deadline_s=30, cap=300)
    start_before_agent(sandbox, bomb)  # the fault itself: the bomb runs before the agent does
    agent = agents([f"{sandbox.name}/*"])
    inc = assert_removed_whole(agent, sandbox, cg, bomb)
    assert inc["tasks_at_detection"] > 0
    assert len(agent.incidents_of(cg)) == 1, agent.incidents_of(cg)
    assert agent.others(cg) == []


def test_late_start_fork_loop_is_removed_whole(sandbox, agents):
    """A one-parent fork loop (``while :; do sleep 30 & done``) started before the agent.

    The parent never exits, so lineage never convicts it (by design: the budget rules must); it
    is at its cap before the agent's first sample, so there is no growth to see either, only
    forks refused at the limit. Old agent: the same -- never removed, the tenant's task budget
    held full until the loop's deadline.
    """
    cg = sandbox.cgroup("loop")
    bomb = sandbox.spawn(fork_loop(20), cg, deadline_s=40, cap=300)
    start_before_agent(sandbox, bomb, running=300)  # at its cap: no growth left to see
    agent = agents([f"{sandbox.name}/*"])
    assert_removed_whole(agent, sandbox, cg, bomb, timeout=15)
    assert len(agent.incidents_of(cg)) == 1, agent.incidents_of(cg)


def test_late_start_bomb_beside_an_older_innocent_leaves_no_bomb_process(tmp_path, sandbox, agents):
    """A classic bomb and an innocent ``sleep 600`` share a cgroup; both run before the agent.

    The sleep is started first by the same shell that then execs the bomb, so both are charged
    to one pids cap (as processes of one container are). The runaway must be removed; with the
    lineage only partly known, removing the whole cgroup (the sleep too) is the accepted price.
    Old agent: killed the fragment of the family it had seen fork and left the rest of the bomb
    running beside the sleep as "innocent".
    """
    cg = sandbox.cgroup("shared")
    pidfile = tmp_path / "innocent.pid"
    script = f'sleep 600 & echo $! > {pidfile}; exec "$0" -c "$1"'
    w = sandbox.spawn(["bash", "-c", script, *classic(8)[:1], classic(8)[2]], cg, deadline_s=30, cap=300)
    innocent = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the innocent's pid"))
    start_before_agent(sandbox, w)
    agent = agents([f"{sandbox.name}/*"])
    inc = agent.wait_incident(cg, timeout=60)
    assert inc["result"] == "removed" and inc["survivors"] == 0, inc
    assert inc["action"] in ("kill-cgroup", "kill-lineage"), inc

    def bomb_left():
        return [p for p in sandbox.live_pids(w) if p != innocent]

    wait_until(lambda: not bomb_left(), 30, "no bomb process left in the shared cgroup", seen=lambda: len(bomb_left()))
    assert agent.others(cg) == []
    if inc["action"] == "kill-lineage":
        assert os.path.exists(f"/proc/{innocent}"), "a surgical kill must spare the older innocent"
