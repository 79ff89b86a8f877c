"""attribute() on real cgroups: paths as cgroupfs and /proc/PID/cgroup give them, and from inside a
private cgroup namespace. (The table of path shapes and the invariants are unit tests: tests/unit/test_attribution.py.)"""

from __future__ import annotations

import os
import time

import pytest

from cgguard.attribution import attribute
from cgguard.kernel.cgroupns import cgroupns_root_depth, resolve_cgroupns_path

CID = "3f1c9a0e" * 8  # 64 hex, the shape of every OCI runtime's container ID
CID2 = "b7d24e61" * 8
UID = "6b5a7f8e-1c2d-4e3f-9a0b-1c2d3e4f5a6b"
UID_ = UID.replace("-", "_")


# -- real cgroups ---------------------------------------------------------------------------
REAL_SHAPES = [
    (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     dict(kind="pod", pod_uid=UID, qos="burstable", container_id=CID, runtime="containerd")),
    (f"kubepods/besteffort/pod{UID}/{CID2}", dict(kind="pod", qos="besteffort", container_id=CID2, runtime=None)),
    (f"system.slice/docker-{CID}.scope", dict(kind="container", runtime="docker", container_id=CID)),
    (f"user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID2}.scope",
     dict(kind="container", runtime="podman", uid=1000)),
    ("user.slice/user-1000.slice/session-3.scope", dict(kind="session", uid=1000, session="3")),
    (r"machine.slice/machine-qemu\x2d1\x2dvm1.scope", dict(kind="machine", name="machine qemu-1-vm1")),
    ("system.slice/nginx.service/worker", dict(kind="service", unit="nginx.service", subpath="worker")),
]


@pytest.fixture
def sandbox():
    from cgguard.kernel.cgroupfs import CgroupError, NoCgroup2
    from cgguard.testkit.sandbox import Sandbox

    if os.geteuid() != 0:
        pytest.skip("real cgroups need root")
    try:
        sb = Sandbox.create(prefix="cgguard-test-attr")
    except (NoCgroup2, CgroupError, OSError) as e:
        pytest.skip(f"no writable cgroup2 tree: {e}")
    try:
        yield sb
    finally:
        left = sb.close()
        assert left == [], f"cgroups left behind: {left}"
        assert not sb.fs.exists(sb.name)


def test_real_cgroups_under_sandbox(sandbox) -> None:
    from cgguard.kernel.cgroupns import own_cgroup

    procs = []
    for sub, expected in REAL_SHAPES:
        rel = sandbox.cgroup(sub)
        assert os.path.isdir(sandbox.fs.abspath(rel))
        # The path the agent really gets: from cgroupfs (relpath of the directory) ...
        from_fs = sandbox.fs.relpath(sandbox.fs.abspath(rel))
        assert from_fs == rel
        w = attribute(from_fs)
        assert {k: getattr(w, k) for k in expected} == expected, w
        assert w.cgroup == rel and (w.prefix == sandbox.name or w.prefix.startswith(sandbox.name + "/"))
        procs.append((sandbox.spawn(["sleep", "30"], rel, deadline_s=20), rel, expected))
    # ... and from /proc/PID/cgroup of a process living in it.
    for wl, rel, expected in procs:
        deadline = time.monotonic() + 5
        seen = own_cgroup(wl.proc.pid)
        while seen != rel and time.monotonic() < deadline:
            time.sleep(0.02)
            seen = own_cgroup(wl.proc.pid)
        assert seen == rel
        w = attribute(seen)
        assert {k: getattr(w, k) for k in expected} == expected, w
    # Every level the sandbox made is attributable without error, parents first.
    kinds = {attribute(p).kind for p in sandbox.fs.walk(sandbox.name)}
    assert {"pod", "kubepods", "container", "session", "machine", "service", "slice", "cgroup"} <= kinds


def test_real_private_cgroup_namespace(sandbox) -> None:
    """What a non-privileged Kubernetes container sees: /proc/PID/cgroup from a private cgroupns.

    A process in a pod-shaped cgroup unshares its cgroup namespace (as containerd and CRI-O do
    on cgroup v2) and reads host PID 1's and a sibling container's cgroup; the helpers must map
    what it saw back to the real paths.
    """
    import shutil
    import subprocess

    from cgguard.kernel.cgroupns import own_cgroup

    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not installed")
    own = sandbox.cgroup(f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID2}.scope")
    other = sandbox.cgroup(f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope")
    sib = sandbox.spawn(["sleep", "30"], other, deadline_s=20)
    deadline = time.monotonic() + 5
    while own_cgroup(sib.proc.pid) != other and time.monotonic() < deadline:
        time.sleep(0.02)
    script = f"grep '^0::' /proc/1/cgroup; grep '^0::' /proc/{sib.proc.pid}/cgroup; grep '^0::' /proc/self/cgroup"
    w = sandbox.spawn(["unshare", "--cgroup", "--", "sh", "-c", script], own, deadline_s=20, stdout=subprocess.PIPE)
    out, _ = w.proc.communicate(timeout=15)
    lines = [line[3:] for line in out.decode().split()]
    if len(lines) != 3:
        pytest.skip(f"could not read cgroups inside a new cgroup namespace: {out!r}")
    init_seen, other_seen, self_seen = lines
    assert self_seen == "/"  # inside, our own cgroup is the namespace root
    assert other_seen.startswith("/..")  # and everyone else is relative to it
    # The sandbox hangs off the root, so its common ancestor with PID 1 (at the root or in
    # init.scope) is the root: one '..' per level of our own path.
    assert cgroupns_root_depth(init_seen) == len(own.split("/")), (init_seen, own)
    assert resolve_cgroupns_path(other_seen, own) == other
    w_other = attribute(resolve_cgroupns_path(other_seen, own))
    assert (w_other.kind, w_other.qos, w_other.container_id) == ("pod", "besteffort", CID)

