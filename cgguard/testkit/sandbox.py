"""Safe places to run bombs: a per-run cgroup tree with a kernel task cap and a deadline.

Used by the tests, ``cgguard demo`` and ``cgguard bench``. Every workload started here is
(a) bounded by construction -- a deadline after which the harness kills its cgroup -- and
(b) contained by a kernel limit, the first of these that the host has:

* ``v1-pids``: a per-workload child of the v1 pids hierarchy (hybrid hosts such as CI) with
  ``pids.max``;
* ``v2-pids``: ``pids.max`` on the workload's own cgroup2 cgroup (pure v2 hosts);
* ``rlimit``: ``RLIMIT_NPROC`` under an unprivileged uid.

The sandbox owns everything it creates and removes all of it on ``close()``, also after a test
failed, so no cgroup outlives the run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field

from cgguard.kernel.cgroupfs import CgroupError, CgroupFS, find_cgroup2_root

V1_PIDS = "/sys/fs/cgroup/pids"

# Moves the shell into its cgroups before exec: "0" written to cgroup.procs means "me".
_ENTER = 'for f in "$@"; do case "$f" in --) break;; esac; echo 0 > "$f" || exit 97; done'


def _enter_script() -> str:
    return _ENTER + '; while [ "$1" != -- ]; do shift; done; shift; exec "$@"'


def run_id() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Workload:
    name: str
    cgroup: str  # relative to the cgroup2 root
    proc: subprocess.Popen
    deadline: float
    v1_dir: str | None = None


@dataclass
class Sandbox:
    """A throwaway cgroup2 subtree ``prefix-<run id>`` plus its kernel caps."""

    fs: CgroupFS
    prefix: str = "cgguard-test"
    cap: int = 1024
    mode: str = ""
    name: str = ""
    _cgroups: list[str] = field(default_factory=list)
    _v1_dirs: list[str] = field(default_factory=list)
    _workloads: list[Workload] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _watchdog: threading.Thread | None = None
    _closed: bool = False

    @classmethod
    def create(cls, fs: CgroupFS | None = None, prefix: str = "cgguard-test", cap: int = 1024) -> "Sandbox":
        fs = fs or CgroupFS(find_cgroup2_root())
        sb = cls(fs=fs, prefix=prefix, cap=cap)
        sb.name = f"{prefix}-{run_id()}"
        sb.mode = sb._pick_mode()
        fs.mkdir(sb.name)
        sb._cgroups.append(sb.name)
        if sb.mode == "v1-pids":
            os.mkdir(os.path.join(V1_PIDS, sb.name))
            sb._v1_dirs.append(os.path.join(V1_PIDS, sb.name))
        if sb.mode == "v2-pids":
            # Children need the pids controller handed down to get their own pids.max.
            try:
                fs.write(sb.name, "cgroup.subtree_control", "+pids")
            except CgroupError:
                pass
        sb._watchdog = threading.Thread(target=sb._watch_deadlines, name="sandbox-deadlines", daemon=True)
        sb._watchdog.start()
        return sb

    def _pick_mode(self) -> str:
        if os.path.isfile(os.path.join(V1_PIDS, "cgroup.procs")) and os.access(V1_PIDS, os.W_OK):
            return "v1-pids"
        if "pids" in self.fs.controllers(""):
            return "v2-pids"
        return "rlimit"

    # -- cgroups ---------------------------------------------------------------------------
    def cgroup(self, sub: str) -> str:
        """Create (parents first) and return ``<sandbox>/<sub>``."""
        parts = [p for p in sub.strip("/").split("/") if p]
        cur = self.name
        for p in parts:
            cur = f"{cur}/{p}"
            if not self.fs.exists(cur):
                self.fs.mkdir(cur, exist_ok=True)
                with self._lock:
                    self._cgroups.append(cur)
        return cur

    # -- workloads -------------------------------------------------------------------------
    def spawn(
        self,
        argv: list[str] | str,
        cgroup: str,
        *,
        deadline_s: float = 30.0,
        cap: int | None = None,
        name: str | None = None,
        env: dict[str, str] | None = None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) -> Workload:
        """Start ``argv`` (a list, or a bash script string) inside ``cgroup`` under a task cap."""
        if isinstance(argv, str):
            argv = ["bash", "-c", argv]
        cap = cap or self.cap
        targets = [os.path.join(self.fs.abspath(cgroup), "cgroup.procs")]
        v1_dir = None
        prefix: list[str] = []
        if self.mode == "v1-pids":
            v1_dir = os.path.join(V1_PIDS, self.name, f"w{len(self._workloads)}-{uuid.uuid4().hex[:4]}")
            os.mkdir(v1_dir)
            with self._lock:
                self._v1_dirs.append(v1_dir)
            with open(os.path.join(v1_dir, "pids.max"), "w") as f:
                f.write(str(cap))
            # Into the capped group first: the process is never in the watched cgroup uncapped.
            targets.insert(0, os.path.join(v1_dir, "cgroup.procs"))
        elif self.mode == "v2-pids":
            try:
                self.fs.write(cgroup, "pids.max", str(cap))
            except CgroupError:
                pass
        else:
            prefix = ["prlimit", f"--nproc={cap}:{cap}", "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        cmd = ["sh", "-c", _enter_script(), "sh", *targets, "--", *prefix, *argv]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env, start_new_session=True
        )
        w = Workload(name or shlex.join(argv)[:60], cgroup, proc, time.monotonic() + deadline_s, v1_dir)
        with self._lock:
            self._workloads.append(w)
        return w

    def _v1_read(self, w: Workload, name: str) -> int | None:
        if not w.v1_dir:
            return None
        try:
            with open(os.path.join(w.v1_dir, name)) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def v1_current(self, w: Workload) -> int | None:
        return self._v1_read(w, "pids.current")

    def v1_peak(self, w: Workload) -> int | None:
        return self._v1_read(w, "pids.peak")

    def live_pids(self, w: Workload) -> list[int]:
        """Every process of the workload still alive, wherever cgguard may have moved it."""
        if w.v1_dir:
            try:
                with open(os.path.join(w.v1_dir, "cgroup.procs")) as f:
                    return [int(x) for x in f.read().split()]
            except OSError:
                return []
        try:
            return [p for c in self.fs.walk(w.cgroup) for p in self.fs.procs(c)]
        except CgroupError:
            return []

    def kill(self, w: Workload) -> None:
        """Kill a workload wherever its processes are now: its cgroup and its v1 cap group."""
        for c in [w.cgroup]:
            if c and self.fs.exists(c):
                try:
                    self.fs.kill(c)
                except CgroupError:
                    pass
        if w.v1_dir:
            # v1 has no cgroup.kill; the cap makes this loop finite: a frozen count of tasks,
            # each killed once, and no new ones beyond pids.max.
            for _ in range(200):
                pids = self.live_pids(w)
                if not pids:
                    break
                for p in pids:
                    try:
                        os.kill(p, 9)
                    except ProcessLookupError:
                        pass
                time.sleep(0.01)
        try:
            w.proc.kill()
        except ProcessLookupError:
            pass
        try:
            w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def _watch_deadlines(self) -> None:
        while not self._closed:
            now = time.monotonic()
            with self._lock:
                due = [w for w in self._workloads if w.deadline <= now]
            for w in due:
                self.kill(w)
                w.deadline = float("inf")
            time.sleep(0.1)

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Kill everything and remove every cgroup made. Returns what could not be removed."""
        if self._closed:
            return []
        self._closed = True
        for w in list(self._workloads):
            self.kill(w)
        # cgroups cgguard (or a test) created below ours, e.g. quarantine children, go too.
        if self.fs.exists(self.name):
            try:
                self.fs.kill(self.name)
            except CgroupError:
                pass
        deadline = time.monotonic() + 10
        while self.fs.exists(self.name) and self.fs.populated(self.name) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = []
        if self.fs.exists(self.name):
            for _ in range(50):
                if self.fs.remove_tree(self.name):
                    break
                time.sleep(0.05)
            else:
                left.append(self.fs.abspath(self.name))
        for d in sorted(self._v1_dirs, key=len, reverse=True):
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    try:
                        with open(os.path.join(d, "cgroup.procs")) as f:
                            for p in f.read().split():
                                try:
                                    os.kill(int(p), 9)
                                except ProcessLookupError:
                                    pass
                    except OSError:
                        pass
                    time.sleep(0.05)
            else:
                left.append(d)
        return left

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
