"""Kernel edge: cgroup namespaces. Paths in /proc/PID/cgroup, translated to the real tree.

A non-privileged container on cgroup v2 gets a private cgroup namespace; inside it
``/proc/PID/cgroup`` shows paths relative to the namespace root. At start-up the agent finds that
root in the real tree (:func:`adopt_cgroupns_root`) and every path read from /proc is translated
from then on (:func:`own_cgroup`), so globs, protection and lineage all see real paths.
"""

from __future__ import annotations

import os
import posixpath
from typing import TYPE_CHECKING

from cgguard.kernel.cgroupfs import CgroupError, NoCgroup2

if TYPE_CHECKING:
    from cgguard.kernel.cgroupfs import CgroupFS


# Real path (relative to the cgroup2 root) of the cgroup namespace cgguard runs in; "" in the
# initial namespace. Set once at start-up by adopt_cgroupns_root().
_NS_ROOT = ""


def _proc_cgroup_line(pid: int | str) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def own_cgroup(pid: int | str = "self") -> str | None:
    """The cgroup2 path of a process relative to the real cgroup2 root, or None if it exited.

    Inside a private cgroup namespace the kernel shows paths relative to the namespace root; they
    are translated back so that they compare with watch globs and cgroupfs paths.
    """
    line = _proc_cgroup_line(pid)
    if line is None:
        return None
    if not _NS_ROOT:
        return line.strip("/")
    try:
        return resolve_cgroupns_path(line, _NS_ROOT)
    except ValueError:
        return None


def resolve_cgroupns_path(proc_path: str, ns_root: str) -> str:
    """A /proc/PID/cgroup path read inside a private cgroup namespace, made relative to the real root.

    Inside a cgroup namespace (a non-privileged Kubernetes container on cgroup v2 gets one from
    containerd and CRI-O) ``/proc/PID/cgroup`` shows paths relative to the namespace root, with
    ``..`` for each level above it (``0::/../../kubepods-besteffort.slice/...``). Given the real
    path of that root (the agent's own container cgroup) this returns the path relative to the
    cgroup2 root. Raises ValueError if the path climbs above the real root.
    """
    rel = proc_path.strip().lstrip("/")
    joined = posixpath.normpath(posixpath.join("/", ns_root.strip("/"), rel))
    if not joined.startswith("/"):
        raise ValueError(f"{proc_path!r} climbs above the cgroup2 root from {ns_root!r}")
    # normpath("/..") is "/", which would silently hide a wrong ns_root: count the levels.
    depth = len([p for p in ns_root.strip("/").split("/") if p])
    ups = 0
    for p in rel.split("/"):
        if p == "..":
            ups += 1
        elif p and p != ".":
            break
    if ups > depth:
        raise ValueError(f"{proc_path!r} climbs {ups} levels above a namespace root {depth} levels deep")
    return joined.strip("/")


def cgroupns_root_depth(init_cgroup_path: str) -> int:
    """How deep the reader's cgroup namespace root lies, from /proc/1/cgroup's cgroup2 path.

    PID 1 of the host (visible with hostPID) lives at or just below the real root, so inside a
    private namespace its path starts with one '..' per level of the namespace root
    (``/../../../../init.scope`` for a root four levels down); in the initial namespace it has
    none and this returns 0. /proc/1/cgroup is world-readable: no ptrace rights are needed, unlike
    comparing /proc/1/ns/cgroup. The agent then finds its own real cgroup at that depth (the one
    whose cgroup.procs lists its PID) and passes it to :func:`resolve_cgroupns_path`.
    """
    depth = 0
    for p in init_cgroup_path.strip().lstrip("/").split("/"):
        if p != "..":
            break
        depth += 1
    return depth


def adopt_cgroupns_root(fs: "CgroupFS") -> str:
    """Find where our cgroup namespace is rooted in the real tree, and translate from now on.

    With hostPID, /proc/1/cgroup shows how far above our namespace root the host's init sits;
    among the cgroups at that depth, ours is the one whose subtree holds our own cgroup with our
    pid in it. Returns the root found ("" in the initial namespace).
    """
    global _NS_ROOT
    init = _proc_cgroup_line(1) or "/"
    depth = cgroupns_root_depth(init)
    if depth == 0:
        _NS_ROOT = ""
        return ""
    mine = (_proc_cgroup_line("self") or "/").strip("/")
    me = str(os.getpid())
    level = [""]
    for _ in range(depth):
        level = [c for cg in level for c in fs.children(cg)]
    for cand in level:
        full = f"{cand}/{mine}" if mine else cand
        try:
            if me in fs.read(full, "cgroup.procs").split():
                _NS_ROOT = cand
                return cand
        except CgroupError:
            continue
    raise NoCgroup2(
        f"running in a cgroup namespace {depth} levels below the root of {fs.root}, "
        "but could not find our own cgroup there; mount the host's cgroup2 tree or run privileged"
    )
