"""Who owns a cgroup: a Kubernetes pod, a container, a systemd unit, a user session.

:func:`attribute` maps a cgroup path (relative to the cgroup2 root) to a :class:`Workload`. It is
pure string work on the naming conventions of kubelet (systemd and cgroupfs drivers), the
container engines and systemd, so it costs nothing at scrape or incident time and needs no API
access (no pod names or namespaces: those need the Kubernetes API, and an incident must be
attributable on a node whose API server is unreachable).

The conventions are matched anywhere in the path, not only at its start, because real hosts nest
them: kind and k3s-in-docker put a kubelet's tree inside a container's cgroup
(``system.slice/docker-<id>.scope/kubelet.slice/kubelet-kubepods.slice/...``), and the test
sandbox puts every shape under ``cgguard-test-<run>/``. What precedes the recognised part is kept
as ``prefix``.

Precedence, most specific first: a Kubernetes pod anywhere in the path, else the innermost
container, else the systemd unit, else a plain cgroup.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

# Label names of :meth:`Workload.labels`, fixed so every series of a metric family has the same
# label set (Prometheus requires it). No Kubernetes namespace or pod name: see the module doc.
LABEL_NAMES: tuple[str, ...] = ("workload_kind", "workload", "pod_uid", "container_id", "qos", "runtime")

KINDS: tuple[str, ...] = (
    "pod",  # a Kubernetes pod, or a container of one (container_id set)
    "kubepods",  # kubelet's own levels: kubepods, kubepods-burstable, kubepods-besteffort
    "container",  # a container outside Kubernetes: docker, podman, containerd (nerdctl), lxc
    "machine",  # a systemd-machined VM or container (systemd-nspawn, libvirt)
    "service",  # a system service (system.slice/nginx.service)
    "scope",  # a system scope (init.scope, run-*.scope)
    "session",  # a login session (user.slice/user-1000.slice/session-3.scope)
    "user-service",  # a unit of a user's service manager (user@1000.service/app.slice/...)
    "unit",  # another unit type with a cgroup (.socket, .mount, .swap helpers)
    "slice",  # a slice (user.slice, system.slice, user-1000.slice)
    "cgroup",  # anything else
    "root",  # the cgroup2 root itself
)

_HEX64 = r"[0-9a-f]{64}"

# -- Kubernetes ------------------------------------------------------------------------------
# systemd driver. kubelet's --cgroup-root adds a dash-joined prefix to every slice name
# (kind: kubelet-kubepods.slice, kubelet-kubepods-burstable.slice, ...), hence the optional
# "(.+-)" in front. Pod UIDs have their dashes replaced by underscores (a dash in a slice
# name means nesting for systemd).
_K8S_SD_ROOT = re.compile(r"^(?:.+-)?kubepods\.slice$")
_K8S_SD_QOS = re.compile(r"^(?:.+-)?kubepods-(burstable|besteffort)\.slice$")
_K8S_SD_POD = re.compile(r"^(?:.+-)?kubepods(?:-(burstable|besteffort))?-pod([0-9a-fA-F_]+)\.slice$")
# cgroupfs driver: kubepods/[burstable|besteffort/]pod<uid>/<container id>.
_K8S_FS_POD = re.compile(r"^pod([0-9a-fA-F-]+)$")

# A container directly below a pod: runtime by its naming convention.
_POD_CONTAINER: tuple[tuple[re.Pattern[str], str | None], ...] = (
    (re.compile(rf"^cri-containerd-({_HEX64})\.scope$"), "containerd"),
    (re.compile(rf"^crio-conmon-({_HEX64})(?:\.scope)?$"), "cri-o"),  # CRI-O's monitor process
    (re.compile(rf"^crio-({_HEX64})(?:\.scope)?$"), "cri-o"),
    (re.compile(rf"^docker-({_HEX64})\.scope$"), "docker"),  # dockershim / cri-dockerd
    (re.compile(rf"^({_HEX64})$"), None),  # cgroupfs driver: the bare ID does not tell the runtime
)

# -- containers outside Kubernetes -----------------------------------------------------------
# Each matches one path component; _PARENT_CONTAINER needs a fixed parent component.
_CONTAINER: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"^docker-({_HEX64})\.scope$"), "docker"),
    (re.compile(rf"^libpod-conmon-({_HEX64})(?:\.scope)?$"), "podman"),
    (re.compile(rf"^libpod-({_HEX64})(?:\.scope)?$"), "podman"),
    (re.compile(rf"^nerdctl-({_HEX64})\.scope$"), "containerd"),
    (re.compile(r"^lxc\.(?:payload|monitor)\.(.+)$"), "lxc"),
)
_PARENT_CONTAINER: dict[str, tuple[re.Pattern[str], str]] = {
    "docker": (re.compile(rf"^({_HEX64})$"), "docker"),  # dockerd with the cgroupfs driver
    "libpod_parent": (re.compile(rf"^libpod-(?:conmon-)?({_HEX64})$"), "podman"),
}

# -- systemd ---------------------------------------------------------------------------------
_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")
_USER_SLICE = re.compile(r"^user-(\d+)\.slice$")
_SESSION = re.compile(r"^session-([A-Za-z0-9]+)\.scope$")
_USER_MANAGER = re.compile(r"^user@(\d+)\.service$")
_MACHINE = re.compile(r"^machine-(.+)\.scope$")
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


@dataclass(frozen=True, slots=True)
class Workload:
    """What a cgroup belongs to.

    ``cgroup`` is the attributed path, ``base`` the cgroup of the workload as a whole (the pod
    slice, the container scope, the unit), ``prefix`` what precedes the recognised hierarchy and
    ``subpath`` what lies below ``base``. Fields that do not apply to a kind are None.
    """

    kind: str
    cgroup: str
    name: str
    base: str
    prefix: str = ""
    subpath: str = ""
    pod_uid: str | None = None
    qos: str | None = None  # guaranteed | burstable | besteffort
    container_id: str | None = None
    runtime: str | None = None  # containerd | cri-o | docker | podman | lxc
    unit: str | None = None  # systemd unit name as systemd spells it (escapes kept)
    slice: str | None = None  # the slice holding the unit
    uid: int | None = None
    session: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def labels(self) -> dict[str, str]:
        """Prometheus labels (names in ``LABEL_NAMES``); absent values are ''."""
        return {
            "workload_kind": self.kind,
            "workload": self.name,
            "pod_uid": self.pod_uid or "",
            "container_id": self.container_id or "",
            "qos": self.qos or "",
            "runtime": self.runtime or "",
        }


def _join(parts: list[str] | tuple[str, ...]) -> str:
    return "/".join(parts)


def _unescape(name: str) -> str:
    r"""systemd escapes '-' and other bytes in unit names as \xNN (machine-qemu\x2d1.scope)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)


def normalize_pod_uid(raw: str) -> str:
    """Pod UID as the API shows it: the systemd driver's underscores become dashes again.

    Static (mirror) pods have a 32-hex config hash as UID, without dashes; it stays as it is.
    """
    return raw.replace("_", "-").lower()


def _split(path: str) -> list[str]:
    return [p for p in path.strip().strip("/").split("/") if p and p != "."]


# -- Kubernetes ------------------------------------------------------------------------------
def _kubernetes(parts: list[str], path: str) -> Workload | None:
    for i, comp in enumerate(parts):
        if _K8S_SD_ROOT.match(comp) or _K8S_SD_QOS.match(comp) or _K8S_SD_POD.match(comp):
            return _k8s_systemd(parts, i, path)
        if comp == "kubepods":
            return _k8s_cgroupfs(parts, i, path)
    return None


def _k8s_systemd(parts: list[str], start: int, path: str) -> Workload:
    prefix = _join(parts[:start])
    qos: str | None = None
    for i in range(start, len(parts)):
        comp = parts[i]
        pod = _K8S_SD_POD.match(comp)
        if pod:
            return _pod(parts, i, path, prefix, pod.group(1) or "guaranteed", normalize_pod_uid(pod.group(2)))
        q = _K8S_SD_QOS.match(comp)
        if q:
            qos = q.group(1)
            continue
        if _K8S_SD_ROOT.match(comp):
            continue
        # Something else below kubepods (not a pod): attribute to the last kubelet level.
        return _kubepods(parts, i, path, prefix, qos)
    return _kubepods(parts, len(parts), path, prefix, qos)


def _k8s_cgroupfs(parts: list[str], start: int, path: str) -> Workload:
    prefix = _join(parts[:start])
    qos: str | None = None
    i = start + 1
    if i < len(parts) and parts[i] in ("burstable", "besteffort"):
        qos = parts[i]
        i += 1
    if i < len(parts):
        pod = _K8S_FS_POD.match(parts[i])
        if pod:
            return _pod(parts, i, path, prefix, qos or "guaranteed", normalize_pod_uid(pod.group(1)))
    return _kubepods(parts, i, path, prefix, qos)


def _kubepods(parts: list[str], end: int, path: str, prefix: str, qos: str | None) -> Workload:
    base = _join(parts[:end])
    return Workload(
        kind="kubepods",
        cgroup=path,
        name=parts[end - 1] if end else path,
        base=base,
        prefix=prefix,
        subpath=_join(parts[end:]),
        qos=qos,
    )


def _pod(parts: list[str], i: int, path: str, prefix: str, qos: str, uid: str) -> Workload:
    cid: str | None = None
    runtime: str | None = None
    end = i + 1
    if end < len(parts):
        for rx, rt in _POD_CONTAINER:
            m = rx.match(parts[end])
            if m:
                cid, runtime, end = m.group(1), rt, end + 1
                break
    name = f"pod {uid}" + (f" container {cid[:12]}" if cid else "")
    return Workload(
        kind="pod",
        cgroup=path,
        name=name,
        base=_join(parts[:end]),
        prefix=prefix,
        subpath=_join(parts[end:]),
        pod_uid=uid,
        qos=qos,
        container_id=cid,
        runtime=runtime,
    )


# -- containers ------------------------------------------------------------------------------
def _container(parts: list[str], path: str) -> Workload | None:
    # The innermost container wins: docker-in-docker, or podman's "container" child cgroup
    # (libpod-<id>.scope/container) both name the workload at the deepest match.
    found: tuple[int, str, str] | None = None
    for i, comp in enumerate(parts):
        for rx, rt in _CONTAINER:
            m = rx.match(comp)
            if m:
                found = (i, m.group(1), rt)
                break
        else:
            if i > 0 and parts[i - 1] in _PARENT_CONTAINER:
                rx, rt = _PARENT_CONTAINER[parts[i - 1]]
                m = rx.match(comp)
                if m:
                    found = (i, m.group(1), rt)
    if found is None:
        return None
    i, ident, runtime = found
    is_id = re.fullmatch(_HEX64, ident) is not None
    uid = _uid_of(parts[:i])
    return Workload(
        kind="container",
        cgroup=path,
        name=f"{runtime} {ident[:12] if is_id else ident}",
        base=_join(parts[: i + 1]),
        prefix=_join(parts[:i]),
        subpath=_join(parts[i + 1 :]),
        container_id=ident if is_id else None,
        runtime=runtime,
        uid=uid,  # rootless podman under user@UID.service
        slice=next((p for p in reversed(parts[:i]) if p.endswith(".slice")), None),
    )


def _uid_of(parts: list[str]) -> int | None:
    for p in parts:
        m = _USER_SLICE.match(p) or _USER_MANAGER.match(p)
        if m:
            return int(m.group(1))
    return None


# -- systemd ---------------------------------------------------------------------------------
def _is_unit(comp: str) -> bool:
    return comp.endswith(_UNIT_SUFFIXES) or comp.endswith(".slice")


def _systemd(parts: list[str], path: str) -> Workload | None:
    start = next((i for i, p in enumerate(parts) if _is_unit(p)), None)
    if start is None:
        return None
    prefix = _join(parts[:start])
    i = start
    slices: list[str] = []
    while i < len(parts) and parts[i].endswith(".slice"):
        slices.append(parts[i])
        i += 1
    uid = _uid_of(slices)
    if i == len(parts):
        return Workload(kind="slice", cgroup=path, name=slices[-1], base=path, prefix=prefix, unit=slices[-1],
                        slice=slices[-2] if len(slices) > 1 else None, uid=uid)
    comp = parts[i]
    base = _join(parts[: i + 1])
    rest = _join(parts[i + 1 :])
    parent = slices[-1] if slices else None
    if not comp.endswith(_UNIT_SUFFIXES):
        # A directory under a slice that no unit owns: systemd did not make it.
        return Workload(kind="cgroup", cgroup=path, name=path, base=path, prefix=prefix, slice=parent, uid=uid)

    def unit(kind: str, name: str, uid: int | None = uid, session: str | None = None) -> Workload:
        return Workload(kind=kind, cgroup=path, name=name, base=base, prefix=prefix, subpath=rest, unit=comp,
                        slice=parent, uid=uid, session=session)

    manager = _USER_MANAGER.match(comp)
    if manager:
        manager_uid = int(manager.group(1))
        inner = _user_unit(parts[i + 1 :], manager_uid, path, prefix, base)
        return inner if inner is not None else unit("service", comp, uid=manager_uid)  # the manager itself
    session = _SESSION.match(comp)
    if session and uid is not None:
        return unit("session", f"session {session.group(1)} of uid {uid}", session=session.group(1))
    machine = _MACHINE.match(comp)
    if machine and parent == "machine.slice":
        return unit("machine", f"machine {_unescape(machine.group(1))}")
    kind = "service" if comp.endswith(".service") else "scope" if comp.endswith(".scope") else "unit"
    return unit(kind, comp)


def _user_unit(parts: list[str], uid: int, path: str, prefix: str, manager_base: str) -> Workload | None:
    """A unit of ``user@UID.service``: the user's manager has its own slice tree below it."""
    if not parts:
        return None
    i = 0
    while i < len(parts) and parts[i].endswith(".slice"):
        i += 1
    if i < len(parts) and parts[i].endswith(_UNIT_SUFFIXES):
        unit, end = parts[i], i + 1
    elif i > 0:
        unit, end = parts[i - 1], i  # only slices (app.slice), or a stray directory below one
    else:
        return None
    slice_ = parts[end - 2] if end >= 2 and parts[end - 2].endswith(".slice") else None
    return Workload(
        kind="user-service",
        cgroup=path,
        name=f"user {uid}: {unit}",
        base=_join([manager_base, *parts[:end]]),
        prefix=prefix,
        subpath=_join(parts[end:]),
        unit=unit,
        slice=slice_,
        uid=uid,
    )


# -- entry points ----------------------------------------------------------------------------
@lru_cache(maxsize=8192)
def attribute(cgroup_path: str) -> Workload:
    """Attribute a cgroup path (relative to the cgroup2 root; a leading '/' is accepted)."""
    parts = _split(cgroup_path)
    # Paths read inside a private cgroup namespace can start with '..' (see
    # resolve_cgroupns_path); the conventions below them still apply.
    path = _join(parts)
    if not parts:
        return Workload(kind="root", cgroup="", name="/", base="")
    for finder in (_kubernetes, _container, _systemd):
        w = finder(parts, path)
        if w is not None:
            return w
    return Workload(kind="cgroup", cgroup=path, name=path, base=path)
