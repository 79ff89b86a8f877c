"""A real, uncapped-by-construction bash fork bomb against pids.max, pids.* and cgroup.kill.

Only in the throwaway guest: the bomb has nothing but its cgroup's pids.max to stop it. The
module fixture runs it once and records what the kernel showed; each test checks one fact.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import pytest

from cgguard.kernel.cgroupfs import CgroupFS

BOMB = ":(){ :|:& };:"
CAP = 50


@dataclass
class BombRun:
    cgroup: str
    pids_max: int | None
    refused_first: int  # pids.events max once the bomb first hit the cap
    refused_later: int  # the same, once it has grown
    current_max: int  # highest pids.current sampled while it ran
    peak: int | None  # pids.peak just before the kill
    events_after_kill: dict[str, int]
    procs_after_kill: list[int]


def _refused(fs: CgroupFS, rel: str) -> int:
    return (fs.pids_events(rel) or {}).get("max", 0)


@pytest.fixture(scope="module")
def bomb(cgfs: CgroupFS, make_module_cgroup, wait_until) -> BombRun:
    rel = make_module_cgroup("bomb")
    cgfs.write(rel, "pids.max", str(CAP))
    # Never start a bomb that its cgroup does not cap.
    assert cgfs.pids_max(rel) == CAP
    procs = f"{cgfs.abspath(rel)}/cgroup.procs"
    # The shell moves itself into the cgroup, then becomes the bomb; all output is discarded
    # (bash prints "fork: retry" for every refused fork).
    starter = subprocess.Popen(
        ["sh", "-c", 'echo 0 > "$1" && exec bash -c "$0"', BOMB, procs],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        current_max = 0

        def sample() -> int:
            nonlocal current_max
            current_max = max(current_max, cgfs.task_count(rel).tasks)
            return _refused(cgfs, rel)

        refused_first = wait_until(sample, "the bomb to hit pids.max")
        refused_later = wait_until(lambda: (n := sample()) > refused_first and n, "more refused forks")
        peak = cgfs.pids_peak(rel)
    finally:
        cgfs.kill(rel)
        starter.wait()
    wait_until(lambda: not cgfs.populated(rel), "the bomb's cgroup to empty after cgroup.kill")
    return BombRun(
        cgroup=rel, pids_max=cgfs.pids_max(rel), refused_first=refused_first, refused_later=refused_later,
        current_max=current_max, peak=peak, events_after_kill=cgfs.events(rel),
        procs_after_kill=cgfs.procs(rel),
    )


def test_pids_max_holds_the_bomb(bomb: BombRun):
    assert bomb.pids_max == CAP
    assert 0 < bomb.current_max <= CAP


def test_pids_events_max_counts_refused_forks(bomb: BombRun):
    assert bomb.refused_first >= 1
    assert bomb.refused_later > bomb.refused_first


def test_pids_peak_reports_the_cap(bomb: BombRun):
    # A fork is refused only with pids.current at the limit, so the peak is exactly the cap.
    assert bomb.peak == CAP


def test_cgroup_kill_leaves_it_unpopulated(bomb: BombRun):
    assert bomb.events_after_kill.get("populated") == 0
    assert bomb.procs_after_kill == []
