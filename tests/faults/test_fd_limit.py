"""File-descriptor exhaustion: more watched cgroups than the agent may open files.

The agent keeps often-read cgroupfs files open for pread. With one kept-open file per watched
cgroup, anyone who can create cgroups can push it into EMFILE, and an agent that cannot open a
file cannot sample, log an incident or remove the next bomb. The rule: out of descriptors, it
keeps fewer files open (reads the rest per sample) and says so; it never stops.

``prlimit --nofile=64:64`` wraps the agent's command: both limits, because the agent raises its
soft limit to the hard one at start (a soft limit alone would not be a fault).
"""

import re
import shutil
import urllib.request

import pytest
from faultkit import agents_fixture, classic, wait_until  # noqa: F401 (fixture)

NOFILE = 64
CGROUPS = 300
KEEPING = re.compile(r"keeping (?:at most )?(\d+) (?:cgroupfs )?files open")


def test_agent_out_of_descriptors_keeps_running_and_removes_a_bomb(sandbox, agents):
    """Old agent: opened one file per watched cgroup and kept it (no bound); the 60th or so
    open failed with EMFILE, which it did not expect, and ``cgguard run`` died with a traceback
    at start-up -- no guard at all. The agent before this test's fix bounded its file cache but
    let it fill the fd table: the next open elsewhere (a budget's pids.max, the status's
    /proc/self/stat) failed with EMFILE and ended ``cgguard run`` a second after start."""
    if shutil.which("prlimit") is None:
        print("prlimit (util-linux) is not installed")
        pytest.skip("prlimit (util-linux) is not installed")
    t = sandbox.cgroup("t")
    for i in range(CGROUPS):
        sandbox.cgroup(f"t/c{i}")
    quiet = sandbox.spawn(["sleep", "600"], f"{t}/c0", deadline_s=120)
    agent = agents([f"{t}/*"], prefix=["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"], timeout=90)
    with open(f"/proc/{agent.proc.pid}/limits") as f:
        assert any(line.startswith("Max open files") and f"{NOFILE}" in line for line in f), "the limit is in force"

    st = agent.wait_status(
        lambda st: st["watched"] == CGROUPS and any(KEEPING.search(n) for n in st["notes"]),
        60, "every cgroup watched, and a note that fewer files are kept open",
    )
    kept = [int(m.group(1)) for m in map(KEEPING.search, st["notes"]) if m]
    # max_open_files (1024 by default) shrank well below the limit, leaving room for the rest.
    assert kept and max(kept) < NOFILE // 2, st["notes"]

    cg = sandbox.cgroup("t/bomb")  # made after the exhaustion: found, watched, sampled
    bomb = sandbox.spawn(classic(8), cg, deadline_s=30, cap=300)
    inc = wait_until(lambda: next((i for i in agent.incidents_of(cg) if i["result"] != "detected"), None), 60,
                     "the bomb's incident", seen=agent.output)
    assert inc["result"] == "removed" and inc["survivors"] == 0, inc
    wait_until(lambda: not sandbox.live_pids(bomb), 15, "no bomb process left")
    assert agent.others(cg) == [], agent.others(cg)
    assert sandbox.live_pids(quiet), "the calm cgroups are untouched"
    assert agent.proc.poll() is None
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/readyz", timeout=5) as r:
        assert r.status == 200
