"""The bench's own eyes on a workload: task count and end-of-life times, read every millisecond.

Why a realtime thread: during a bomb, hundreds of runnable bomb tasks share two cores with the
bench. A normal-priority sampler would see ``populated 0`` tens of milliseconds late (or hold
the GIL while preempted and stall every other bench thread), which would be charged to whatever
is being measured. So the sampler and the bench's other short-lived control threads run at
``SCHED_RR`` priority 1, the same as the agent, with ``SCHED_RESET_ON_FORK`` so nothing they
spawn inherits it. They sleep between reads; a read costs some microseconds.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator


def set_realtime(tid: int = 0, prio: int = 1) -> bool:
    """SCHED_RR for one thread (0: the calling one); children forked later are reset to normal."""
    try:
        os.sched_setscheduler(tid, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(prio))
        return True
    except (OSError, AttributeError):
        return False


def set_normal(tid: int = 0) -> None:
    try:
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def realtime() -> Iterator[bool]:
    """The calling thread at realtime priority for the duration (trials only, not plotting)."""
    ok = set_realtime()
    try:
        yield ok
    finally:
        if ok:
            set_normal()


class _Fd:
    """A cgroupfs file re-read with pread from offset 0 (the kernel regenerates it on every read).

    ``reopen``: open it afresh for every read instead. Needed for v1 ``cgroup.procs``: the kernel
    builds its pid list at open and, while the file keeps being read, serves that cached list
    (it is dropped only a second after the last read), so a kept-open fd never sees a change.
    """

    def __init__(self, path: str | None, reopen: bool = False):
        self.fd = -1
        self.path = path
        self.reopen = reopen
        if path and not reopen:
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.fd = -1

    def read(self, n: int = 64) -> bytes | None:
        if self.reopen:
            if not self.path:
                return None
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                return self._read(n)
            finally:
                self.close()
        return self._read(n)

    def _read(self, n: int) -> bytes | None:
        if self.fd < 0:
            return None
        try:
            data = os.pread(self.fd, n, 0)
            # A list longer than one read (over ~8k pids) continues at the next offset.
            while n > 64 and len(data) >= n and len(data) < (1 << 22):
                more = os.pread(self.fd, n, len(data))
                if not more:
                    break
                data += more
            return data
        except OSError:
            return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Series:
    """What the sampler saw, times in seconds since ``t0`` (the spawn)."""

    t0: float = 0.0
    # (t, tasks, live): the cap group's pids.current (every task, zombies included) and its
    # live processes (cgroup.procs). Killed tasks stay zombies until their reaper collects them.
    points: list[tuple[float, int, int]] = field(default_factory=list)
    peak: int = 0
    t_populated: float | None = None  # v2 cgroup became populated
    t_unpopulated: float | None = None  # ... and later populated 0
    t_alive: float | None = None  # the cap group had a live process
    t_gone: float | None = None  # ... and later none (cgroup.procs empty; zombies do not count)
    t_threshold: float | None = None  # first time tasks >= threshold


class Sampler(threading.Thread):
    """Samples a workload's cap group (tasks incl. zombies, live processes) and v2 cgroup.events.

    ``pids.current`` of the cap group is the one count that sees every task of the workload,
    wherever cgguard moves it in the v2 tree, zombies included, so the plot and the peak use it.
    """

    def __init__(self, v1_dir: str | None, v2_dir: str, *, period_s: float = 0.001,
                 record_every_s: float = 0.002, threshold: int | None = None, count_dir: str | None = None):
        super().__init__(name="bench-sampler", daemon=True)
        self.period_s = period_s
        self.record_every_s = record_every_s
        self.threshold = threshold
        self.series = Series()
        self.gone = threading.Event()  # live processes came and went
        self.unpopulated = threading.Event()  # v2 populated went 1 -> 0
        self.crossed = threading.Event()  # tasks reached the threshold
        self.started_evt = threading.Event()
        self._halt = threading.Event()
        # Without a v1 cap group (pure cgroup2 hosts) the workload's own cgroup has pids.current,
        # or, when the pids controller stops above it (a pod-level limit), ``count_dir``: the
        # ancestor its tasks are charged to. Its cgroup.procs then misses processes moved into a
        # child (a quarantine), which only matters for the shared-cgroup bomb.
        counted = count_dir or v1_dir or v2_dir
        self._cur = _Fd(os.path.join(counted, "pids.current"))
        self._procs = _Fd(os.path.join(v1_dir or v2_dir, "cgroup.procs"), reopen=True)
        self._events = _Fd(os.path.join(v2_dir, "cgroup.events"))

    def begin(self, t0: float) -> None:
        self.series.t0 = t0

    def stop(self) -> Series:
        self._halt.set()
        if self.is_alive():
            self.join(2)
        for f in (self._cur, self._procs, self._events):
            f.close()
        return self.series

    def run(self) -> None:
        set_realtime()
        s = self.series
        last_rec = -1.0
        self.started_evt.set()
        while not self._halt.is_set():
            now = time.monotonic()
            rel = now - s.t0 if s.t0 else 0.0
            raw = self._cur.read(32)
            tasks = int(raw) if raw and raw.strip().isdigit() else 0
            if tasks > s.peak:
                s.peak = tasks
            if s.t0:
                if self.threshold is not None and s.t_threshold is None and tasks >= self.threshold:
                    s.t_threshold = rel
                    self.crossed.set()
                ev = self._events.read(64)
                if ev is not None:
                    pop = b"populated 1" in ev
                    if pop and s.t_populated is None:
                        s.t_populated = rel
                    elif not pop and s.t_populated is not None and s.t_unpopulated is None:
                        s.t_unpopulated = rel
                        self.unpopulated.set()
                record = rel - last_rec >= self.record_every_s
                # Between records 8 bytes tell empty from not (the kernel stops generating there);
                # a record reads the whole list to count the live processes.
                procs = self._procs.read(1 << 16 if record else 8)
                if procs is not None:
                    if procs and s.t_alive is None:
                        s.t_alive = rel
                    elif not procs and s.t_alive is not None and s.t_gone is None:
                        s.t_gone = rel
                        self.gone.set()
                if record:
                    s.points.append((rel, tasks, procs.count(b"\n") if procs else 0))
                    last_rec = rel
            time.sleep(self.period_s)
