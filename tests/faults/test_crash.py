"""kill -9 mid-incident: an agent that dies between detection and outcome.

The incident log gets two records per incident, ``detected`` before the action and the outcome
after it. An agent SIGKILLed in between leaves the first alone. The restarted agent must close it
(``interrupted``, never left looking like an action in progress) and look at its cgroup at once:
whatever the dead agent meant to remove may still be running there.
"""

import os

from faultkit import (  # noqa: F401 (fixture)
    agents_fixture,
    assert_removed_whole,
    classic,
    final_incident,
    wait_until,
)

from cgguard.sinks.incidents import Incident, IncidentLog


def test_sigkill_mid_incident_is_closed_interrupted_and_its_runaway_removed(tmp_path, sandbox, agents):
    """A real agent is SIGKILLed; its log then holds a ``detected`` record for a cgroup where a
    bomb runs, as when the agent dies right after recording the detection and before its
    cgroup.kill. (The record is written with the agent's own log writer, in the agent's format:
    the window between the two records is a few milliseconds of a SCHED_RR thread, too short to
    hit with a signal reliably, so the test makes it rather than races for it.)

    Old agent: never read its own open records back; the incident stayed "detected" forever
    (dashboards and ``cgguard incidents`` showed an action in progress for a dead process).
    """
    cg = sandbox.cgroup("crash")
    workdir = str(tmp_path / "agent")
    first = agents([f"{sandbox.name}/*"], workdir=workdir)
    first.sigkill()
    assert first.proc.returncode == -9

    bomb = sandbox.spawn(classic(8), cg, deadline_s=30, cap=300)
    wait_until(lambda: len(sandbox.live_pids(bomb)) > 20, 15, "the bomb to be running")
    log = IncidentLog(first.state_dir)
    log.open()
    try:
        left_open = Incident(
            cgroup=cg, action="kill-cgroup", reasons=[{"rule": "pinned-at-limit", "detail": "300 of 300 tasks"}],
            tasks_at_detection=300, detector="pinned", evidence="budget", budget=300, tenant=f"cgroup:{cg}",
        )
        log.append(left_open)
    finally:
        log.close()
    assert [i["result"] for i in first.incidents()] == ["detected"]

    second = agents([f"{sandbox.name}/*"], workdir=workdir)
    closed = next(i for i in second.incidents() if i["id"] == left_open.id)
    assert closed["result"] == "interrupted", closed
    assert any("re-evaluated" in n for n in closed["notes"]), closed["notes"]

    fresh = assert_removed_whole(second, sandbox, cg, bomb, skip=(left_open.id,))
    assert fresh["time"] > closed["time"]
    assert len(second.incidents_of(cg)) == 2
    assert second.others(cg) == []
    # The restart is visible to operators: the status counts what the log holds.
    st = second.status()
    assert st["incidents"]["recorded"] >= 2 and os.path.samefile(st["incidents"]["log"], os.path.join(first.state_dir, "incidents.jsonl"))


def test_sigkill_mid_surgical_kill_does_not_leave_the_cgroup_frozen(tmp_path, sandbox, agents):
    """The agent dies inside a surgical kill (kill-lineage): it had frozen the shared cgroup to
    sort the bomb from its neighbours and never thawed it. A frozen bomb neither grows nor
    refuses forks, so no rule can see it; the innocent beside it stays frozen with it.

    The restarted agent must not leave that freeze in place: the cgroup is thawed and looked at
    again, and the bomb removed. (A freeze that was the action itself -- ``freeze``, or a kill
    budget spent -- is for an operator and stays.)
    Old agent: left the open record and the frozen cgroup as they were, forever.
    """
    cg = sandbox.cgroup("surgical")
    workdir = str(tmp_path / "agent")
    first = agents([f"{sandbox.name}/*"], workdir=workdir)
    first.sigkill()

    pidfile = tmp_path / "innocent.pid"
    script = f'sleep 600 & echo $! > {pidfile}; exec "$0" -c "$1"'
    w = sandbox.spawn(["bash", "-c", script, "bash", classic(8)[2]], cg, deadline_s=30, cap=300)
    innocent = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the innocent's pid"))
    wait_until(lambda: len(sandbox.live_pids(w)) > 50, 15, "the bomb to be running")
    # Where the dead agent's kill-lineage stopped: the cgroup frozen, the record still open.
    sandbox.fs.freeze(cg, True)
    wait_until(lambda: sandbox.fs.frozen(cg), 10, "the cgroup to be frozen")
    log = IncidentLog(first.state_dir)
    log.open()
    try:
        left_open = Incident(
            cgroup=cg, action="kill-lineage", reasons=[{"rule": "lineage-abandoning-replication", "detail": "12 abandoners"}],
            tasks_at_detection=40, detector="lineage", evidence="lineage", tenant=f"cgroup:{cg}",
        )
        log.append(left_open)
    finally:
        log.close()

    second = agents([f"{sandbox.name}/*"], workdir=workdir)
    closed = next(i for i in second.incidents() if i["id"] == left_open.id)
    assert closed["result"] == "interrupted", closed
    assert any("thawed" in n for n in closed["notes"]), closed["notes"]
    inc = final_incident(second, cg, timeout=60, skip=(left_open.id,))
    assert inc["result"] == "removed" and inc["survivors"] == 0, inc

    def bomb_left():
        return [p for p in sandbox.live_pids(w) if p != innocent]

    wait_until(lambda: not bomb_left(), 30, "no bomb process left", seen=lambda: len(bomb_left()))
    assert not sandbox.fs.frozen(cg)


def test_a_freeze_that_was_the_action_stays_after_a_restart(tmp_path, sandbox, agents):
    """The counterpart: an open ``freeze`` (the configured action, or a spent kill budget) is for
    an operator to inspect; the restarted agent closes the record and leaves the freeze alone
    (recovery runs before the agent reports ready, so "ready" is when a thaw would have been)."""
    cg = sandbox.cgroup("held")
    workdir = str(tmp_path / "agent")
    first = agents([f"{sandbox.name}/*"], workdir=workdir)
    first.sigkill()
    w = sandbox.spawn(classic(8), cg, deadline_s=30, cap=300)
    wait_until(lambda: len(sandbox.live_pids(w)) > 50, 15, "the bomb to be running")
    sandbox.fs.freeze(cg, True)
    wait_until(lambda: sandbox.fs.frozen(cg), 10, "the cgroup to be frozen")
    log = IncidentLog(first.state_dir)
    log.open()
    try:
        left_open = Incident(cgroup=cg, action="freeze", reasons=[], tasks_at_detection=300, detector="pinned", evidence="budget")
        log.append(left_open)
    finally:
        log.close()
    second = agents([f"{sandbox.name}/*"], workdir=workdir)
    closed = next(i for i in second.incidents() if i["id"] == left_open.id)
    assert closed["result"] == "interrupted" and not any("thawed" in n for n in closed["notes"]), closed
    assert sandbox.fs.frozen(cg) and sandbox.live_pids(w)
