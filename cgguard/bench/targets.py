"""The issue's removal targets that the named-bomb trials do not measure by themselves.

* **pinned**: a runaway pinned at a limit the agent can read is removed <= 1 s after the limit is
  first hit. Measured per limit (``PINNED_LIMITS``): the bench's 1 ms sampler notes when the cap
  group's count first reaches the limit, and when the cgroup reports ``populated 0``. Bombs that
  never exit early (a C fork loop, a native thread bomb) so the budget rules, not lineage, decide.
  A bomb removed before it reached the limit has nothing to measure and meets the target.
* **predating**: a runaway that was running before the agent started is removed <= 2 s after
  the agent's ``/readyz`` first answers 200. The bomb is started and left to pin at its cap, then a
  fresh agent is started as the systemd unit starts it (``Nice=-10``); the bench polls ``/readyz``
  every 5 ms at realtime priority. On a hybrid host the bomb runs in a v1 cpu cgroup of its own
  (``V1_CPU``), as any service or container does: otherwise each of its hundreds of spinning
  tasks weighs as much as the agent in the root group and the agent needs tens of seconds to
  import its code (it raises its priority only once running). How long the agent took to get
  ready is reported next to the latency.

Baselines in the same run: the threshold poller on the same pinned bomb and on a bomb that
predates it (``pids.max`` alone never removes anything and is listed as such).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cgguard.testkit.corpus import WORKLOADS, Workload

from .agentproc import AgentProcess
from .runner import Bench, related
from .sampler import realtime

PINNED_LIMITS = (64, 256, 1024)
PINNED_BOMBS = ("c-fork", "c-threads")
PREDATING_BOMBS = ("classic", "c-fork", "c-threads")
PREDATING_CAP = 256
PINNED_SECS = 6
PREDATING_SECS = 60  # long enough to see the agent start under a CPU-saturating bomb
AGENT_NICE = -10  # as deploy/systemd/cgguard.service
PINNED_GOAL_MS = 1000
PREDATING_GOAL_MS = 2000
V1_CPU = "/sys/fs/cgroup/cpu"
# Moves the bomb into its own v1 cpu cgroup ($0), then runs it.
_INTO_CPU_GROUP = 'echo $$ > "$0/cgroup.procs" && exec "$@"'


@dataclass
class TargetRun:
    target: str  # pinned | predating
    workload: str
    method: str  # cgguard | threshold
    limit: int
    removed: bool = False
    detector: str | None = None
    evidence: str | None = None
    action: str | None = None
    result: str | None = None
    budget_source: str | None = None
    limit_hit_ms: float | None = None  # pinned: spawn -> the count first reached the limit
    gone_ms: float | None = None  # spawn -> populated 0
    latency_ms: float | None = None  # pinned: limit hit -> populated 0; predating: /readyz -> populated 0
    agent_start_to_ready_ms: float | None = None
    survivors: int | None = None
    met: bool | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fill_incident(r: TargetRun, incs: list[dict[str, Any]]) -> None:
    first = next((i for i in incs if i.get("result") != "detected"), incs[0] if incs else None)
    if first is None:
        return
    r.detector, r.evidence = first.get("detector"), first.get("evidence")
    r.action, r.result = first.get("action"), first.get("result")
    r.budget_source = first.get("budget_source")


def pinned(b: Bench, wl: Workload, limit: int, poller=None) -> TargetRun:
    """A runaway at a readable limit: limit first hit -> populated 0 (cgguard, or the poller)."""
    method = "threshold" if poller is not None else "cgguard"
    r = TargetRun("pinned", wl.name, method, limit)
    cg = b.trial_cgroup(f"pinned-{wl.name}-{limit}-{method}")
    agent = b.agent(f"pinned-{wl.name}") if poller is None else None
    w = smp = None
    try:
        with realtime():
            w, smp, _, _ = b.start_sampled(wl.make(PINNED_SECS), cg, PINNED_SECS + 3, wl.name, threshold=limit,
                                            cap=limit)
            if poller is not None:
                poller.watch(cg)
            smp.unpopulated.wait(PINNED_SECS - 1.2)
            time.sleep(0.2)
            r.survivors = len(b.sb.live_pids(w))
        s = smp.series
        if agent is not None:
            _fill_incident(r, related(agent.incidents(), cg))
        elif poller is not None and poller.unwatch(cg):
            r.action = "kill-cgroup"
        r.limit_hit_ms = None if s.t_threshold is None else round(s.t_threshold * 1000, 1)
        if _removal(r, s, PINNED_SECS):
            if r.limit_hit_ms is not None:
                r.latency_ms = round(r.gone_ms - r.limit_hit_ms, 1)
                r.met = r.latency_ms <= PINNED_GOAL_MS
            else:
                r.met = True
                r.notes.append(f"removed before it reached its limit (peak {b.peak(w)})")
    finally:
        if poller is not None:
            poller.unwatch(cg)
        b.end_trial(cg, w, smp, None, agent=agent, notes=r.notes)
    return r


def _where(pid: int) -> str:
    """State and kernel wait channel of a process: where a stuck agent waits (e.g. reading another
    process's memory for /proc/<pid>/cmdline while that process forks)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip() or "-"
        return f"state {state}, wchan {wchan}"
    except OSError as e:
        return f"unknown ({e.strerror})"


def _cpu_group(b: Bench, label: str) -> str | None:
    """A v1 cpu cgroup for the bomb (hybrid hosts), or None where there is no v1 cpu hierarchy."""
    if not os.path.isfile(os.path.join(V1_CPU, "cpu.shares")):
        return None
    path = os.path.join(V1_CPU, f"{b.sb.name}-{label}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    return path


def _drop_cpu_group(path: str | None) -> None:
    if not path:
        return
    for _ in range(200):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def predating(b: Bench, wl: Workload, poller_factory=None) -> TargetRun:
    """A runaway pinned at its cap before the agent starts: /readyz -> populated 0.

    With ``poller_factory`` the threshold poller is started instead of the agent (its start
    stands for /readyz).
    """
    method = "threshold" if poller_factory is not None else "cgguard"
    r = TargetRun("predating", wl.name, method, PREDATING_CAP)
    cg = b.trial_cgroup(f"predating-{wl.name}-{method}")
    agent: AgentProcess | None = None
    poller = None
    w = smp = None
    cpu = _cpu_group(b, f"predating-{wl.name}-{method}")
    argv = wl.make(PREDATING_SECS)
    if cpu:
        argv = ["sh", "-c", _INTO_CPU_GROUP, cpu, *argv]
        r.notes.append("bomb in a v1 cpu cgroup of its own")
    try:
        with realtime():
            w, smp, t0, _ = b.start_sampled(argv, cg, PREDATING_SECS + 3, wl.name,
                                            threshold=int(PREDATING_CAP * 0.95), cap=PREDATING_CAP)
            if not smp.crossed.wait(5.0):
                r.notes.append(f"did not pin at its cap within 5 s (peak {b.peak(w)}): started the guard anyway")
            time.sleep(0.5)  # pinned for a while: the guard meets a bomb already in full swing
            t_start = time.monotonic()
            if poller_factory is not None:
                poller = poller_factory()
                poller.watch(cg)
                t_ready = time.monotonic()
            else:
                agent = AgentProcess(os.path.join(b.tmp, f"agent-predating-{wl.name}"), [f"{b.sb.name}/**"],
                                     nice=AGENT_NICE)
                t_ready = None
                limit = t_start + PREDATING_SECS - 5
                while time.monotonic() < limit:
                    if agent.ready_http(timeout=0.2):
                        t_ready = time.monotonic()
                        break
                    if not agent.alive():
                        break
                    time.sleep(0.005)
                if t_ready is None:
                    r.notes.append(f"/readyz never answered 200 within {PREDATING_SECS - 5} s; agent main thread: "
                                   f"{_where(agent.proc.pid)}")
            if t_ready is not None:
                r.agent_start_to_ready_ms = round((t_ready - t_start) * 1000, 1)
            smp.unpopulated.wait(max(0.0, t0 + PREDATING_SECS - 1.5 - time.monotonic()))
            time.sleep(0.2)
            r.survivors = len(b.sb.live_pids(w))
        s = smp.series
        if agent is not None:
            _fill_incident(r, related(agent.incidents(), cg))
        if _removal(r, s, PREDATING_SECS) and t_ready is not None:
            r.latency_ms = round((t0 + s.t_unpopulated - t_ready) * 1000, 1)
            r.met = r.latency_ms <= PREDATING_GOAL_MS
            if r.latency_ms < 0:
                r.notes.append("removed before /readyz answered 200")
    finally:
        if poller is not None:
            poller.unwatch(cg)
            poller.close()
        b.end_trial(cg, w, smp, None, agent=agent, notes=r.notes)
        _drop_cpu_group(cpu)
    return r


def run_targets(b: Bench, fs, quick: bool, log, attempt, within_budget) -> list[TargetRun]:
    """Every pinned and predating trial of the plan, cgguard first, then the poller baseline."""
    from .baselines import ThresholdPoller

    out: list[TargetRun] = []
    limits = (64, 1024) if quick else PINNED_LIMITS
    bombs = [WORKLOADS[n] for n in PINNED_BOMBS if not WORKLOADS[n].missing()]
    for wl in bombs:
        for limit in limits:
            if not within_budget(f"pinned {wl.name} at {limit}", PINNED_SECS + 4):
                break
            r = attempt(f"pinned/{wl.name}/{limit}", lambda: pinned(b, wl, limit))
            if r is not None:
                out.append(r)
                log(f"  pinned {wl.name} at {limit}: limit hit {r.limit_hit_ms} ms, gone {r.gone_ms} ms, "
                    f"latency {r.latency_ms} ms, {r.detector} -> {r.action}: {r.result}"
                    + (f" ({'; '.join(r.notes)})" if r.notes else ""))
    # Quick runs leave out the C fork loop: an agent that cannot start under it (reading the
    # bomb's /proc while it forks) costs the whole minute of the bomb's life.
    pre = [WORKLOADS[n] for n in (("classic", "c-threads") if quick else PREDATING_BOMBS) if not WORKLOADS[n].missing()]
    for wl in pre:
        if not within_budget(f"predating {wl.name}", 15):
            break
        r = attempt(f"predating/{wl.name}", lambda: predating(b, wl))
        if r is not None:
            out.append(r)
            log(f"  predating {wl.name}: agent ready after {r.agent_start_to_ready_ms} ms, /readyz -> populated 0 "
                f"{r.latency_ms} ms, {r.detector} -> {r.action}: {r.result}" + (f" ({'; '.join(r.notes)})" if r.notes else ""))
    if bombs and within_budget("pinned baseline", PINNED_SECS + 4):
        poller = ThresholdPoller(fs).start()
        try:
            r = attempt("pinned/threshold", lambda: pinned(b, bombs[0], 256, poller=poller))
        finally:
            poller.close()
        if r is not None:
            out.append(r)
            log(f"  pinned {bombs[0].name} at 256 / threshold poller: latency {r.latency_ms} ms")
    if bombs and within_budget("predating baseline", 15):
        r = attempt("predating/threshold", lambda: predating(b, bombs[0], poller_factory=lambda: ThresholdPoller(fs).start()))
        if r is not None:
            out.append(r)
            log(f"  predating {bombs[0].name} / threshold poller: start -> populated 0 {r.latency_ms} ms")
    return out


def _removal(r: Any, s: Any, secs: float) -> bool:
    """Was the trial's bomb removed: populated 0 a second before its own deadline, no survivor?
    Sets ``removed`` and ``gone_ms``; a miss is not met, with a note."""
    r.removed = s.t_unpopulated is not None and s.t_unpopulated < secs - 1.0 and not r.survivors
    if r.removed:
        r.gone_ms = round(s.t_unpopulated * 1000, 1)
    else:
        r.met = False
        r.notes.append("not removed before its own deadline")
    return r.removed
