"""The watcher on the real cgroup2 tree: inotify picks up cgroups that appear and vanish."""

import os
import time

from cgguard.config import Sampling
from cgguard.state.watch import Watcher


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
    w = Watcher(cgfs, [f"{sandbox.name}/pods/*/**"], [], Sampling())
    w.start()
    try:
        assert [n.rel for n in w.watched()] == []
        t0 = time.monotonic()
        os.mkdir(cgfs.abspath(f"{base}/p1"))
        os.mkdir(cgfs.abspath(f"{base}/p1/c1"))
        t = pump(w, lambda: {f"{base}/p1", f"{base}/p1/c1"} <= {n.rel for n in w.watched()})
        assert t is not None and t - t0 < 1.0
        # made together with its parent, before our watch on the parent existed
        os.makedirs(cgfs.abspath(f"{base}/p2/c1/c2"), exist_ok=True)
        assert pump(w, lambda: f"{base}/p2/c1/c2" in w.nodes) is not None
        os.rmdir(cgfs.abspath(f"{base}/p1/c1"))
        t0 = time.monotonic()
        t = pump(w, lambda: f"{base}/p1/c1" not in w.nodes)
        assert t is not None and t - t0 < 1.0
        # the glob does not match the 'pods' level itself, nor siblings outside it
        assert not w.nodes[base].watched
        os.mkdir(cgfs.abspath(f"{sandbox.name}/elsewhere"))
        pump(w, lambda: False, timeout=0.2)
        assert f"{sandbox.name}/elsewhere" not in w.nodes
    finally:
        w.close()


def test_counts_follow_tasks_and_sampling_adapts(cgfs, sandbox):
    cg = sandbox.cgroup("svc")
    w = Watcher(cgfs, [f"{sandbox.name}/*"], [], Sampling(fast_interval_ms=20, slow_interval_ms=1000, calm_after_ms=300))
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
        time.sleep(0.4)
        w.sample(node)
        assert node.interval_ns == 1000 * 1_000_000  # calm again after calm_after_ms
        assert node.source in ("pids.current", "cgroup.threads")
    finally:
        w.close()


def test_never_watches_root_or_excluded(cgfs, sandbox):
    w = Watcher(cgfs, ["**"], [], Sampling(), exclude=lambda rel: rel == sandbox.name)
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
    w = Watcher(cgfs, [f"{sandbox.name}/many/*"], [], Sampling())
    try:
        w.start()
        assert len(w.watched()) == 1000
        now = w.clock()
        nodes = w.due(now + 2_000_000_000)
        assert len(nodes) == 1000
        for n in nodes:
            w.sample(n)
        # all calm: next round only after the slow interval
        assert w.next_due_ns() >= now + 900_000_000
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
        agent._cooldown[cg] = 1
        agent._lineage_eval_at[cg] = 1
        agent.workload(cg)
        os.rmdir(cgfs.abspath(cg))
        assert pump(agent.watcher, lambda: cg not in agent.watcher.nodes) is not None
        assert cg not in agent._cooldown and cg not in agent._lineage_eval_at and cg not in agent._workloads
    finally:
        agent.close()
