"""attribute(): table of real-world cgroup path shapes, invariants on random paths (real cgroups: tests/integration/test_attribution_live.py)."""

from __future__ import annotations

import json
import random

import pytest

from cgguard.attribution import (
    KINDS,
    LABEL_NAMES,
    attribute,
    normalize_pod_uid,
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


@pytest.mark.parametrize("path,expected", TABLE, ids=[p or "<root>" for p, _ in TABLE])
def test_table(path: str, expected: dict) -> None:
    w = attribute(path)
    got = {k: getattr(w, k) for k in expected}
    assert got == expected, w


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


@pytest.mark.parametrize("path", [p for p, _ in TABLE], ids=[p or "<root>" for p, _ in TABLE])
def test_table_invariants(path: str) -> None:
    _check_invariants(path)


def test_random_paths_never_break_invariants() -> None:
    pieces = [
        "kubepods", "kubepods.slice", "kubepods-burstable.slice", f"kubepods-pod{UID_}.slice", f"pod{UID}",
        "burstable", "besteffort", CID, f"cri-containerd-{CID}.scope", f"docker-{CID}.scope", "docker",
        "libpod_parent", f"libpod-{CID}", "user.slice", "user-1000.slice", "user@1000.service", "app.slice",
        "session-2.scope", "system.slice", "x.service", "machine.slice", "machine-a.scope", "lxc.payload.",
        "..", "a", "-", "pod", ".slice", "@.service", "user-.slice", "kubepods-pod.slice",
    ]
    rnd = random.Random(20110324)  # fixed seed: a failure is reproducible
    for _ in range(3000):
        path = "/".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 7)))
        _check_invariants(path)


def test_pod_uid_normalized_and_workload_frozen() -> None:
    assert normalize_pod_uid(UID_.upper()) == UID
    assert normalize_pod_uid(STATIC_UID) == STATIC_UID
    w = attribute(f"kubepods/pod{UID}/{CID}")
    with pytest.raises(AttributeError):
        w.kind = "cgroup"  # type: ignore[misc]
    assert w.labels() == {
        "workload_kind": "pod",
        "workload": f"pod {UID} container {CID[:12]}",
        "pod_uid": UID,
        "container_id": CID,
        "qos": "guaranteed",
        "runtime": "",
    }


def test_cgroupns_relative_paths() -> None:
    # Inside a private cgroup namespace rooted at our own container's cgroup, another pod's
    # container shows as '/../../..'-relative; resolving it restores the full path.
    own = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID2}.scope"
    seen = f"/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
    real = resolve_cgroupns_path(seen, own)
    assert real == f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
    assert attribute(real).qos == "besteffort" and attribute(real).container_id == CID
    assert resolve_cgroupns_path("/", own) == own
    assert resolve_cgroupns_path("/../../../../system.slice/x.service", own) == "system.slice/x.service"
    assert resolve_cgroupns_path("/a", "") == "a"  # the initial namespace: nothing to resolve
    with pytest.raises(ValueError):
        resolve_cgroupns_path("/../../../../../x", own)
    # how deep our namespace root is, from host PID 1's path as we see it
    assert cgroupns_root_depth("/../../../../init.scope") == 4
    assert cgroupns_root_depth("/../../../..") == 4  # PID 1 at the root itself
    assert cgroupns_root_depth("/init.scope") == 0  # the initial namespace
    assert cgroupns_root_depth("/") == 0
    # together: the depth tells which level of the real tree holds our own cgroup
    assert len(own.split("/")) == cgroupns_root_depth("/../../../../init.scope")
