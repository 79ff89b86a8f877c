"""What people use instead of cgguard, run on the same bombs in the same bench run.

* ``pids.max`` alone: the kernel cap that every container runtime offers. It stops growth and
  never removes anything; we measure what it holds and the CPU the bomb burns meanwhile.
* ``naive-killer``: a userspace killer that walks the process tree from the bomb's root with
  psutil and SIGKILLs every process it finds, until it finds none. Orphans (the classic bomb's
  parents exit at once; setsid double forks) are re-parented away from the root and escape it.
* ``threshold``: a poller that every 100 ms ``cgroup.kill``s a watched cgroup holding more than
  64 tasks: atomic removal, but a blind rule that also fires on legitimate parallel work.

The killer and the poller run at the agent's priority (SCHED_RR 1): the comparison is then about
the method, not about who gets CPU during a bomb.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import psutil

from cgguard.kernel.cgroupfs import CgroupError, CgroupFS
from cgguard.testkit.corpus import Workload

from .runner import WINDOW_S, Bench, BombRun, Running, bomb_secs, by_itself
from .sampler import Sampler, realtime, set_realtime

THRESHOLD_TASKS = 64
THRESHOLD_PERIOD_S = 0.1
NAIVE_TRIGGER_TASKS = 64  # the naive killer starts when the bomb reaches this many tasks
NAIVE_TIMEOUT_S = 2.5  # it gives up well before any bomb's own deadline (>= 5 s)


@dataclass
class _Trial:
    """One baseline trial in progress: what its clean-up and its closing figures need."""

    r: BombRun
    cg: str
    inn: list = field(default_factory=list)
    w: Running | None = None
    smp: Sampler | None = None


@contextmanager
def _trial(b: Bench, wl: Workload, method: str, tag: str, run: int, window_s: float, **kw) -> Iterator[_Trial]:
    """A trial cgroup (with the workload's innocents, if any); on success the bomb's CPU, peak and
    the innocents still alive are recorded; whatever happens the trial is cleaned up."""
    t = _Trial(BombRun(wl.name, method, run, window_s=window_s, **kw), b.trial_cgroup(f"{wl.name}-{tag}{run}"))
    try:
        t.inn = _setup_shared(b, wl, t.cg, t.r)
        yield t
        t.r.bomb_cpu_s = b.cpu_usage_s(t.cg)
        t.r.peak_v1 = b.peak(t.w)
        if t.inn:
            t.r.innocents_alive = b.alive(t.inn)
    finally:
        b.end_trial(t.cg, t.w, t.smp, f"{wl.name}/{method}/{run}", t.inn)


def _setup_shared(b: Bench, wl: Workload, cg: str, r: BombRun) -> list:
    if not wl.extra.get("innocents"):
        return []
    inn = b.innocents(cg, int(wl.extra["innocents"]))
    r.innocents = len(inn)
    r.end_signal = "bomb processes gone"
    time.sleep(0.2)
    return inn


def _start(b: Bench, wl: Workload, cg: str, threshold: int | None = None) -> tuple[Running, Sampler, float]:
    """The bomb, sampled from its first fork, with 3 s past its own deadline to be cleaned up."""
    w, smp, t0, _ = b.start_sampled(wl.make(bomb_secs(wl)), cg, bomb_secs(wl) + 3, wl.name, threshold=threshold)
    return w, smp, t0


def _window_rest(t0: float, window_s: float) -> None:
    """Keep sampling until the window closes, so every method's series covers the same span."""
    left = t0 + window_s - time.monotonic()
    if left > 0:
        time.sleep(left)


# -- (a) pids.max only -------------------------------------------------------------------------
def pids_max_only(b: Bench, wl: Workload, run: int = 1, window_s: float = WINDOW_S) -> BombRun:
    with _trial(b, wl, "pids.max", "pidsmax", run, window_s, detected=None) as t:
        r = t.r
        with realtime():
            t.w, t.smp, t0 = _start(b, wl, t.cg)
            _window_rest(t0, window_s)
            r.tasks_held = b.current(t.w)
            r.survivors = len(b.sb.live_pids(t.w))
        r.removed = False
        r.notes.append(f"never removed: {r.survivors} processes, {r.tasks_held} tasks still there after {window_s:g} s")
    return r


# -- (b) naive userspace killer ----------------------------------------------------------------
def naive_kill(root_pid: int, is_root_alive, timeout_s: float = NAIVE_TIMEOUT_S) -> tuple[int, int]:
    """Walk the tree from ``root_pid`` and SIGKILL everything, until the walk finds nothing.

    Returns (processes signalled, rounds). ``is_root_alive`` lets the bench reap its own child:
    a dead root stays a zombie for its parent, and a zombie has no children left to walk.
    """
    end = time.monotonic() + timeout_s
    killed = rounds = 0
    while time.monotonic() < end:
        procs: list[psutil.Process] = []
        if is_root_alive():
            try:
                root = psutil.Process(root_pid)
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                procs = []
        if not procs:
            break
        rounds += 1
        for p in procs:
            try:
                p.kill()
                killed += 1
            except psutil.Error:
                pass
    return killed, rounds


def naive_killer(b: Bench, wl: Workload, run: int = 1, window_s: float = WINDOW_S) -> BombRun:
    with _trial(b, wl, "naive-killer", "naive", run, window_s) as t:
        r = t.r
        with realtime():
            w, smp, t0 = _start(b, wl, t.cg, threshold=NAIVE_TRIGGER_TASKS)
            t.w, t.smp = w, smp
            r.detected = smp.crossed.wait(bomb_secs(wl) - 1.5)
            t_trig = time.monotonic() - t0
            r.start_to_verdict_ms = round(t_trig * 1000, 1)
            killed, rounds = naive_kill(w.proc.pid, lambda: w.proc.poll() is None)
            t_done = time.monotonic() - t0
            r.notes.append(f"signalled {killed} processes in {rounds} walks over {(t_done - t_trig) * 1000:.0f} ms, "
                           f"then found none from the root")
            end_evt = smp.gone if r.innocents else smp.unpopulated
            end_evt.wait(0.5)
            r.survivors = len(b.sb.live_pids(w))
            _window_rest(t0, window_s)
            r.tasks_held = b.current(w)
        s = smp.series
        t_end = s.t_gone if r.innocents else s.t_unpopulated
        r.removed = r.survivors == 0 and t_end is not None and not by_itself(wl, t_end)
        if r.removed:
            r.start_to_gone_ms = round(t_end * 1000, 1)
            r.verdict_to_gone_ms = round(r.start_to_gone_ms - r.start_to_verdict_ms, 1)
        elif r.survivors:
            r.notes.append(f"{r.survivors} escaped the tree walk (re-parented away from the root)")
        else:
            r.notes.append("gone only at the bomb's own deadline")
    return r


# -- (c) naive threshold poller ----------------------------------------------------------------
class ThresholdPoller:
    """Every ``period_s``, ``cgroup.kill`` each watched cgroup with more than ``limit`` tasks.

    Tasks are counted the way cgguard counts them here (pids.current, or the TIDs in
    cgroup.threads across the subtree on hybrid hosts), so the rule, not the data, differs.
    """

    def __init__(self, fs: CgroupFS, limit: int = THRESHOLD_TASKS, period_s: float = THRESHOLD_PERIOD_S):
        self.fs = fs
        self.limit = limit
        self.period_s = period_s
        self._watched: dict[str, list[float]] = {}  # cgroup -> monotonic times of its kills
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self.kill_evt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-threshold", daemon=True)

    def start(self) -> "ThresholdPoller":
        self._thread.start()
        return self

    def watch(self, cg: str) -> None:
        with self._lock:
            self._watched[cg] = []

    def unwatch(self, cg: str) -> list[float]:
        with self._lock:
            return self._watched.pop(cg, [])

    def close(self) -> None:
        self._halt.set()
        self._thread.join(2)

    def _run(self) -> None:
        set_realtime()
        while not self._halt.wait(self.period_s):
            with self._lock:
                cgs = list(self._watched)
            for cg in cgs:
                try:
                    n = self.fs.task_count(cg).tasks
                    if n > self.limit:
                        self.fs.kill(cg)
                        with self._lock:
                            if cg in self._watched:
                                self._watched[cg].append(time.monotonic())
                        self.kill_evt.set()
                except CgroupError:
                    pass


def threshold_bomb(b: Bench, wl: Workload, poller: ThresholdPoller, run: int = 1, window_s: float = WINDOW_S) -> BombRun:
    with _trial(b, wl, "threshold", "threshold", run, window_s) as t:
        r = t.r
        poller.kill_evt.clear()
        try:
            with realtime():
                w, smp, t0 = _start(b, wl, t.cg)
                t.w, t.smp = w, smp
                poller.watch(t.cg)
                end_evt = smp.gone if r.innocents else smp.unpopulated
                if poller.kill_evt.wait(bomb_secs(wl) - 1.2):
                    end_evt.wait(2.0)
                time.sleep(0.3)
                r.survivors = len(b.sb.live_pids(w))
                _window_rest(t0, window_s)
                r.tasks_held = b.current(w)
        finally:
            kills = poller.unwatch(t.cg)
        s = smp.series
        t_end = s.t_gone if r.innocents else s.t_unpopulated
        r.detected = bool(kills)
        if kills:
            r.action = "kill-cgroup"
            r.start_to_verdict_ms = round((kills[0] - t0) * 1000, 1)
            r.removed = r.survivors == 0 and t_end is not None and not by_itself(wl, t_end)
            if r.removed:
                r.start_to_gone_ms = round(t_end * 1000, 1)
                r.verdict_to_gone_ms = round(r.start_to_gone_ms - r.start_to_verdict_ms, 1)
    if t.inn and (r.innocents_alive or 0) < r.innocents:
        r.notes.append("killed the innocent processes sharing the cgroup")
    return r
