"""Kernel source: /proc/<pid>/cmdline read off the caller's thread, with a bound on the wait.

Reading a command line copies it out of the target's memory (``access_remote_vm``), which takes
the target's mmap_lock. A process that forks in a tight loop holds that lock for writing most of
the time, and one whose argument pages are backed by a stalled FUSE file never lets the read
finish: a reader on the agent's loop thread then sits in D state, and the guard is disarmed by
the very workload it should remove. So the read runs on a worker thread; the caller waits a few
milliseconds at most and otherwise goes on without the command line (a verdict names the
process by its comm, taken from /proc/<pid>/stat, which needs no mmap_lock).

Once a read has overrun, callers stop waiting for a while (the lock is contended: the next read
would most likely overrun too), so a thousand-process fork loop costs the loop at most one wait
per cool-down. A read stuck for good leaves its worker behind and a fresh one takes over, up to
a small number of abandoned threads; past that, command lines are simply not read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

WAIT_S = 0.02  # a free read takes tens of microseconds; this is lock contention
COOL_DOWN_S = 1.0  # after an overrun, wait only COOL_DOWN_WAIT_S for this long
COOL_DOWN_WAIT_S = 0.002  # enough for a free read and the thread hand-off, not for a stall
STUCK_S = 2.0  # a worker busy this long is abandoned and replaced
MAX_ABANDONED = 4  # stuck workers tolerated (each holds a thread in D state)


class CmdlineReader:
    """Bounded-wait reads of /proc/<pid>/cmdline; ``read`` is called from one thread (the loop)."""

    def __init__(self, read: Callable[[int], str | None], *, wait_s: float = WAIT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self.wait_s = wait_s
        self._clock = clock
        self._cond = threading.Condition()
        self._want: int | None = None  # the pid the worker should read next
        self._busy_pid: int | None = None
        self._busy_since = 0.0
        self._done: dict[int, str | None] = {}
        self._worker: threading.Thread | None = None
        self._generation = 0
        self._quiet_until = 0.0
        self.abandoned = 0  # workers left inside a stuck read
        self.overruns = 0
        self.skipped = 0

    def read(self, pid: int) -> str | None:
        """The command line of ``pid``, or None if it cannot be had within the wait."""
        with self._cond:
            # A reply that came after its caller gave up is dropped: by now the pid may be reused.
            self._done.clear()
            if not self._available():
                self.skipped += 1
                return None
            self._want, self._busy_since = pid, self._clock()
            self._cond.notify_all()
            wait = COOL_DOWN_WAIT_S if self._clock() < self._quiet_until else self.wait_s
            deadline = self._clock() + wait
            while pid not in self._done:
                left = deadline - self._clock()
                if left <= 0 or not self._cond.wait(left):
                    break
            if pid in self._done:
                return self._done.pop(pid)
            self.overruns += 1
            self._quiet_until = self._clock() + COOL_DOWN_S
            return None

    def _available(self) -> bool:
        """Is a worker free to take a read (starting or replacing one if need be)?"""
        if self._worker is None:
            self._start()
            return True
        if self._want is None and self._busy_pid is None:
            return True
        # Busy: a read queued or under way since _busy_since.
        if self._clock() - self._busy_since > STUCK_S:
            if self.abandoned >= MAX_ABANDONED:
                return False
            self.abandoned += 1
            self._start()
            return True
        return False

    def _start(self) -> None:
        self._generation += 1
        self._want, self._busy_pid = None, None
        self._worker = threading.Thread(target=self._work, args=(self._generation,),
                                        name=f"cgguard-cmdline-{self._generation}", daemon=True)
        self._worker.start()

    def _work(self, generation: int) -> None:
        while True:
            with self._cond:
                while self._want is None and generation == self._generation:
                    self._cond.wait()
                if generation != self._generation:
                    return
                pid, self._want = self._want, None
                self._busy_pid = pid
            try:
                value = self._read(pid)
            except Exception:  # noqa: BLE001 -- a failed read is an unknown command line
                value = None
            with self._cond:
                if generation != self._generation:
                    self.abandoned -= 1  # came back: its thread no longer counts against the limit
                    return  # abandoned while stuck; the reply is too old to trust
                self._busy_pid = None
                self._done[pid] = value
                self._cond.notify_all()
