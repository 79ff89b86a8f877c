"""attribute(): table of real-world cgroup path shapes, invariants on random paths, real cgroups."""

from __future__ import annotations

import json
import os
import time

import pytest

from cgguard.attribution import (
    KINDS,
    LABEL_NAMES,
    attribute,
)
from cgguard.kernel.cgroupns import cgroupns_root_depth, resolve_cgroupns_path

CID = "3f1c9a0e" * 8  # 64 hex, the shape of every OCI runtime's container ID
CID2 = "b7d24e61" * 8
UID = "6b5a7f8e-1c2d-4e3f-9a0b-1c2d3e4f5a6b"
UID_ = UID.replace("-", "_")
STATIC_UID = "5fa8d4bd0c2a2ac8a1bb4c3e5b6bdbfe"  # mirror pods: the config hash, no dashes

# (path, expected fields). Only the listed fields are checked; every row also goes through the
# invariants in test_table_invariants.
TABLE: list[tuple[str, dict]] = [
    # -- Kubernetes, systemd cgroup driver ---------------------------------------------------
    (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
        dict(kind="pod", pod_uid=UID, qos="burstable", container_id=CID, runtime="containerd", prefix="", subpath=""),
    ),
    (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope",
        dict(kind="pod", pod_uid=UID, qos="besteffort", container_id=CID, runtime="cri-o"),
    ),
    (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope",
        dict(kind="pod", qos="burstable", container_id=CID, runtime="cri-o"),
    ),
    (
        f"kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope",
        dict(kind="pod", pod_uid=UID, qos="guaranteed", container_id=CID, runtime="docker"),
    ),
    (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice",
        dict(kind="pod", pod_uid=UID, qos="burstable", container_id=None, runtime=None, name=f"pod {UID}"),
    ),
    (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{CID}.scope",
        dict(kind="pod", pod_uid=STATIC_UID, qos="burstable", container_id=CID),
    ),
    (
        # processes a container made cgroups for (cgroupns + systemd inside the container)
        f"kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/init.scope",
        dict(kind="pod", container_id=CID, subpath="init.scope",
             base=f"kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"),
    ),
    ("kubepods.slice/kubepods-burstable.slice", dict(kind="kubepods", qos="burstable", pod_uid=None)),
    ("kubepods.slice", dict(kind="kubepods", qos=None, name="kubepods.slice")),
    # -- Kubernetes, cgroupfs driver ---------------------------------------------------------
    (f"kubepods/burstable/pod{UID}/{CID}", dict(kind="pod", pod_uid=UID, qos="burstable", container_id=CID, runtime=None)),
    (f"kubepods/pod{UID}/{CID}", dict(kind="pod", pod_uid=UID, qos="guaranteed", container_id=CID)),
    (f"kubepods/besteffort/pod{UID}/crio-{CID}", dict(kind="pod", qos="besteffort", container_id=CID, runtime="cri-o")),
    (f"kubepods/besteffort/pod{UID}", dict(kind="pod", qos="besteffort", container_id=None)),
    ("kubepods/burstable", dict(kind="kubepods", qos="burstable")),
    (f"/kubepods/burstable/pod{UID}/{CID}/", dict(kind="pod", pod_uid=UID, container_id=CID)),  # /proc style
    # -- Kubernetes nested in something else ------------------------------------------------
    (
        # kind: kubelet --cgroup-root=/kubelet with the systemd driver, seen inside the node
        f"kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
        dict(kind="pod", pod_uid=UID, qos="besteffort", container_id=CID, runtime="containerd", prefix="kubelet.slice"),
    ),
    (
        # the same kind node seen from the host: the pod beats the node's docker container
        f"system.slice/docker-{CID2}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
        dict(kind="pod", pod_uid=UID, qos="guaranteed", container_id=CID, prefix=f"system.slice/docker-{CID2}.scope/kubelet.slice"),
    ),
    (
        # k3s in docker, cgroupfs driver
        f"system.slice/docker-{CID2}.scope/kubepods/burstable/pod{UID}/{CID}",
        dict(kind="pod", qos="burstable", container_id=CID, prefix=f"system.slice/docker-{CID2}.scope"),
    ),
    (
        # a pod's docker-in-docker: still the pod (and its outer container)
        f"kubepods/pod{UID}/{CID}/docker/{CID2}",
        dict(kind="pod", container_id=CID, subpath=f"docker/{CID2}"),
    ),
    # -- containers outside Kubernetes ------------------------------------------------------
    (f"system.slice/docker-{CID}.scope", dict(kind="container", runtime="docker", container_id=CID, slice="system.slice", name=f"docker {CID[:12]}")),
    (f"docker/{CID}", dict(kind="container", runtime="docker", container_id=CID)),
    (f"system.slice/docker-{CID2}.scope/docker/{CID}", dict(kind="container", container_id=CID)),  # dind: innermost
    (f"machine.slice/libpod-{CID}.scope", dict(kind="container", runtime="podman", container_id=CID, uid=None)),
    (f"machine.slice/libpod-{CID}.scope/container", dict(kind="container", runtime="podman", container_id=CID, subpath="container")),
    (f"machine.slice/libpod-conmon-{CID}.scope", dict(kind="container", runtime="podman", container_id=CID)),
    (
        f"machine.slice/machine-libpod_pod_{CID2}.slice/libpod-{CID}.scope",
        dict(kind="container", runtime="podman", container_id=CID, slice=f"machine-libpod_pod_{CID2}.slice"),
    ),
    (
        f"user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope",
        dict(kind="container", runtime="podman", container_id=CID, uid=1000),
    ),
    (f"libpod_parent/libpod-{CID}", dict(kind="container", runtime="podman", container_id=CID)),
    (f"system.slice/nerdctl-{CID}.scope", dict(kind="container", runtime="containerd", container_id=CID)),
    ("lxc.payload.web1", dict(kind="container", runtime="lxc", container_id=None, name="lxc web1")),
    ("lxc.payload.web1/system.slice/cron.service", dict(kind="container", runtime="lxc", subpath="system.slice/cron.service")),
    # -- systemd -----------------------------------------------------------------------------
    ("system.slice/nginx.service", dict(kind="service", unit="nginx.service", slice="system.slice", name="nginx.service")),
    ("system.slice/foo.service/bar", dict(kind="service", unit="foo.service", subpath="bar", base="system.slice/foo.service")),
    ("system.slice/system-getty.slice/getty@tty1.service", dict(kind="service", unit="getty@tty1.service", slice="system-getty.slice")),
    ("system.slice/docker.service", dict(kind="service", unit="docker.service")),
    ("system.slice/run-r3b2c1d0e.scope", dict(kind="scope", unit="run-r3b2c1d0e.scope")),
    ("system.slice/home.mount", dict(kind="unit", unit="home.mount")),
    ("init.scope", dict(kind="scope", unit="init.scope", slice=None)),
    ("system.slice", dict(kind="slice", unit="system.slice", slice=None)),
    ("system.slice/not-a-unit", dict(kind="cgroup", slice="system.slice")),
    ("user.slice", dict(kind="slice", uid=None)),
    ("user.slice/user-1000.slice", dict(kind="slice", uid=1000, slice="user.slice")),
    ("user.slice/user-1000.slice/session-3.scope", dict(kind="session", uid=1000, session="3", unit="session-3.scope")),
    ("user.slice/user-1000.slice/session-c1.scope", dict(kind="session", uid=1000, session="c1")),
    ("user.slice/user-1000.slice/user@1000.service", dict(kind="service", unit="user@1000.service", uid=1000)),
    (
        "user.slice/user-1000.slice/user@1000.service/app.slice/foo.service",
        dict(kind="user-service", uid=1000, unit="foo.service", slice="app.slice", name="user 1000: foo.service"),
    ),
    (
        "user.slice/user-1000.slice/user@1000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-ab12.scope",
        dict(kind="user-service", uid=1000, unit="vte-spawn-ab12.scope", slice="app-org.gnome.Terminal.slice"),
    ),
    ("user.slice/user-1000.slice/user@1000.service/init.scope", dict(kind="user-service", uid=1000, unit="init.scope")),
    ("user.slice/user-1000.slice/user@1000.service/app.slice", dict(kind="user-service", uid=1000, unit="app.slice")),
    (
        "user.slice/user-1000.slice/user@1000.service/app.slice/make.service/sub",
        dict(kind="user-service", unit="make.service", subpath="sub",
             base="user.slice/user-1000.slice/user@1000.service/app.slice/make.service"),
    ),
    (r"machine.slice/machine-qemu\x2d1\x2dvm1.scope", dict(kind="machine", name="machine qemu-1-vm1", unit=r"machine-qemu\x2d1\x2dvm1.scope")),
    ("machine.slice/machine-debian.scope/payload/system.slice/x.service", dict(kind="machine", subpath="payload/system.slice/x.service")),
    ("cgguard-test-1-abc/system.slice/nginx.service", dict(kind="service", unit="nginx.service", prefix="cgguard-test-1-abc")),
    # -- the rest ----------------------------------------------------------------------------
    ("", dict(kind="root", name="/", base="")),
    ("/", dict(kind="root")),
    ("foo/bar", dict(kind="cgroup", name="foo/bar", base="foo/bar")),
    ("ci-runner/job-17", dict(kind="cgroup")),
]


def _check_invariants(path: str) -> None:
    w = attribute(path)
    norm = "/".join(p for p in path.strip().strip("/").split("/") if p and p != ".")
    assert w.kind in KINDS
    assert w.cgroup == norm
    # base is the path cut at the workload, subpath the rest, prefix a leading part of base
    assert "/".join(x for x in (w.base, w.subpath) if x) == w.cgroup
    assert w.base == w.prefix or w.base.startswith(w.prefix + "/") or w.prefix == ""
    labels = w.labels()
    assert tuple(labels) == LABEL_NAMES
    assert all(isinstance(v, str) for v in labels.values())
    assert labels["workload_kind"] == w.kind
    d = w.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["kind"] == w.kind and d["pod_uid"] == w.pod_uid


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

