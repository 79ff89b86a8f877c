"""Lost proc-connector events: the kernel drops fork/exit events when the agent's receive queue
is full, and the lineage tree then misses members and links.

How the loss is made, and why this way: ``tracking.rcvbuf_mib: 1`` (the smallest the config
allows; the kernel doubles it to 2 MiB, about 2,700 queued events) alone does not overflow
reliably: a running SCHED_RR agent drains a burst of benign forks faster than a shell makes them.
So the agent is also SIGSTOPped while the burst runs (an agent starved or descheduled for a
moment): 6,000 fork+exec+exit triples, 18,000 events, cannot fit and the kernel reports ENOBUFS.
The bomb starts while the agent is still stopped, so its first generations are lost too.
"""

from faultkit import agents_fixture, assert_removed_whole, classic, wait_until  # noqa: F401 (fixture)

BURST = "for i in $(seq 6000); do /bin/true; done"


def test_lost_events_are_counted_rescanned_and_the_bomb_still_removed(tmp_path, sandbox, agents):
    """Old agent: counted the loss and re-read /proc, but then decided on the fragments of the
    bomb it had re-linked as if they were whole families -- a surgical kill of one fragment,
    the rest reported as "innocent processes left running" -- instead of removing the cgroup."""
    cfg = tmp_path / "cgguard.yaml"
    cfg.write_text("tracking: {rcvbuf_mib: 1}\n")
    benign_cg, burst_cg, bomb_cg = (sandbox.cgroup(n) for n in ("benign", "burst", "bomb"))
    benign = sandbox.spawn(["sleep", "600"], benign_cg, deadline_s=120)
    agent = agents([f"{sandbox.name}/*"], "--config", str(cfg))
    st = agent.status()
    assert st["connector"]["rcvbuf"] <= 4 << 20, st["connector"]  # the small buffer is in force
    assert st["connector"]["overflows"] == 0 and st["connector"]["rescans"] == 0

    agent.sigstop()
    try:
        burst = sandbox.spawn(["bash", "-c", BURST], burst_cg, deadline_s=120)
        assert burst.proc.wait(120) == 0
        bomb = sandbox.spawn(classic(8), bomb_cg, deadline_s=30, cap=300)
        wait_until(lambda: len(sandbox.live_pids(bomb)) > 20, 15, "the bomb to be running")
    finally:
        agent.sigcont()

    st = agent.wait_status(
        lambda st: st["connector"]["overflows"] > 0 and st["connector"]["rescans"] > 0, 60,
        "the loss to be counted and the tree rescanned",
    )
    assert_removed_whole(agent, sandbox, bomb_cg, bomb)
    assert agent.others(bomb_cg) == [], agent.others(bomb_cg)
    assert sandbox.live_pids(benign), "the benign workload in another cgroup is untouched"
    assert not sandbox.fs.frozen(benign_cg)
