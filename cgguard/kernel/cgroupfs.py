"""Kernel edge: the cgroup2 filesystem.

Everything that reads or writes cgroupfs goes through here, so the rest of cgguard deals in
paths relative to the cgroup2 root ("" is the root itself) and in plain values.

Files are optional by design: on hybrid hosts the cgroup2 tree has no controllers, so
``pids.*`` do not exist and task counts come from ``cgroup.threads`` instead.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"


class CgroupError(Exception):
    """A cgroupfs operation failed for a reason worth reporting."""

    def __init__(self, msg: str, errno_: int | None = None):
        super().__init__(msg)
        self.errno = errno_


class CgroupGone(CgroupError):
    """The cgroup vanished while we worked on it (its processes exited, someone removed it)."""


class NoCgroup2(CgroupError):
    """No usable cgroup2 mount on this host."""


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_cgroup2_mounts(mountinfo_text: str) -> list[str]:
    """Mount points of every cgroup2 filesystem listed in a mountinfo text, in order."""
    mounts = []
    for line in mountinfo_text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype = right.split(" ", 1)[0]
        fields = left.split()
        if fstype == "cgroup2" and len(fields) >= 5:
            # Only a mount of the hierarchy's root shows the whole tree; a bind mount of a
            # sub-cgroup (as in some containers) has field 4 != "/".
            mounts.append((fields[3], _unescape_mountinfo(fields[4])))
    whole = [m for r, m in mounts if r == "/"]
    return whole or [m for _, m in mounts]


def find_cgroup2_root(mountinfo: str = MOUNTINFO) -> str:
    """The cgroup2 mount point, found from mountinfo (pure v2: /sys/fs/cgroup; hybrid: .../unified)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise NoCgroup2(f"cannot read {mountinfo}: {e.strerror}") from None
    mounts = parse_cgroup2_mounts(text)
    if not mounts:
        raise NoCgroup2("no cgroup2 filesystem is mounted (see /proc/self/mountinfo); cgguard needs cgroup v2")
    # Prefer the conventional places when several are mounted (e.g. a container's extra mount).
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in mounts:
            return preferred
    return mounts[0]


def kernel_version(release: str | None = None) -> tuple[int, int]:
    release = release or os.uname().release
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse 'key value' lines (cgroup.events, pids.events, cgroup.stat)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k and v:
            try:
                out[k] = int(v)
            except ValueError:
                continue
    return out


def parse_max(text: str) -> int | None:
    """'max' means unlimited -> None."""
    text = text.strip()
    if not text or text == "max":
        return None
    return int(text)


@dataclass(frozen=True, slots=True)
class TaskCount:
    tasks: int
    source: str  # "pids.current" or "cgroup.threads"


def _gone(e: OSError) -> bool:
    return e.errno in (errno.ENOENT, errno.ENODEV, errno.ESRCH)


class CgroupFS:
    """The cgroup2 tree at ``root``. Paths passed in and out are relative to it."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)

    # -- paths -----------------------------------------------------------------------------
    def abspath(self, rel: str) -> str:
        rel = rel.strip("/")
        return os.path.join(self.root, rel) if rel else self.root

    def relpath(self, path: str) -> str:
        rel = os.path.relpath(path, self.root)
        return "" if rel == "." else rel

    def exists(self, rel: str) -> bool:
        return os.path.isfile(os.path.join(self.abspath(rel), "cgroup.procs"))

    def has(self, rel: str, name: str) -> bool:
        return os.path.exists(os.path.join(self.abspath(rel), name))

    # -- raw file access -------------------------------------------------------------------
    def read(self, rel: str, name: str) -> str:
        try:
            with open(os.path.join(self.abspath(rel), name), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError as e:
            if _gone(e):
                raise CgroupGone(f"{rel or '/'}: {name}: {e.strerror}") from None
            raise CgroupError(f"{rel or '/'}: reading {name}: {e.strerror}") from None

    def read_optional(self, rel: str, name: str) -> str | None:
        try:
            with open(os.path.join(self.abspath(rel), name), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return None
        except OSError as e:
            if _gone(e):
                return None
            raise CgroupError(f"{rel or '/'}: reading {name}: {e.strerror}") from None

    def write(self, rel: str, name: str, value: str) -> None:
        path = os.path.join(self.abspath(rel), name)
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as e:
            if _gone(e):
                raise CgroupGone(f"{rel or '/'}: {name}: {e.strerror}") from None
            raise CgroupError(f"{rel or '/'}: opening {name}: {e.strerror}") from None
        try:
            os.write(fd, value.encode())
        except OSError as e:
            # ESRCH here is about the pid written (it exited), not about the cgroup.
            if e.errno in (errno.ENOENT, errno.ENODEV):
                raise CgroupGone(f"{rel or '/'}: writing {name}: {e.strerror}") from None
            raise CgroupError(f"{rel or '/'}: writing {value!r} to {name}: {e.strerror}", e.errno) from None
        finally:
            os.close(fd)

    # -- state -----------------------------------------------------------------------------
    def events(self, rel: str) -> dict[str, int]:
        """cgroup.events: populated, frozen."""
        return parse_flat_keyed(self.read(rel, "cgroup.events"))

    def populated(self, rel: str) -> bool:
        try:
            return self.events(rel).get("populated", 0) == 1
        except CgroupGone:
            return False

    def frozen(self, rel: str) -> bool:
        return self.events(rel).get("frozen", 0) == 1

    def procs(self, rel: str) -> list[int]:
        return [int(x) for x in self.read(rel, "cgroup.procs").split()]

    def threads(self, rel: str) -> list[int]:
        return [int(x) for x in self.read(rel, "cgroup.threads").split()]

    def children(self, rel: str) -> list[str]:
        base = self.abspath(rel)
        try:
            with os.scandir(base) as it:
                names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
        except OSError as e:
            if _gone(e):
                return []
            raise
        return [f"{rel}/{n}" if rel else n for n in sorted(names)]

    def walk(self, rel: str) -> list[str]:
        """The cgroup and every descendant, parents first."""
        out, stack = [], [rel]
        while stack:
            cur = stack.pop()
            out.append(cur)
            stack.extend(reversed(self.children(cur)))
        return out

    def count_threads_subtree(self, rel: str) -> int:
        """Measured fallback for pids.current: TIDs listed in cgroup.threads across the subtree.

        Counting newlines of the raw bytes avoids building a list per sample, which matters when a
        bomb puts thousands of TIDs in one file.
        """
        total = 0
        base = self.abspath(rel)
        stack = [base]
        while stack:
            d = stack.pop()
            try:
                with open(os.path.join(d, "cgroup.threads"), "rb") as f:
                    total += f.read().count(b"\n")
                with os.scandir(d) as it:
                    stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
            except OSError as e:
                if _gone(e) and d != base:
                    continue
                if _gone(e):
                    raise CgroupGone(f"{rel or '/'}: {e.strerror}") from None
                raise
        return total

    def task_count(self, rel: str) -> TaskCount:
        cur = self.read_optional(rel, "pids.current")
        if cur is not None:
            return TaskCount(int(cur), "pids.current")
        return TaskCount(self.count_threads_subtree(rel), "cgroup.threads")

    def pids_max(self, rel: str) -> int | None:
        text = self.read_optional(rel, "pids.max")
        return None if text is None else parse_max(text)

    def pids_peak(self, rel: str) -> int | None:
        text = self.read_optional(rel, "pids.peak")
        return None if text is None else int(text)

    def pids_events(self, rel: str) -> dict[str, int] | None:
        """pids.events (hierarchical since 6.11) merged with pids.events.local when present."""
        text = self.read_optional(rel, "pids.events")
        if text is None:
            return None
        out = parse_flat_keyed(text)
        local = self.read_optional(rel, "pids.events.local")
        if local is not None:
            for k, v in parse_flat_keyed(local).items():
                out[f"{k}.local"] = v
        return out

    # -- actions ---------------------------------------------------------------------------
    def kill(self, rel: str) -> None:
        if not rel:
            raise CgroupError("refusing to kill the cgroup2 root")
        self.write(rel, "cgroup.kill", "1")

    def freeze(self, rel: str, frozen: bool = True) -> None:
        if not rel:
            raise CgroupError("refusing to freeze the cgroup2 root")
        self.write(rel, "cgroup.freeze", "1" if frozen else "0")

    def move_process(self, rel: str, pid: int) -> bool:
        """Move a whole process into a cgroup. False if it exited meanwhile."""
        try:
            self.write(rel, "cgroup.procs", str(pid))
            return True
        except CgroupGone:
            raise
        except CgroupError as e:
            # ESRCH: the process exited between listing and moving: nothing left to move.
            if e.errno == errno.ESRCH:
                return False
            raise

    def mkdir(self, rel: str, exist_ok: bool = False) -> None:
        try:
            os.mkdir(self.abspath(rel))
        except FileExistsError:
            if not exist_ok:
                raise CgroupError(f"{rel}: already exists") from None
        except OSError as e:
            raise CgroupError(f"{rel}: mkdir: {e.strerror}") from None

    def rmdir(self, rel: str) -> bool:
        """Remove an empty cgroup. True if it is gone afterwards."""
        try:
            os.rmdir(self.abspath(rel))
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def remove_tree(self, rel: str) -> bool:
        """Remove a cgroup and its descendants, deepest first; they must be unpopulated."""
        ok = True
        for sub in reversed(self.walk(rel)):
            ok = self.rmdir(sub) and ok
        return ok

    # -- capabilities ----------------------------------------------------------------------
    def supports_kill(self) -> bool:
        """cgroup.kill exists (Linux 5.14+). The root has none, so look at a child or the kernel."""
        for child in self.children("")[:16]:
            if self.has(child, "cgroup.kill"):
                return True
        return kernel_version() >= (5, 14)

    def controllers(self, rel: str = "") -> list[str]:
        text = self.read_optional(rel, "cgroup.controllers") or ""
        return text.split()
