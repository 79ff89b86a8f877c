"""Sink: incident hook commands (``HookRunner``); the HTTP endpoint is :mod:`.webhook`.

Called on the agent's detection loop, so ``incident()`` only snapshots the record and queues it
(O(1), never blocks, never raises); worker threads do the rest. The queue is bounded: when the
operator's tooling is slower than a storm of incidents, runs are dropped and counted, never
buffered without limit. ``close()`` returns within its bound even when every hook hangs.

Hooks run at normal scheduling priority: the worker threads that spawn them reset themselves to
SCHED_OTHER at nice 0 first, since threads (and their children) inherit the policy and nice value
of the thread that creates them, and the agent's own threads run SCHED_RR at nice -15.
"""

from __future__ import annotations

import json
import logging
import os
import queue as queue_mod
import select
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cgguard.sinks import Counters, LogLimit, env_value, incident_snapshot, normal_priority
from cgguard.sinks.incidents import Incident

log = logging.getLogger("cgguard.sinks.hooks")

OUTPUT_CAP = 4096  # bytes of a hook's stdout+stderr kept for the debug log; the rest is drained
EXIT_GRACE_S = 0.5  # after the hook exits, how long its leftovers may hold its output pipe open
# Variables of the agent's service that must not leak into hooks (a hook could notify systemd,
# or claim socket-activated descriptors, in the agent's name).
_ENV_DROP = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")


def command_argv(cmd: str | Sequence[str]) -> list[str]:
    """A string runs with /bin/sh -c; a list is the argv itself."""
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise ValueError("empty command")
    return argv


def hook_env(rec: dict[str, Any], phase: str, base: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _ENV_DROP}
    wl = rec.get("workload") if isinstance(rec.get("workload"), dict) else {}
    env.update(
        CGGUARD_INCIDENT_ID=env_value(rec.get("id")),
        CGGUARD_PHASE=phase,
        CGGUARD_CGROUP=env_value(rec.get("cgroup")),
        CGGUARD_ACTION=env_value(rec.get("action")),
        CGGUARD_RESULT=env_value(rec.get("result")),
        CGGUARD_DETECTOR=env_value(rec.get("detector")),
        CGGUARD_WORKLOAD=env_value(wl.get("name")),
        CGGUARD_WORKLOAD_KIND=env_value(wl.get("kind")),
        CGGUARD_DRY_RUN="1" if rec.get("dry_run") else "0",
    )
    return env


@dataclass(frozen=True)
class _Run:
    argv: list[str]
    phase: str
    rec: dict[str, Any]


class HookRunner:
    """Runs each configured command at detection and at the result.

    A fixed pool of ``max_concurrent`` worker threads, each running one hook at a time, so at
    most that many hooks run at once; at most ``queue`` runs wait, further ones are dropped.
    Each hook starts in a new session (its own process group), with close_fds, cwd /, the
    incident JSON on stdin and CGGUARD_* variables in its environment. At ``timeout_s`` the
    whole process group is killed; when the hook exits on its own, anything it left behind in
    its process group is killed too, so hooks cannot accumulate. To outlive the hook, a helper
    must leave the group itself (setsid).
    """

    name = "hooks"

    def __init__(
        self,
        commands: Sequence[str | Sequence[str]],
        *,
        timeout_s: float = 10.0,
        max_concurrent: int = 4,
        queue: int = 64,
        output_cap: int = OUTPUT_CAP,
    ):
        self.commands = [command_argv(c) for c in commands]
        self.timeout_s = timeout_s
        self.max_queue = queue
        self.output_cap = output_cap
        self._q: queue_mod.SimpleQueue[_Run | None] = queue_mod.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._counts = Counters("ok", "failed", "timeout", "dropped")
        self._closed = False
        self._abort = False
        self._warn = LogLimit(log)
        # Written once at close(): every worker's selector sees it and kills its hook at once.
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._workers = [
            threading.Thread(target=self._work, name=f"cgguard-hook-{i}", daemon=True) for i in range(max_concurrent)
        ]
        for t in self._workers:
            t.start()

    # -- the agent's side --------------------------------------------------------------------
    def incident(self, inc: Incident) -> None:
        try:
            if self._closed:
                self._count("dropped", len(self.commands))
                return
            phase = "detected" if inc.result == "detected" else "final"
            rec = incident_snapshot(inc)
            for argv in self.commands:
                with self._lock:
                    full = self._pending >= self.max_queue
                    if not full:
                        self._pending += 1
                if full:
                    self._count("dropped")
                    continue
                self._q.put(_Run(argv, phase, rec))
        except Exception:  # never let a hook break the agent's loop
            log.exception("hooks: could not queue incident")

    def stats(self) -> dict[str, int]:
        return self._counts.snapshot()

    def pending(self) -> int:
        """Runs queued and not yet started."""
        with self._lock:
            return self._pending

    def close(self, timeout_s: float = 2.0) -> None:
        """Let queued runs go on for most of ``timeout_s``, then kill what still runs (counted as
        timeout) and drop what has not started. Returns within ``timeout_s`` plus scheduling."""
        if self._closed:
            return
        self._closed = True
        start = time.monotonic()
        for _ in self._workers:
            self._q.put(None)
        self._join(start + timeout_s * 0.6)
        if any(t.is_alive() for t in self._workers):
            self._abort = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            self._join(start + timeout_s)
        if not any(t.is_alive() for t in self._workers):
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _join(self, deadline: float) -> None:
        for t in self._workers:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- the workers -------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        self._counts.add(key, n)

    def _work(self) -> None:
        normal_priority()
        while True:
            run = self._q.get()
            if run is None:
                return
            with self._lock:
                self._pending -= 1
            if self._abort:
                self._count("dropped")
                continue
            try:
                result = self._run(run)
            except Exception:  # a broken run must not end the worker
                log.exception("hooks: %s", run.argv)
                result = "failed"
            self._count(result)

    def _run(self, run: _Run) -> str:
        data = (json.dumps(run.rec, sort_keys=True, default=str) + "\n").encode()
        try:
            proc = subprocess.Popen(
                run.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                cwd="/",
                env=hook_env(run.rec, run.phase),
            )
        except (OSError, ValueError) as e:
            self._warn.warning("hook %s: cannot start: %s", run.argv[0], getattr(e, "strerror", None) or e)
            return "failed"
        exited, out = False, b""
        try:
            exited, out = self._supervise(proc, data)
        finally:
            # The leader is not reaped yet (a zombie at worst), so its pid still names its process
            # group and cannot have been reused: killing the group hits only what the hook started.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except OSError as e:
                log.warning("hook %s: kill: %s", run.argv[0], e.strerror)
        try:
            rc = proc.wait(5.0)
        except subprocess.TimeoutExpired:  # stuck in the kernel (D state); reaped later by subprocess
            log.warning("hook %s (pid %d) does not die", run.argv[0], proc.pid)
            rc = None
        result = "timeout" if not exited or rc is None else "ok" if rc == 0 else "failed"
        if result == "ok":
            log.debug("hook %s (%s, %s): ok; output: %r", run.argv[0], run.phase, run.rec.get("id"), out)
        elif result == "failed":
            self._warn.warning("hook %s (%s, %s): exit %s; output: %r", run.argv[0], run.phase, run.rec.get("id"), rc, out)
        else:
            why = "cgguard is stopping" if self._abort else f"timeout {self.timeout_s:g}s"
            self._warn.warning("hook %s (%s, %s): killed (%s); output: %r", run.argv[0], run.phase, run.rec.get("id"), why, out)
        return result

    def _supervise(self, proc: subprocess.Popen[bytes], data: bytes) -> tuple[bool, bytes]:
        """Feed stdin, collect capped output, until the hook exits and its output ends, the
        deadline passes, or close() aborts. Returns (exited, output)."""
        assert proc.stdin is not None and proc.stdout is not None
        deadline = time.monotonic() + self.timeout_s
        out = bytearray()
        exited = eof = False
        sel = selectors.DefaultSelector()
        try:
            pidfd: int | None = os.pidfd_open(proc.pid)
        except (OSError, AttributeError):  # before Linux 5.3: look with waitid(WNOWAIT) instead
            pidfd = None
        try:
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            if pidfd is not None:
                sel.register(pidfd, selectors.EVENT_READ, "exit")
            os.set_blocking(proc.stdout.fileno(), False)
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE, "in")
            view = memoryview(data)
            while not (exited and eof) and not self._abort:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                events = sel.select(remaining if pidfd is not None else min(remaining, 0.05))
                if pidfd is None and not exited and _has_exited(proc.pid, None):
                    exited = True
                    deadline = min(deadline, time.monotonic() + EXIT_GRACE_S)
                for key, _ in events:
                    tag = key.data
                    if tag == "exit":
                        exited = True
                        sel.unregister(key.fileobj)
                        deadline = min(deadline, time.monotonic() + EXIT_GRACE_S)
                    elif tag == "out":
                        try:
                            chunk = os.read(proc.stdout.fileno(), 65536)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            eof = True
                            sel.unregister(proc.stdout)
                        elif len(out) < self.output_cap:
                            out += chunk[: self.output_cap - len(out)]
                    elif tag == "in":
                        try:
                            view = view[os.write(proc.stdin.fileno(), view[:65536]) :]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            view = view[:0]  # the hook does not read its stdin: fine
                        if not view:
                            sel.unregister(proc.stdin)
                            proc.stdin.close()
            if not exited:
                # A last look: it may have exited just as the deadline passed.
                exited = _has_exited(proc.pid, pidfd)
        finally:
            sel.close()
            if pidfd is not None:
                os.close(pidfd)
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        return exited, bytes(out)


def _has_exited(pid: int, pidfd: int | None) -> bool:
    """Has the child exited? Never reaps it: its pid must keep naming its process group."""
    if pidfd is not None:
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        return bool(p.poll(0))
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


# -- webhook ---------------------------------------------------------------------------------
