"""cgguard where production runs: pure cgroup v2 with every controller, real bombs.

Only in the throwaway guest. The bombs named UNBOUNDED have no deadline and, where the test
says so, no pids.max anywhere: the guest is their containment, and the test's cgroup is killed
after it whatever happened. Every other workload stops at a deadline of its own.

Never assert on time here: emulation makes it vary 2-5x. The detection model these tests hold
the agent to is the lead's (budget: own or ancestor pids.max, else the default of 4096 tasks;
rules pinned, fill-hold, trajectory; lineage as evidence).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from cgguard.testkit.corpus import WORKLOADS
from guest.inside.guestkit import (
    WORKLOAD_DEADLINE,
    enable,
    no_limit_above,
    pids_events,
    start_in,
)

CLASSIC_UNBOUNDED = ":(){ :|:& };:"
SEED_UNBOUNDED = "forkbomb(){ forkbomb|forkbomb & }; forkbomb"
DEFAULT_BUDGET = 4096  # budget.default_tasks

# A parent that forks children which exit at once and are never reaped: a pile of zombies,
# which only pids.current counts (cgroup.threads lists live tasks). Refused forks are retried
# every 5 ms until the deadline.
ZOMBIE_PILE = """
import os, sys, time
d = time.time() + float(sys.argv[1])
while time.time() < d:
    try:
        if os.fork() == 0:
            os._exit(0)
    except OSError:
        time.sleep(0.005)
"""

# Calm until a line arrives on stdin, then a fork loop: children sleep until the deadline,
# refused forks are retried every 5 ms. Never exits early, so it stays pinned at its limit.
TRIGGERED_FORK_LOOP = """
import os, sys, time
d = time.time() + float(sys.argv[1])
sys.stdin.readline()
while time.time() < d:
    try:
        if os.fork() == 0:
            time.sleep(max(0.0, d - time.time()))
            os._exit(0)
    except OSError:
        time.sleep(0.005)
"""


def thread_bomb() -> list[str]:
    """Python threads starting threads (the corpus's thread bomb), deadline-bounded."""
    return WORKLOADS["threads"].make(WORKLOAD_DEADLINE)


def sleepers(n: int) -> list[str]:
    return ["bash", "-c", f"for i in $(seq {n}); do sleep {WORKLOAD_DEADLINE} & done; wait"]


def tree_pids(tree: dict[str, Any]) -> set[int]:
    """Every pid in the agent's lineage forest of one cgroup (``cgguard tree --json``)."""
    out, stack = set(), list(tree.get("forest", []))
    while stack:
        node = stack.pop()
        out.add(node["pid"])
        stack.extend(node.get("children", []))
    return out


def gone(fs, cg: str, wait_until) -> None:
    wait_until(lambda: not fs.populated(cg), f"{cg} to show populated 0")


def test_unbounded_classic_bomb_without_any_pids_max_removed(cgfs, make_cgroup, agent, wait_until):
    """The real thing, with nothing to hold it: no pids.max on its cgroup or any ancestor, so its
    budget is the default; the agent (lineage on, as deployed) must remove all of it."""
    top = make_cgroup("bombs")
    enable(cgfs, top, "pids")
    cg = f"{top}/bomb"
    cgfs.mkdir(cg)
    assert no_limit_above(cgfs, cg) == []
    a = agent(f"{top}/*")
    a.wait_cgroup(cg, lambda c: c["budget_source"] == "default" and c["budget"] == DEFAULT_BUDGET,
                  "with the default budget")
    bomb = start_in(cgfs, cg, ["bash", "-c", CLASSIC_UNBOUNDED])
    # Lineage decides a bash bomb at a few dozen tasks. Half the budget is where the budget rules
    # start to look, and ~500 MB of the guest's 1 GB: a bomb that gets there was missed.
    inc = a.incident(cg, cgfs, ceiling=DEFAULT_BUDGET // 2)
    assert inc["detector"] == "lineage" and inc["evidence"] == "lineage", a.explain(inc)
    assert inc["action"] == "kill-cgroup" and inc["result"] == "removed", a.explain(inc)
    assert inc["survivors"] == 0, a.explain(inc)
    gone(cgfs, cg, wait_until)
    bomb.wait(60)  # our child's zombie is charged to the cgroup until we reap it
    assert int(cgfs.read(cg, "pids.current")) == 0
    assert int(cgfs.read(cg, "pids.peak")) >= inc["tasks_at_detection"]
    assert cgfs.procs(cg) == []


def test_thread_bomb_pinned_at_its_own_pids_max_removed(cgfs, make_cgroup, agent, wait_until):
    """Threads are tasks: one process whose threads fill its cgroup's pids.max."""
    top = make_cgroup("threads")
    enable(cgfs, top, "pids")
    cg = f"{top}/threads"
    cgfs.mkdir(cg)
    cgfs.write(cg, "pids.max", "200")
    a = agent(f"{top}/*")
    a.wait_cgroup(cg, lambda c: c["budget"] == 200 and c["budget_source"] == f"v2:{cg}", "with its pids.max as budget")
    bomb = start_in(cgfs, cg, thread_bomb())
    inc = a.incident(cg, cgfs)
    assert inc["detector"] in ("pinned", "fill-hold", "trajectory"), a.explain(inc)
    assert inc["evidence"] in ("budget", "trajectory"), a.explain(inc)
    assert inc["budget"] == 200 and inc["budget_source"] == f"v2:{cg}", a.explain(inc)
    # Every rule that can decide holds at least half the budget: a hundred tasks, one process.
    assert inc["tasks_at_detection"] >= 100, a.explain(inc)
    assert inc["result"] == "removed" and inc["survivors"] == 0, a.explain(inc)
    gone(cgfs, cg, wait_until)
    bomb.wait(60)
    assert int(cgfs.read(cg, "pids.current")) == 0


def test_thread_bomb_under_a_pod_limit_removed_and_its_calm_sibling_spared(cgfs, make_cgroup, agent, wait_until):
    """Kubernetes' shape: pids.max on the pod, 'max' on each container. The thread bomb in one
    container is removed; the calm container beside it, charged to the same limit, is not touched
    (a verdict on the shared limit belongs to the cgroup that holds most of its tasks)."""
    pod = make_cgroup("pod")
    cgfs.write(pod, "pids.max", "300")
    enable(cgfs, pod, "pids")
    bad, calm = f"{pod}/bomb", f"{pod}/calm"
    for c in (bad, calm):
        cgfs.mkdir(c)
        assert cgfs.pids_max(c) is None  # the container's own pids.max is "max"
    calm_proc = start_in(cgfs, calm, sleepers(20))
    wait_until(lambda: int(cgfs.read(calm, "pids.current")) == 21, "the calm container's 20 sleepers")
    calm_pids = sorted(cgfs.procs(calm))
    a = agent(f"{pod}/*")
    for c, tasks in ((bad, 0), (calm, 21)):
        a.wait_cgroup(c, lambda s, t=tasks: s["budget"] == 300 and s["budget_source"] == f"v2:{pod}" and s["tasks"] == t,
                      f"with {tasks} tasks and the pod's limit as budget")
    bomb = start_in(cgfs, bad, thread_bomb())
    inc = a.incident(bad, cgfs)
    print(f"incident: {inc['detector']}: {inc['reasons']}")
    assert inc["detector"] in ("pinned", "fill-hold", "trajectory"), a.explain(inc)
    assert inc["budget"] == 300 and inc["budget_source"] == f"v2:{pod}", a.explain(inc)
    assert inc["result"] == "removed" and inc["survivors"] == 0, a.explain(inc)
    gone(cgfs, bad, wait_until)
    bomb.wait(60)
    # The kernel's side, for the record: which pids.events counted the refused forks (the
    # forking cgroup's before Linux 6.11, the limit's own from then on).
    print(f"pids.events max: pod {pids_events(cgfs, pod)}, bomb {pids_events(cgfs, bad)}, calm {pids_events(cgfs, calm)}")

    # A positive sign that the agent looked at the calm container after the bomb was gone: one
    # more task there, and the agent's status showing it.
    extra = start_in(cgfs, calm, ["sleep", str(WORKLOAD_DEADLINE)])
    try:
        a.wait_cgroup(calm, lambda s: s["tasks"] == 22, "sampled after the bomb's removal (22 tasks)")
        assert a.incidents_of(calm) == [], a.explain(a.incidents_of(calm))
        assert sorted(set(cgfs.procs(calm)) - {extra.pid}) == calm_pids
        assert calm_proc.poll() is None
    finally:
        extra.kill()
        extra.wait()


def test_thread_bomb_pinned_at_a_pod_limit_before_the_agent_started_removed(cgfs, make_cgroup, agent, wait_until):
    """A runaway already pinned at its pod's limit when the agent starts: no growth left to see,
    only the limit held and forks refused. The pinned rule must convict it from the pod's limit
    (whichever cgroup's pids.events the kernel counts the refusals in)."""
    pod = make_cgroup("pinnedpod")
    cgfs.write(pod, "pids.max", "200")
    enable(cgfs, pod, "pids")
    bad = f"{pod}/bomb"
    cgfs.mkdir(bad)
    bomb = start_in(cgfs, bad, thread_bomb())
    wait_until(lambda: int(cgfs.read(pod, "pids.current")) == 200 and pids_events(cgfs, bad) + pids_events(cgfs, pod) > 0,
               "the thread bomb to be pinned at the pod's limit")
    a = agent(f"{pod}/*")
    inc = a.incident(bad, cgfs)
    print(f"pids.events max: pod {pids_events(cgfs, pod)}, bomb {pids_events(cgfs, bad)}")
    assert inc["detector"] == "pinned" and inc["evidence"] == "budget", a.explain(inc)
    assert inc["budget"] == 200 and inc["budget_source"] == f"v2:{pod}", a.explain(inc)
    assert inc["result"] == "removed" and inc["survivors"] == 0, a.explain(inc)
    gone(cgfs, bad, wait_until)
    bomb.wait(60)


def test_zombie_pile_seen_only_through_pids_current_removed(cgfs, make_cgroup, agent, wait_until):
    """A runaway that was there before the agent: a zombie pile pinned at its cgroup's pids.max,
    invisible to cgroup.threads (zombies are no threads) but charged to pids.current."""
    top = make_cgroup("zombies")
    enable(cgfs, top, "pids")
    cg = f"{top}/zombies"
    cgfs.mkdir(cg)
    cgfs.write(cg, "pids.max", "300")
    pile = start_in(cgfs, cg, [sys.executable, "-c", ZOMBIE_PILE, str(WORKLOAD_DEADLINE)])
    wait_until(lambda: int(cgfs.read(cg, "pids.current")) == 300 and pids_events(cgfs, cg) > 0,
               "the zombie pile to reach pids.max")
    threads = cgfs.read(cg, "cgroup.threads").split()
    assert len(threads) < 30, threads  # the parent, and a child or two on its way out
    a = agent(f"{top}/*")
    inc = a.incident(cg, cgfs)
    assert inc["detector"] == "pinned" and inc["evidence"] == "budget", a.explain(inc)
    assert inc["budget"] == 300 and inc["budget_source"] == f"v2:{cg}", a.explain(inc)
    assert inc["tasks_at_detection"] >= 285, inc  # counted by pids.current, zombies included
    assert inc["result"] == "removed" and inc["survivors"] == 0, a.explain(inc)
    gone(cgfs, cg, wait_until)
    pile.wait(60)
    assert int(cgfs.read(cg, "pids.current")) == 0  # the zombies went with their parent


def test_surgical_kill_in_a_shared_leaf_spares_the_innocent(cgfs, make_cgroup, agent, wait_until):
    """A bomb started beside an innocent process in one cgroup: the lineage kill removes the
    bomb's family only, names its origin, and leaves the innocent running, unfrozen."""
    top = make_cgroup("session")
    enable(cgfs, top, "pids", "memory", "cpu")
    cg = f"{top}/shared"
    cgfs.mkdir(cg)
    assert "pids" in cgfs.read(cg, "cgroup.controllers")
    a = agent(f"{top}/**")
    innocent = start_in(cgfs, cg, ["sleep", str(WORKLOAD_DEADLINE)])

    def knows_innocent() -> bool:
        reply = a.control({"cmd": "tree", "cgroup": cg}, timeout=30)
        return bool(reply.get("ok")) and innocent.pid in tree_pids(reply["tree"])

    wait_until(knows_innocent, "the agent's lineage tree to hold the innocent", context=a.output)
    start_in(cgfs, cg, ["bash", "-c", SEED_UNBOUNDED])
    inc = a.incident(cg, cgfs)
    assert inc["detector"] == "lineage" and inc["evidence"] == "lineage", a.explain(inc)
    assert inc["action"] == "kill-lineage" and inc["result"] == "removed", a.explain(inc)
    assert inc["survivors"] == 0, a.explain(inc)
    assert inc["origin"]["comm"] == "bash" and "forkbomb" in inc["origin"]["cmdline"], a.explain(inc)
    wait_until(lambda: cgfs.procs(cg) == [innocent.pid], f"only the innocent ({innocent.pid}) to remain",
               context=lambda: f"procs: {cgfs.procs(cg)}, innocent exit: {innocent.poll()}\nincident: {inc}\n"
                               f"agent log:\n{a.output(20000)}")
    assert innocent.poll() is None
    assert not cgfs.frozen(cg)
    innocent.kill()
    innocent.wait()


def test_pids_events_wakes_the_agent_for_a_pinned_verdict(cgfs, make_cgroup, agent, wait_until):
    """Without the proc connector (--no-lineage) nothing tells the agent of forks; and with calm
    cgroups sampled only once a minute, a fork loop that fills its pids.max between two samples is
    seen at once only through the inotify watch on pids.events (a refused fork changes it)."""
    top = make_cgroup("wake")
    enable(cgfs, top, "pids")
    cg = f"{top}/wake"
    cgfs.mkdir(cg)
    cgfs.write(cg, "pids.max", "32")
    loop = start_in(cgfs, cg, [sys.executable, "-c", TRIGGERED_FORK_LOOP, str(WORKLOAD_DEADLINE)],
                    stdin=subprocess.PIPE)
    wait_until(lambda: cgfs.procs(cg), "the fork loop to wait in its cgroup")
    a = agent(f"{top}/*", "--no-lineage",
              config="sampling:\n  slow_interval_ms: 60000\n  calm_backoff_max_ms: 60000\n")
    assert a.status(timeout=30)["connector"]["mode"] == "off"
    # Sampled once, calm: the next look is a minute away unless something wakes the agent.
    seen = a.wait_cgroup(cg, lambda c: c["tasks"] == 1 and c["interval_ms"] == 60000 and c["state"] == "calm",
                         "calm, sampled every 60 s")
    before = a.status(timeout=30)["samples_taken"]
    assert seen["forks_refused"] == 0
    loop.stdin.write(b"go\n")
    loop.stdin.flush()
    # Not a latency bound: only a wake-up can bring the verdict before the next scheduled sample,
    # a minute after the last one; 45 s leaves any emulation speed ample room.
    inc = a.wait_incident(cg, timeout=45)
    assert inc["detector"] == "pinned" and inc["evidence"] == "budget", a.explain(inc)
    assert inc["budget"] == 32 and inc["budget_source"] == f"v2:{cg}", a.explain(inc)
    assert inc["result"] == "removed" and inc["survivors"] == 0, a.explain(inc)
    # The pinned rule needs samples spanning its hold: taken on wake-ups, not on the schedule.
    assert a.status(timeout=30)["samples_taken"] >= before + 2
    gone(cgfs, cg, wait_until)
    loop.wait(60)
