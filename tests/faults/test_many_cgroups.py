"""A tenant trying to disarm the guard by creating thousands of cgroups in its delegated tree.

Every cgroup a tenant makes under a watched glob costs the agent inotify watches, samples and
(if it kept a file open per cgroup) descriptors. The rule: the cost is bounded by the agent, not
by the tenant; the agent stays ready and still removes the bomb the tenant starts next.

The agent runs with ``RLIMIT_NOFILE`` 1024:1024, the classic default soft limit (systemd's
``DefaultLimitNOFILE`` soft value, many container runtimes' default), so "thousands of cgroups"
is also "more cgroups than descriptors".
"""

import os
import urllib.request

from faultkit import agents_fixture, classic, wait_until  # noqa: F401 (fixture)

CGROUPS = 3000
NOFILE = 1024


def _readyz(agent) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/readyz", timeout=10) as r:
            return r.status
    except OSError as e:
        return getattr(e, "code", 0) or 0


def test_thousands_of_empty_cgroups_do_not_disarm_the_agent(sandbox, agents):
    """Old agent: kept one file open per watched cgroup, unbounded: past ~1,000 cgroups every
    open failed with EMFILE and ``cgguard run`` died with a traceback -- the tenant's next bomb
    ran unguarded, and so did everyone else's on the node. Before this branch's fix the file
    cache was bounded (1,024) but not below the fd limit: it filled the table, the next open
    elsewhere failed with EMFILE, and the agent died at about 1,500 cgroups (readyz: 503, then
    no answer)."""
    tree = sandbox.cgroup("tenant")
    agent = agents([f"{tree}/**"], prefix=["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"], timeout=90)
    root = sandbox.fs.abspath(tree)
    statuses = []
    for i in range(CGROUPS):
        os.mkdir(os.path.join(root, f"c{i}"))
        if i % 500 == 499:
            statuses.append(_readyz(agent))
    assert statuses and all(s == 200 for s in statuses), statuses
    agent.wait_status(lambda st: st["watched"] >= CGROUPS + 1, 120, f"all {CGROUPS} cgroups watched")
    assert _readyz(agent) == 200

    cg = sandbox.cgroup("tenant/late-bomb")
    bomb = sandbox.spawn(classic(8), cg, deadline_s=30, cap=300)
    inc = wait_until(lambda: next((i for i in agent.incidents_of(cg) if i["result"] != "detected"), None), 60,
                     "the bomb's incident", seen=agent.output)
    assert inc["result"] == "removed" and inc["survivors"] == 0 and inc["action"] in ("kill-cgroup", "kill-lineage"), inc
    wait_until(lambda: not sandbox.live_pids(bomb), 15, "no bomb process left")
    assert agent.others(cg) == [], agent.others(cg)[:3]
    assert agent.proc.poll() is None and _readyz(agent) == 200
    with open(f"/proc/{agent.proc.pid}/limits") as f:
        assert any(line.startswith("Max open files") and str(NOFILE) in line for line in f)
    assert len(os.listdir(f"/proc/{agent.proc.pid}/fd")) < NOFILE
