"""cgguard where production runs: pure cgroup v2 with every controller, real uncapped bombs.

Only in the throwaway guest: these bombs have no task cap of their own (the guest is the
containment). Never assert on time here: emulation makes it vary 2-5x.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from agentproc import AgentProc
from cgguard.testkit.corpus import WORKLOADS

CLASSIC_UNBOUNDED = ":(){ :|:& };:"
SEED_UNBOUNDED = "forkbomb(){ forkbomb|forkbomb & }; forkbomb"


def start_in(fs, cgroup: str, argv: list[str]) -> subprocess.Popen:
    """Start ``argv`` inside ``cgroup`` (the shell moves itself there before exec)."""
    procs = os.path.join(fs.abspath(cgroup), "cgroup.procs")
    return subprocess.Popen(
        ["sh", "-c", 'echo 0 > "$1" && shift && exec "$@"', "sh", procs, *argv],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


@pytest.fixture
def agent(tmp_path):
    started: list[AgentProc] = []

    def start(watch: str, *extra: str) -> AgentProc:
        a = AgentProc(str(tmp_path / f"agent{len(started)}"), [watch], "--log-level", "warning", *extra)
        started.append(a)
        a.wait_ready(timeout=120)
        return a

    yield start
    for a in started:
        assert a.stop() == 0, a.output()


def enable(fs, cgroup: str, *controllers: str) -> None:
    fs.write(cgroup, "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))


def leaf_under_pids(fs, make_cgroup, name: str, pids_max: str = "max") -> tuple[str, str]:
    """A fresh ``<top>/<name>`` whose parent hands down the pids controller (pids.current,
    pids.peak, pids.events exist), with ``pids.max`` set. Returns (top, leaf)."""
    top = make_cgroup(name)
    enable(fs, top, "pids")
    cg = f"{top}/{name}"
    fs.mkdir(cg)
    fs.write(cg, "pids.max", pids_max)
    return top, cg


def removed(fs, cgroup: str, wait_until) -> None:
    wait_until(lambda: not fs.populated(cgroup), f"{cgroup} to show populated 0")


@pytest.mark.parametrize("script", [CLASSIC_UNBOUNDED, SEED_UNBOUNDED], ids=["classic", "seed"])
def test_real_uncapped_bomb_removed_with_no_survivors(cgfs, make_cgroup, agent, wait_until, script):
    top, cg = leaf_under_pids(cgfs, make_cgroup, "bombs")  # pids.max stays "max"
    a = agent(f"{top}/**")
    assert cgfs.read(cg, "pids.max").strip() == "max"  # no cap at all
    bomb = start_in(cgfs, cg, ["bash", "-c", script])
    inc = a.wait_incident(cg, timeout=120)
    assert inc["result"] in ("removed", "gone"), inc
    assert inc["survivors"] == 0
    removed(cgfs, cg, wait_until)
    bomb.wait(10)  # our child's zombie is charged to the cgroup until we reap it
    assert int(cgfs.read(cg, "pids.current")) == 0
    assert int(cgfs.read(cg, "pids.peak")) >= inc["tasks_at_detection"]
    cgfs.rmdir(cg)


def test_saturation_and_refused_forks_verdicts_from_pids_files(cgfs, make_cgroup, agent, wait_until):
    top, cg = leaf_under_pids(cgfs, make_cgroup, "capped", "64")
    # Sampling only: the pids.* detectors must stand on their own (hosts without the connector).
    a = agent(f"{top}/*", "--no-lineage")
    start_in(cgfs, cg, ["bash", "-c", CLASSIC_UNBOUNDED])
    inc = a.wait_incident(cg, timeout=120)
    assert inc["detector"] in ("saturation", "fork-failures"), inc
    rule = inc["reasons"][0]
    assert rule["values"]["pids_max"] == 64
    assert rule["values"].get("forks_refused", 0) >= 10
    assert inc["result"] in ("removed", "gone") and inc["survivors"] == 0
    removed(cgfs, cg, wait_until)
    events = dict(line.split() for line in cgfs.read(cg, "pids.events").splitlines())
    assert int(events["max"]) >= 10
    cgfs.rmdir(cg)


def test_thread_bomb_counted_as_tasks(cgfs, make_cgroup, agent, wait_until):
    top, cg = leaf_under_pids(cgfs, make_cgroup, "threads", "600")
    a = agent(f"{top}/*")
    start_in(cgfs, cg, WORKLOADS["threads"].make(60))
    inc = a.wait_incident(cg, timeout=120)
    assert inc["detector"] in ("growth", "saturation", "fork-failures"), inc
    assert inc["tasks_at_detection"] >= 64  # threads, counted by pids.current
    assert inc["result"] in ("removed", "gone") and inc["survivors"] == 0
    removed(cgfs, cg, wait_until)
    cgfs.rmdir(cg)


def test_zombie_pile_seen_only_through_pids_current(cgfs, make_cgroup, agent, wait_until):
    top, cg = leaf_under_pids(cgfs, make_cgroup, "zombies", "300")
    pile = start_in(cgfs, cg, WORKLOADS["zombies"].make(300))
    wait_until(lambda: int(cgfs.read(cg, "pids.current")) >= 250, "the zombie pile to grow")
    # cgroup.threads lists only live tasks (the parent and a child or two on its way out): the
    # hybrid fallback count cannot see the pile.
    assert len(cgfs.read(cg, "cgroup.threads").split()) < 250 / 4
    a = agent(f"{top}/*")
    inc = a.wait_incident(cg, timeout=120)
    assert inc["detector"] in ("saturation", "fork-failures"), inc
    assert inc["tasks_at_detection"] >= 250
    assert inc["result"] in ("removed", "gone") and inc["survivors"] == 0
    removed(cgfs, cg, wait_until)
    pile.wait(10)
    assert int(cgfs.read(cg, "pids.current")) == 0  # the zombies went with their parent
    cgfs.rmdir(cg)


def test_surgical_kill_with_controllers_enabled_in_parent(cgfs, make_cgroup, agent, wait_until):
    top = make_cgroup("session")
    enable(cgfs, top, "pids", "memory", "cpu")
    cg = f"{top}/shared"
    cgfs.mkdir(cg)
    assert "pids" in cgfs.read(cg, "cgroup.controllers")
    a = agent(f"{top}/**")
    innocent = start_in(cgfs, cg, ["sleep", "600"])
    wait_until(lambda: cgfs.populated(cg), "the innocent to start")
    time.sleep(0.5)
    start_in(cgfs, cg, ["bash", "-c", SEED_UNBOUNDED])
    inc = a.wait_incident(cg, timeout=120)
    assert inc["detector"] == "lineage" and inc["result"] == "removed", inc
    assert inc["action"] == "kill-lineage" and inc["survivors"] == 0
    assert inc["origin"]["comm"] == "bash" and "forkbomb" in inc["origin"]["cmdline"]
    wait_until(lambda: cgfs.procs(cg) == [innocent.pid], "only the innocent to remain")
    assert innocent.poll() is None
    assert not cgfs.frozen(cg)
    innocent.kill()
    innocent.wait()
