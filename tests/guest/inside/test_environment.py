"""The guest is the pure cgroup-v2 host that cgguard targets: check what cgguard relies on."""

from __future__ import annotations

from cgguard.kernel.cgroupfs import CgroupFS, find_cgroup2_root, parse_flat_keyed


def _mount_fstypes() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split(" - ", 1)[1].split()[0] for line in f if " - " in line]


def test_cgroup2_is_the_only_hierarchy():
    assert find_cgroup2_root() == "/sys/fs/cgroup"
    fstypes = _mount_fstypes()
    assert fstypes.count("cgroup2") == 1
    assert "cgroup" not in fstypes, "a cgroup v1 hierarchy is mounted"


def test_root_hands_down_the_pids_controller(cgfs: CgroupFS):
    assert {"pids", "memory", "cpu"} <= set(cgfs.controllers(""))
    assert "pids" in cgfs.read("", "cgroup.subtree_control").split()


def test_child_cgroup_has_the_files_cgguard_uses(cgfs: CgroupFS, make_cgroup):
    rel = make_cgroup("files")
    for name in ("cgroup.kill", "cgroup.freeze", "cgroup.events", "pids.max", "pids.current",
                 "pids.peak", "pids.events"):
        assert cgfs.has(rel, name), name
    assert cgfs.pids_max(rel) is None  # "max"
    assert cgfs.task_count(rel).source == "pids.current"
    assert parse_flat_keyed(cgfs.read(rel, "cgroup.events")) == {"populated": 0, "frozen": 0}
    assert cgfs.supports_kill()
