"""The watcher on the real cgroup2 tree: inotify picks up cgroups that appear and vanish."""

import os
import time

from cgguard.config import Sampling
from cgguard.kernel.files import FileCache
from cgguard.state.budget import Budgets
from cgguard.state.watch import Watcher


def watcher(cgfs, globs, protect=(), sampling=None, default_tasks=4096, **kw) -> Watcher:
    files = FileCache(256)
    return Watcher(cgfs, list(globs), list(protect), sampling or Sampling(), Budgets(cgfs, files, default_tasks), files, **kw)


def pump(w: Watcher, until, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w.handle_inotify()
        if until():
            return time.monotonic()
        time.sleep(0.005)
    return None


def test_new_and_removed_cgroups_within_one_second(cgfs, sandbox):
    base = sandbox.cgroup("pods")
    w = watcher(cgfs, [f"{sandbox.name}/pods/*/**"])
    w.start()
    try:
        assert [n.rel for n in w.watched()] == []
        os.mkdir(cgfs.abspath(f"{base}/p1"))
        os.mkdir(cgfs.abspath(f"{base}/p1/c1"))
        assert pump(w, lambda: {f"{base}/p1", f"{base}/p1/c1"} <= {n.rel for n in w.watched()}) is not None
        # made together with its parent, before our watch on the parent existed
        os.makedirs(cgfs.abspath(f"{base}/p2/c1/c2"), exist_ok=True)
        assert pump(w, lambda: f"{base}/p2/c1/c2" in w.nodes) is not None
        os.rmdir(cgfs.abspath(f"{base}/p1/c1"))
        assert pump(w, lambda: f"{base}/p1/c1" not in w.nodes) is not None
        # the glob does not match the 'pods' level itself, nor siblings outside it
        assert not w.nodes[base].watched
        os.mkdir(cgfs.abspath(f"{sandbox.name}/elsewhere"))
        os.mkdir(cgfs.abspath(f"{base}/p3"))  # a sign the events up to here were read
        assert pump(w, lambda: f"{base}/p3" in w.nodes) is not None
        assert f"{sandbox.name}/elsewhere" not in w.nodes
    finally:
        w.close()


def test_counts_follow_tasks_and_sampling_adapts(cgfs, sandbox):
    cg = sandbox.cgroup("svc")
    w = watcher(cgfs, [f"{sandbox.name}/*"], sampling=Sampling(fast_interval_ms=20, slow_interval_ms=1000, calm_after_ms=300))
    w.start()
    try:
        node = w.nodes[cg]
        assert w.sample(node).tasks == 0
        assert node.interval_ns == 1000 * 1_000_000  # calm: slow
        sandbox.spawn("for i in $(seq 20); do sleep 5 & done; wait", cg, deadline_s=10)
        # populated 0 -> 1 raises an inotify event on cgroup.events
        assert pump(w, lambda: node.populated) is not None
        w.hint_active(node, w.clock())
        deadline = time.monotonic() + 5
        while w.sample(node).tasks < 21 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node.last_tasks == 21
        assert node.interval_ns == 20 * 1_000_000  # growing: fast
        # calm again once calm_after_ms passed without growth (the clock is the watcher's)
        w.clock = lambda: node.active_until_ns + 1
        s = w.sample(node)
        assert node.interval_ns == 1000 * 1_000_000, (s, node.history.samples[-2])
        assert node.source in ("pids.current", "cgroup.threads")
    finally:
        w.close()


def test_never_watches_root_or_excluded(cgfs, sandbox):
    w = watcher(cgfs, ["**"], exclude=lambda rel: rel == sandbox.name)
    try:
        w.start()
        assert "" in w.nodes and not w.nodes[""].watched
        assert not w.nodes[sandbox.name].watched
    finally:
        w.close()


def test_thousand_calm_cgroups_sampling_is_cheap(cgfs, sandbox):
    sandbox.cgroup("many")
    for i in range(1000):
        os.mkdir(cgfs.abspath(f"{sandbox.name}/many/c{i}"))
    w = watcher(cgfs, [f"{sandbox.name}/many/*"])
    try:
        w.start()
        assert len(w.watched()) == 1000
        now = w.clock()
        nodes = w.due(now + 2_000_000_000)
        assert len(nodes) == 1000
        for n in nodes:
            w.sample(n)
        # all empty, with their cgroup.events watched: parked until "populated 1" wakes one
        assert all(n.events_wd is not None for n in nodes)
        assert w.next_due_ns() is None
    finally:
        w.close()


def test_agent_forgets_state_of_vanished_cgroups(cgfs, sandbox, tmp_path):
    from cgguard import config
    from cgguard.agent import Agent

    cfg = config.build({"watch": [f"{sandbox.name}/*"], "state_dir": str(tmp_path), "listen": "",
                        "control_socket": "", "realtime": False})
    agent = Agent(cfg, cgfs, use_connector=False)
    agent.setup()
    try:
        cg = sandbox.cgroup("short")
        assert pump(agent.watcher, lambda: cg in agent.watcher.nodes) is not None
        agent.acting._cooldown[cg] = 1
        agent._adopt_at[cg] = 1
        agent.workloads.get(cg)
        os.rmdir(cgfs.abspath(cg))
        assert pump(agent.watcher, lambda: cg not in agent.watcher.nodes) is not None
        assert cg not in agent.acting._cooldown and cg not in agent._adopt_at and cg not in agent.workloads._cache
    finally:
        agent.close()


def test_budget_comes_from_the_kernel_limit_the_tasks_are_charged_to(cgfs, sandbox):
    """The sandbox caps each workload with a pids.max (v1 on hybrid hosts, v2 on pure ones):
    that limit, its count and its refused forks are the cgroup's budget."""
    cg = sandbox.cgroup("capped")
    w = watcher(cgfs, [f"{sandbox.name}/*"], default_tasks=99999)
    w.start()
    try:
        sandbox.spawn("sleep 30 & sleep 30 & wait", cg, deadline_s=30, cap=77)
        node = w.nodes[cg]
        deadline = time.monotonic() + 10
        s = w.sample(node)
        while s.tasks < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
            s = w.sample(node)
        w.clock = lambda: s.t_ns + 60 * 1_000_000_000  # past the v1 retry and refresh delays
        s = w.sample(node)
        assert s.limit == 77 and s.source != "default", s
        assert s.level >= 3 and s.refused == 0
    finally:
        w.close()


def test_default_budget_when_no_limit_applies(cgfs, sandbox):
    cg = sandbox.cgroup("free")
    w = watcher(cgfs, [f"{sandbox.name}/*"], default_tasks=1234, )
    w.budgets.v1_root = None  # as on a pure v2 host without pids.max anywhere
    w.start()
    try:
        s = w.sample(w.nodes[cg])
        assert (s.limit, s.source, s.refused) == (1234, "default", None)
    finally:
        w.close()


def test_protection_covers_the_subtree(cgfs, sandbox):
    sandbox.cgroup("svc/worker")
    w = watcher(cgfs, [f"{sandbox.name}/**"], protect=[f"{sandbox.name}/svc"])
    w.start()
    try:
        assert w.nodes[f"{sandbox.name}/svc"].protected and w.nodes[f"{sandbox.name}/svc/worker"].protected
        assert not w.nodes[sandbox.name].protected
    finally:
        w.close()


def test_a_v1_limit_joined_after_the_first_look_is_found_while_the_cgroup_grows(cgfs, sandbox):
    """A runtime on a hybrid host may move a workload into its cgroup2 cgroup before its v1 pids
    group. Looked up in between, the v1 side shows no limit; a bomb that then fills its cap between
    two samples sits there flat, never "active": the limit must still be found (bench F3)."""
    import subprocess

    import pytest

    from cgguard.testkit.sandbox import V1_PIDS
    from cgguard.state.watch import V1_RETRY_NS

    if sandbox.mode != "v1-pids":
        print(f"needs the v1 pids hierarchy (sandbox mode {sandbox.mode})")
        pytest.skip(f"needs the v1 pids hierarchy (sandbox mode {sandbox.mode})")
    cg = sandbox.cgroup("late")
    w = watcher(cgfs, [f"{sandbox.name}/*"], default_tasks=99999)
    v1 = os.path.join(V1_PIDS, sandbox.name, "late-v1")
    procs = []
    w.start()
    try:
        procs.append(subprocess.Popen(["sleep", "60"]))
        cgfs.write(cg, "cgroup.procs", str(procs[0].pid))
        node = w.nodes[cg]
        s = w.sample(node)
        assert s.source == "default" and s.tasks == 1, s
        os.mkdir(v1)
        with open(os.path.join(v1, "pids.max"), "w") as f:
            f.write("55")
        for _ in range(3):
            procs.append(subprocess.Popen(["sleep", "60"]))
        for p in procs:
            with open(os.path.join(v1, "cgroup.procs"), "w") as f:
                f.write(str(p.pid))
            if p is not procs[0]:
                cgfs.write(cg, "cgroup.procs", str(p.pid))
        node.active_until_ns = 0  # flat since the last sample as far as activity goes
        w.clock = lambda: s.t_ns + V1_RETRY_NS + 1  # well before the 10 s refresh
        s = w.sample(node)
        assert s.tasks == 4 and s.limit == 55 and s.source.startswith("v1:"), s
    finally:
        w.close()
        for p in procs:
            p.kill()
            p.wait()
        if os.path.isdir(v1):
            os.rmdir(v1)
