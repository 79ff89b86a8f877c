import os
import time

import pytest

from conftest import wait_until

from cgguard.kernel.cgroupfs import CgroupGone, parse_cgroup2_mounts

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


def test_this_host_root_found_from_mountinfo(cgfs):
    with open("/proc/self/mountinfo") as f:
        assert cgfs.root in parse_cgroup2_mounts(f.read())
    assert cgfs.supports_kill()


def test_counts_kill_freeze_on_real_cgroup(cgfs, sandbox):
    cg = sandbox.cgroup("work")
    import sys

    # sys.executable, not "python3": a pyenv shim would add a bash process in between
    w = sandbox.spawn([sys.executable, "-c", "import threading,time\n"
                       "[threading.Thread(target=time.sleep, args=(30,), daemon=True).start() for _ in range(4)]\n"
                       "time.sleep(30)"], cg, deadline_s=30)
    deadline = time.monotonic() + 5
    while cgfs.count_threads_subtree(cg) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cgfs.count_threads_subtree(cg) == 5  # threads, not processes
    assert cgfs.task_count(cg).tasks == 5
    assert cgfs.populated(cg)
    cgfs.freeze(cg, True)
    deadline = time.monotonic() + 5
    while not cgfs.frozen(cg) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cgfs.frozen(cg)
    cgfs.kill(cg)  # kills frozen tasks too
    deadline = time.monotonic() + 5
    while cgfs.populated(cg) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not cgfs.populated(cg)
    assert w.proc.wait(5) == -9
    cgfs.freeze(cg, False)


def test_vanished_cgroup_raises_gone(cgfs, sandbox):
    cg = sandbox.cgroup("short-lived")
    cgfs.rmdir(cg)
    with pytest.raises(CgroupGone):
        cgfs.kill(cg)
    assert not cgfs.populated(cg)


def test_adopt_cgroupns_root_inside_a_private_cgroup_namespace(cgfs, sandbox):
    """As in a non-privileged container: /proc/PID/cgroup is namespace-relative; cgguard translates."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not installed")
    own = sandbox.cgroup("pod/ctr")
    other = sandbox.cgroup("pod2/ctr")
    sib = sandbox.spawn(["sleep", "30"], other, deadline_s=20)
    deadline = time.monotonic() + 5
    while not cgfs.procs(other) and time.monotonic() < deadline:
        time.sleep(0.02)
    code = (
        "import sys; from cgguard.kernel.cgroupfs import CgroupFS; from cgguard.kernel.cgroupns import adopt_cgroupns_root, own_cgroup; fs = CgroupFS(sys.argv[1]); "
        "print(adopt_cgroupns_root(fs)); print(own_cgroup()); print(own_cgroup(int(sys.argv[2])))"
    )
    w = sandbox.spawn(["unshare", "--cgroup", "--", sys.executable, "-c", code, cgfs.root, str(sib.proc.pid)],
                      own, deadline_s=20, stdout=subprocess.PIPE)
    out, _ = w.proc.communicate(timeout=15)
    assert out.decode().split() == [own, own, other]


def test_moving_an_exited_process_is_not_a_vanished_cgroup(cgfs, sandbox):
    import subprocess

    cg = sandbox.cgroup("dest")
    p = subprocess.Popen(["true"])
    p.wait()
    assert cgfs.move_process(cg, p.pid) is False  # the pid is gone; the cgroup is fine
    assert cgfs.exists(cg)


def test_v1_pids_group_of_a_process_whose_main_thread_exited(sandbox, tmp_path):
    """/proc/<pid>/cgroup shows "/" for every v1 hierarchy once the main thread exits; the
    process is still charged to its v1 group, which its live threads show."""
    import shutil

    from cgguard.kernel import pidsv1
    from cgguard.kernel.procfs import read_stat
    from cgguard.testkit.corpus import leaderless_binary

    if sandbox.mode != "v1-pids":
        reason = f"needs the v1 pids hierarchy (sandbox mode {sandbox.mode})"
        print(reason)
        pytest.skip(reason)
    if shutil.which("gcc") is None:
        print("no gcc")
        pytest.skip("no gcc")
    prog = leaderless_binary(str(tmp_path))
    cg = sandbox.cgroup("leaderless")
    w = sandbox.spawn([prog, "4", "60"], cg, deadline_s=60, cap=64)
    root = pidsv1.find_pids_v1_root()
    want = os.path.relpath(w.v1_dir, root)

    def leaderless() -> bool:
        st = read_stat(w.proc.pid)
        return st is not None and st.state == "Z" and st.num_threads >= 4

    assert wait_until(leaderless), "the main thread did not exit while its threads run"
    assert pidsv1.v1_pids_path(w.proc.pid) == want
