

from cgguard.kernel.cgroupfs import parse_cgroup2_mounts, parse_flat_keyed, parse_max

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
CONTAINER = (
    "1 0 0:26 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n"
    "2 0 0:26 / /host\\040cgroup rw - cgroup2 cgroup2 rw\n"
)


def test_parse_mountinfo_shapes():
    assert parse_cgroup2_mounts(HYBRID) == ["/sys/fs/cgroup/unified"]
    assert parse_cgroup2_mounts(PURE) == ["/sys/fs/cgroup"]
    # a bind mount of a sub-cgroup is not the whole tree; the escaped real root is preferred
    assert parse_cgroup2_mounts(CONTAINER) == ["/host cgroup"]
    assert parse_cgroup2_mounts("1 0 0:1 / / rw - ext4 /dev/vda rw\n") == []


def test_parse_files():
    assert parse_flat_keyed("populated 1\nfrozen 0\n") == {"populated": 1, "frozen": 0}
    assert parse_max("max\n") is None and parse_max("512\n") == 512


def test_no_cgroup2_is_one_line_exit_2(tmp_path):
    from conftest import run_cli

    fake = tmp_path / "mi"
    fake.write_text("1 0 0:1 / / rw - ext4 /dev/vda rw\n")
    # the real binary, pointed at a root that is not cgroup2
    r = run_cli("run", "--watch", "x/**", "--cgroup-root", str(tmp_path), "--listen", "", "--no-lineage")
    assert r.returncode == 2 and "not a cgroup2 mount" in r.stderr
