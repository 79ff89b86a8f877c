"""inotify queue overflow: cgroups created while the agent cannot read its queue.

The agent learns of new cgroups from inotify. When its queue overflows, the kernel drops events
and queues one IN_Q_OVERFLOW: every cgroup created meanwhile is unknown to the agent unless it
rescans. A bomb in such a cgroup must still be watched, removed, and never blamed on the watched
parent or on a sibling.

How the overflow is made, and why this way: the agent is SIGSTOPped (a stopped process reads
nothing, so what is queued stays queued; a SCHED_RR agent that runs would read as fast as we
create and an overflow would be luck), and more cgroups than ``fs.inotify.max_queued_events``
are created in a directory it watches. The sysctl is left as it is: it is global, read at every
inotify_init on the machine, and other agents run in parallel; 17,000 empty cgroups take about
a second to make and to remove. The filler cgroups are named so no watch glob matches them: they
cost the agent one queued event each, not a watched cgroup each.
"""

import os

from faultkit import agents_fixture, final_incident, wait_until  # noqa: F401 (fixture)

from cgguard.testkit.corpus import WORKLOADS


def _queue_limit() -> int:
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        return int(f.read())


def test_cgroup_created_during_overflow_is_watched_and_its_bomb_removed(sandbox, agents):
    """Old agent: ignored IN_Q_OVERFLOW. A cgroup created during the overflow was never watched:
    its bomb ran on until its cap (the parent's count does not include an unknown child), or a
    lineage verdict fell to the nearest watched cgroup, the parent, whose siblings were killed
    with it."""
    t = sandbox.cgroup("t")
    sib = sandbox.cgroup("t/job-sib")
    innocent = sandbox.spawn(["sleep", "600"], sib, deadline_s=120)
    agent = agents([t, f"{t}/job-*"])
    agent.wait_status(lambda st: {c["path"] for c in st["cgroups"]} == {t, sib}, 30, "the tenant's cgroups watched")

    fillers = [f"{t}/fill-{i}" for i in range(_queue_limit() + 600)]
    agent.sigstop()
    try:
        for rel in fillers:
            os.mkdir(sandbox.fs.abspath(rel))
        # Both made after the queue is full: their IN_CREATE is lost with the overflow.
        quiet = sandbox.cgroup("t/job-quiet")
        bomb_cg = sandbox.cgroup("t/job-bomb")
        # A fork loop that lineage does not convict (nothing is abandoned until its deadline, when
        # all its members exit at once): only the budget rules, which sample watched cgroups,
        # can see it, so it is found only if its cgroup is. Its deadline is far beyond the wait
        # below, so an agent that never finds the cgroup fails here rather than catching the
        # exit wave at the deadline.
        bomb = sandbox.spawn(WORKLOADS["python-fork"].make(150), bomb_cg, deadline_s=160, cap=300)
        wait_until(lambda: len(sandbox.live_pids(bomb)) > 20, 15, "the bomb to be running")
    finally:
        agent.sigcont()
    try:
        st = agent.wait_status(lambda st: st["inotify_overflows"] >= 1, 60, "the overflow to be counted")
        inc = final_incident(agent, bomb_cg, timeout=60)
        assert inc["action"] in ("kill-cgroup", "kill-lineage") and inc["result"] == "removed", inc
        assert inc["survivors"] == 0
        wait_until(lambda: not sandbox.live_pids(bomb), 15, "no bomb process left", seen=lambda: len(sandbox.live_pids(bomb)))
        st = agent.wait_status(lambda st: quiet in {c["path"] for c in st["cgroups"]}, 30, "the quiet cgroup made during the overflow to be watched")
        assert bomb_cg in {c["path"] for c in st["cgroups"]}
        # Never blamed on the parent or a sibling.
        assert agent.others(bomb_cg) == [], agent.others(bomb_cg)
        assert not sandbox.fs.frozen(sib) and not sandbox.fs.frozen(t)
        assert sandbox.live_pids(innocent), "the sibling's process must survive"
        assert agent.proc.poll() is None
    finally:
        agent.stop()
        for rel in fillers:
            try:
                os.rmdir(sandbox.fs.abspath(rel))
            except FileNotFoundError:
                pass
