"""Kernel edge: the cgroup-v1 ``pids`` hierarchy of hybrid hosts.

On a hybrid host (systemd's default on older distributions, and CI machines of this kind) the
task limits live in v1: Docker's ``--pids-limit`` and systemd's ``TasksMax=`` write
``/sys/fs/cgroup/pids/<path>/pids.max``, while the cgroup2 tree has no ``pids`` controller. A
runaway that fills such a limit is invisible in cgroup2 (its ``cgroup.threads`` count goes flat
and refused forks raise no proc-connector event), so the agent reads the v1 files for the
processes of each watched cgroup.

v1 ``pids.events`` raises no inotify event (only the default hierarchy notifies): it is sampled.
"""

from __future__ import annotations

import os

from cgguard.kernel.cgroupfs import _unescape_mountinfo

MOUNTINFO = "/proc/self/mountinfo"


def find_pids_v1_root(mountinfo: str = MOUNTINFO) -> str | None:
    """Mount point of the v1 hierarchy that has the pids controller, or None (pure v2 host)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return parse_pids_v1_root(text)


def parse_pids_v1_root(mountinfo_text: str) -> str | None:
    for line in mountinfo_text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(rfields) >= 3 and rfields[0] == "cgroup" and "pids" in rfields[2].split(",") and len(fields) >= 5:
            # Only a mount of the hierarchy's root shows the whole tree.
            if fields[3] == "/":
                return _unescape_mountinfo(fields[4])
    return None


def _pids_line(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                _, ctrls, cg = line.rstrip("\n").split(":", 2)
                if "pids" in ctrls.split(","):
                    return cg.strip("/")
    except (OSError, ValueError):
        return None
    return None


def v1_pids_path(pid: int, threads_to_try: int = 8) -> str | None:
    """The v1 pids cgroup of a process, relative to the v1 pids root ("" is the root), or None.

    A process whose main thread has exited (``pthread_exit()`` in ``main``) while its other
    threads run shows "/" for every v1 hierarchy in ``/proc/<pid>/cgroup``: the kernel prints the
    root for an exiting task. Its live threads still show where the process is charged.
    """
    path = _pids_line(f"/proc/{pid}/cgroup")
    if path != "":
        return path
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return path
    for tid in tids[:threads_to_try]:
        if tid != str(pid):
            found = _pids_line(f"/proc/{pid}/task/{tid}/cgroup")
            if found:
                return found
    return path


def limit_chain(root: str, rel: str) -> list[tuple[str, int]]:
    """The finite ``pids.max`` values of ``rel`` and its ancestors in the v1 pids hierarchy,
    nearest first, as (path, limit). v1 limits are hierarchical like v2's: every one counts."""
    out: list[tuple[str, int]] = []
    cur = rel.strip("/")
    while True:
        try:
            with open(os.path.join(root, cur, "pids.max"), "rb") as f:
                text = f.read().strip()
            if text and text != b"max":
                out.append((cur, int(text)))
        except (OSError, ValueError):
            pass
        if not cur:
            return out
        cur = cur.rsplit("/", 1)[0] if "/" in cur else ""
