"""Trials: one workload, one method, one run, measured from the outside.

Every trial follows the same shape, so the methods stay comparable:

1. a fresh cgroup ``<sandbox>/<workload>-<method><run>`` (and, for cgguard, a fresh agent
   watching ``<sandbox>/**`` with default settings, started before the workload);
2. the bench's realtime sampler on the workload's v1 cap group and v2 ``cgroup.events``;
3. spawn through :class:`cgguard.testkit.sandbox.Sandbox` (kernel task cap + deadline), ``t0`` taken just
   before the spawn;
4. wait for the method to act, or for the observation window to pass;
5. survivors, then a guaranteed kill of whatever is left and a wait until the cap group holds no
   task at all (zombies included), so the next trial never overlaps this one.

Times: start->verdict uses the incident's own wall-clock ``time`` (stamped when the verdict was
made) against the wall clock at spawn, so it carries no polling delay; start->populated 0 comes
from the 1 ms sampler.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from cgguard.kernel.cgroupfs import CgroupError, CgroupFS
from cgguard.testkit.corpus import Workload, compile_c
from cgguard.testkit.sandbox import Sandbox
from cgguard.testkit.sandbox import Workload as Running

from .agentproc import AgentProcess, AgentStartError
from .sampler import Sampler, Series, realtime, set_realtime

NOT_OBSERVABLE = "not observable on this host (needs pids.current)"

# Bomb lifetimes (their own deadline, after which they stop forking). Bash bombs read a whole-
# second clock, so a bomb given N seconds lives between N-1 and N.
BOMB_SECS = {"slow": 8, "zombies": 4}
DEFAULT_BOMB_SECS = 6
WINDOW_S = 3.0  # the span baselines observe a bomb for, and that the plot shows


@dataclass
class BombRun:
    workload: str
    method: str  # cgguard | pids.max | naive-killer | threshold
    run: int
    detected: bool | None = None  # None: not applicable or not observable here
    removed: bool = False
    detector: str | None = None  # pinned | fill-hold | trajectory | lineage
    evidence: str | None = None  # budget | trajectory | lineage
    budget: int | None = None  # the task budget the verdict measured against
    budget_source: str | None = None  # v2:<cgroup>, v1:<pids cgroup> or default
    action: str | None = None
    result: str | None = None
    start_to_verdict_ms: float | None = None  # spawn -> verdict (or the baseline's trigger)
    agent_detect_ms: float | None = None  # incident detect_ms: the agent's first sign -> verdict
    start_to_logged_ms: float | None = None  # spawn -> the bench read the incident line (5 ms polls)
    verdict_to_gone_ms: float | None = None
    start_to_gone_ms: float | None = None
    end_signal: str = "populated 0"
    peak_v1: int | None = None  # kernel pids.peak of the cap group: every task, zombies too
    peak_incident: int | None = None
    survivors: int | None = None  # live processes of the bomb after removal (or at window end)
    innocents: int = 0
    innocents_alive: int | None = None
    incidents: int | None = None  # cgguard incidents touching the trial's cgroup (ancestors too)
    parent_actions: int = 0  # of those, actions on an ancestor of the trial's cgroup (collateral)
    incident_log: list[str] = field(default_factory=list)  # each: detector -> action: result (notes)
    tasks_held: int | None = None  # cap group's pids.current at the end of the window
    bomb_cpu_s: float | None = None  # CPU the bomb's cgroup used until removal / window end
    window_s: float | None = None
    agent_cpu_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenignRun:
    workload: str
    method: str  # cgguard | threshold
    exit_code: int | None = None
    killed: bool = False
    incidents: int = 0
    false_kill: bool = False
    duration_s: float | None = None
    peak_v1: int | None = None
    agent_cpu_pct: float | None = None  # of one core, over the workload's run time
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(statistics.median(vals), 4) if vals else None


def other_sandboxes(fs: CgroupFS, *own: str) -> list[str]:
    """cgguard cgroups at the top of the tree that are not ours: other test or bench runs."""
    try:
        return sorted(d for d in os.listdir(fs.root) if d.startswith("cgguard-") and d not in own)
    except OSError:
        return []


def describe_lineage(status: dict[str, Any]) -> str:
    lin = status.get("tracking") or {}
    pc = status.get("connector") or {}
    if lin.get("enabled") is False or str(pc.get("mode", "off")).startswith(("off", "unavailable")):
        return f"off ({lin.get('mode') or pc.get('mode') or 'unknown'})"
    return f"on (proc connector, {pc.get('mode') or 'subscribed'})"


class Bench:
    """Shared state for every trial: the sandbox, a scratch dir, series kept for the plot."""

    def __init__(self, fs: CgroupFS, sb: Sandbox, *, cap: int, log=print):
        self.fs = fs
        self.sb = sb
        self.cap = cap
        self.log = log
        self.tmp = tempfile.mkdtemp(prefix="cgguard-bench-")
        self.series: dict[str, Series] = {}  # "workload/method/run" -> sampler series
        self.lineage: str | None = None  # what the first agent said about lineage tracking
        self.overlaps: list[str] = []  # trials that started while other cgguard cgroups existed
        self._n = 0
        # The sandbox's deadline watchdog kills workloads from its own thread: at normal priority
        # it could hold the GIL while a bomb preempts it and stall the realtime sampler.
        wd = getattr(sb, "_watchdog", None)
        if wd is not None and wd.native_id:
            set_realtime(wd.native_id)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- plumbing ------------------------------------------------------------------------------
    def trial_cgroup(self, label: str) -> str:
        self._n += 1
        # Someone else's tests running bombs at the same time skew timings and the agent's CPU
        # (its proc connector sees every fork on the host): note each trial that overlapped.
        others = other_sandboxes(self.fs, self.sb.name)
        if others:
            self.overlaps.append(f"{label}: {', '.join(sorted(others))}")
        return self.sb.cgroup(f"t{self._n:03d}-{label}")

    def agent(self, label: str) -> AgentProcess:
        a = AgentProcess(os.path.join(self.tmp, f"agent-{self._n:03d}-{label}"), [f"{self.sb.name}/**"])
        try:
            st = a.wait_ready()
        except AgentStartError:
            a.stop()
            raise
        if self.lineage is None:
            self.lineage = describe_lineage(st)
        return a

    def cpu_usage_s(self, cg: str) -> float | None:
        """cgroup2 cpu.stat usage_usec: present on every cgroup, even without the cpu controller."""
        try:
            for line in self.fs.read(cg, "cpu.stat").splitlines():
                k, _, v = line.partition(" ")
                if k == "usage_usec":
                    return int(v) / 1e6
        except (CgroupError, ValueError):
            pass
        return None

    def spawn(self, argv: list[str], cg: str, deadline_s: float, name: str, cwd: str | None = None,
              cap: int | None = None) -> Running:
        if cwd:
            # Sandbox.spawn has no cwd: change directory inside the contained process instead.
            argv = ["sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]
        return self.sb.spawn(argv, cg, deadline_s=deadline_s, cap=cap or self.cap, name=name)

    def start_sampled(self, w_argv: list[str], cg: str, deadline_s: float, name: str, *,
                      threshold: int | None = None, cwd: str | None = None,
                      cap: int | None = None) -> tuple[Running, Sampler, float, float]:
        """Arm the sampler, then spawn. Returns (workload, sampler, t0 monotonic, t0 wall)."""
        # The cap group is made by spawn(), so the sampler attaches right after Popen returns;
        # the contained shell needs longer than that to enter its cgroups, so nothing is missed.
        t0 = time.monotonic()
        t0_wall = time.time()
        w = self.spawn(w_argv, cg, deadline_s, name, cwd, cap)
        smp = Sampler(w.v1_dir, self.fs.abspath(cg), threshold=threshold)
        smp.begin(t0)
        smp.start()
        smp.started_evt.wait(1)
        return w, smp, t0, t0_wall

    def finish(self, w: Running, smp: Sampler | None, key: str | None) -> Series | None:
        """Kill whatever is left and wait until the cap group holds no task (zombies reaped)."""
        self.sb.kill(w)
        series = smp.stop() if smp is not None else None
        if series is not None and key:
            self.series[key] = series
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cur = self.current(w)
            if not cur:
                break
            time.sleep(0.02)
        return series

    def peak(self, w: Running) -> int | None:
        """Kernel peak of the workload's tasks: its v1 cap group, else its own cgroup (pure v2)."""
        v = self.sb.v1_peak(w)
        return v if v is not None else self.fs.pids_peak(w.cgroup)

    def current(self, w: Running) -> int | None:
        v = self.sb.v1_current(w)
        if v is not None or w.v1_dir:
            return v
        text = self.fs.read_optional(w.cgroup, "pids.current")
        return int(text) if text else None

    def innocents(self, cg: str, n: int) -> list[Running]:
        return [self.sb.spawn(["sleep", "60"], cg, deadline_s=90, cap=8, name="innocent") for _ in range(n)]

    @staticmethod
    def alive(ws: list[Running]) -> int:
        return sum(1 for w in ws if w.proc.poll() is None)

    def kill_all(self, ws: list[Running]) -> None:
        for w in ws:
            self.sb.kill(w)

    def end_trial(self, cg: str, w: Running | None, smp: Sampler | None, key: str | None,
                  innocents: list[Running] | None = None, agent: Any = None, notes: list[str] | None = None) -> None:
        """A trial's clean-up, in its ``finally``: the workload and its sampler, its innocents,
        its agent (an exit other than 0 goes into ``notes``), its cgroup."""
        if w is not None:
            self.finish(w, smp, key)
        self.kill_all(innocents or [])
        if agent is not None:
            stop_agent(agent, notes if notes is not None else [])
        self.remove(cg)

    def remove(self, cg: str) -> None:
        """Drop a finished trial's cgroup so later agents do not watch a growing pile of them."""
        for _ in range(50):
            if not self.fs.exists(cg) or self.fs.remove_tree(cg):
                return
            time.sleep(0.02)


# -- cgguard on bombs ------------------------------------------------------------------------
def agent_view(agent: AgentProcess, cg: str) -> str:
    """What the agent thinks of a cgroup now (tasks, budget and its source): for a bomb it missed,
    the first question is whether it measured against the limit the bench set."""
    try:
        st = agent.status(timeout=3)
    except (OSError, ValueError) as e:
        return f"agent status unavailable ({e})"
    c = next((x for x in st.get("cgroups", []) if x.get("path") == cg), None)
    if c is None:
        return "the agent does not watch it"
    return (f"agent's view: {c.get('tasks')} tasks ({c.get('source')}), budget {c.get('budget')} "
            f"({c.get('budget_source') or 'none'}), forks refused {c.get('forks_refused')}, state {c.get('state')}")


def related(incs: list[dict[str, Any]], cg: str) -> list[dict[str, Any]]:
    """Incidents that touch a trial's cgroup: on it, below it, or on an ancestor (which acts on it too)."""
    return [i for i in incs if i["cgroup"] == cg or i["cgroup"].startswith(cg + "/") or cg.startswith(i["cgroup"] + "/")]


def _describe(inc: dict[str, Any], cg: str) -> str:
    where = "" if inc["cgroup"] == cg else f" on {'ancestor' if cg.startswith(inc['cgroup'] + '/') else 'child'} {inc['cgroup']}"
    notes = "; ".join(inc.get("notes") or [])
    ev = f" on {inc['evidence']}" if inc.get("evidence") else ""
    budget = f", budget {inc['budget']} ({inc.get('budget_source') or '?'})" if inc.get("budget") else ""
    return (f"{inc.get('detector')}{ev} -> {inc.get('action')}: {inc.get('result')}{where}{budget}"
            + (f" ({notes})" if notes else ""))


def bomb_secs(wl: Workload) -> int:
    return BOMB_SECS.get(wl.name, DEFAULT_BOMB_SECS)


def by_itself(wl: Workload, t_end: float | None) -> bool:
    """Did the bomb end at its own deadline rather than by the method under test?

    Bash and C bombs read a whole-second clock, so the earliest they stop is ``secs - 1``.
    """
    return t_end is not None and t_end >= bomb_secs(wl) - 1.0


def stalled(r: BombRun) -> bool:
    """A bomb that never grew (host interference): its trial says nothing about the method."""
    return r.peak_v1 is not None and r.peak_v1 < 8 and r.detected is not True


def zombies_observable(b: Bench) -> bool:
    """A zombie pile shows only in pids.current; cgroup.threads and populated ignore zombies. The
    agent reads the pids counter its tasks are charged to: v2, or the v1 group on hybrid hosts."""
    return b.sb.mode in ("v1-pids", "v2-pids") or b.fs.has(b.sb.name, "pids.current")


def cgguard_bomb(b: Bench, wl: Workload, run: int, hold_s: float = 0.0) -> BombRun:
    """One bomb under a fresh agent. ``hold_s``: keep sampling that long after spawn (for the plot)."""
    secs = bomb_secs(wl)
    r = BombRun(wl.name, "cgguard", run)
    shared = bool(wl.extra.get("innocents"))
    cg = b.trial_cgroup(f"{wl.name}-cgguard{run}")
    agent = b.agent(wl.name)
    innocents: list[Running] = []
    w = smp = None
    try:
        if shared:
            innocents = b.innocents(cg, int(wl.extra["innocents"]))
            r.innocents = len(innocents)
            r.end_signal = "bomb processes gone"  # innocents keep the cgroup populated
            time.sleep(0.2)
        cpu0 = agent.cpu_seconds()
        with realtime():
            w, smp, t0, t0_wall = b.start_sampled(wl.make(secs), cg, secs + 3, wl.name)
            end_evt = smp.gone if shared else smp.unpopulated
            # Detection must happen while the bomb still lives, or its own deadline ends it.
            detect_by = t0 + secs - 1.2
            final_by = t0 + secs + 2
            inc: dict[str, Any] | None = None
            t_logged: float | None = None
            while True:
                now = time.monotonic()
                if now > final_by or (inc is None and now > detect_by):
                    break
                end_evt.wait(0.005)
                mine = related(agent.incidents(), cg)
                if not mine:
                    continue
                if inc is None:
                    t_logged = time.monotonic() - t0
                inc = mine[0]
                if inc.get("result") == "detected":
                    continue  # the action is still running
                if inc.get("result") in ("removed", "gone"):
                    end_evt.wait(max(0.0, final_by - time.monotonic()))
                break
            time.sleep(0.3)  # let a straggler show itself before counting
            live = len(b.sb.live_pids(w))
            view = agent_view(agent, cg) if inc is None else ""
            time.sleep(max(0.0, t0 + hold_s - time.monotonic()))
        r.agent_cpu_s = round(agent.cpu_seconds() - cpu0, 3)
        # Every action taken on this trial, in order: a first action that left part of the bomb
        # and a second one (possibly on an ancestor cgroup) must both show.
        alls = related(agent.incidents(), cg)
        r.incidents = len(alls)
        if inc is not None:
            inc = next((i for i in alls if i["id"] == inc["id"]), inc)
        r.incident_log = [_describe(i, cg) for i in alls]
        r.parent_actions = sum(1 for i in alls if cg.startswith(i["cgroup"] + "/") and i.get("action") != "report")
        if len(alls) > 1:
            r.notes += [f"incident {n + 1}: {d}" for n, d in enumerate(r.incident_log)]
        r.bomb_cpu_s = b.cpu_usage_s(cg)
        s = smp.series
        t_end = s.t_gone if shared else s.t_unpopulated
        if inc is not None:
            r.detected = True
            r.detector = inc.get("detector")
            r.evidence = inc.get("evidence")
            r.budget = inc.get("budget")
            r.budget_source = inc.get("budget_source")
            r.action = inc.get("action")
            r.result = inc.get("result")
            r.start_to_verdict_ms = round((inc["time"] - t0_wall) * 1000, 1)
            r.start_to_logged_ms = _ms(t_logged)
            r.agent_detect_ms = inc.get("detect_ms")
            r.peak_incident = inc.get("peak_tasks")
            r.removed = inc.get("result") in ("removed", "gone") and live == 0 and not by_itself(wl, t_end)
            if by_itself(wl, t_end):
                r.notes.append("gone only at the bomb's own deadline")
            if r.removed and t_end is not None:
                r.start_to_gone_ms = _ms(t_end)
                r.verdict_to_gone_ms = round(r.start_to_gone_ms - r.start_to_verdict_ms, 1)
            r.survivors = live
            if inc.get("survivors"):
                r.notes.append(f"agent reported {inc['survivors']} survivors")
        else:
            r.detected = False
            r.survivors = live  # the bomb, still there at the end of the window
            r.notes.append(f"no incident within {secs - 1.2:.1f} s; {view}")
        if wl.zombies and not zombies_observable(b):
            r.notes.insert(0, NOT_OBSERVABLE)
            if inc is None:
                r.detected = None
                r.survivors = None
        if shared:
            r.innocents_alive = b.alive(innocents)
        r.peak_v1 = b.peak(w)
    finally:
        b.end_trial(cg, w, smp, f"{wl.name}/cgguard/{run}", innocents, agent, r.notes)
    return r


# -- cgguard on benign work ------------------------------------------------------------------
BENIGN_TIMEOUT_S = 90


def run_benign(b: Bench, wl: Workload, method: str, poller=None) -> BenignRun:
    """Run one benign workload to completion under cgguard (a fresh agent) or a baseline poller."""
    r = BenignRun(wl.name, method)
    cg = b.trial_cgroup(f"{wl.name}-{method}")
    cwd = None
    if wl.setup is not None:
        cwd = os.path.join(b.tmp, f"work-{wl.name}-{method}")
        wl.setup(cwd)
    agent = b.agent(wl.name) if method == "cgguard" else None
    w = smp = None
    try:
        cpu0 = agent.cpu_seconds() if agent else 0.0
        w, smp, t0, _ = b.start_sampled(wl.make(BENIGN_TIMEOUT_S), cg, BENIGN_TIMEOUT_S + 30, wl.name, cwd=cwd)
        if poller is not None:
            poller.watch(cg)
        try:
            r.exit_code = w.proc.wait(BENIGN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            r.notes.append(f"did not finish within {BENIGN_TIMEOUT_S} s")
        r.duration_s = round(time.monotonic() - t0, 2)
        if agent is not None:
            r.agent_cpu_pct = round(100 * (agent.cpu_seconds() - cpu0) / max(r.duration_s, 1e-3), 2)
            time.sleep(0.5)  # a verdict made at the very end still lands in the log
            mine = related(agent.incidents(), cg)
            r.incidents = len(mine)
            r.killed = any(i.get("action") != "report" for i in mine)
            r.notes += [f"incident: {_describe(i, cg)}" for i in mine]
        if poller is not None:
            kills = poller.unwatch(cg)
            r.incidents = len(kills)
            r.killed = r.killed or bool(kills)
        if r.exit_code is not None and r.exit_code < 0:
            r.killed = True
        r.false_kill = r.killed or r.incidents > 0 or r.exit_code != 0
        r.peak_v1 = b.peak(w)
    finally:
        b.end_trial(cg, w, smp, None, agent=agent, notes=r.notes)
        if cwd:
            shutil.rmtree(cwd, ignore_errors=True)
    return r


# -- what the agent itself costs -------------------------------------------------------------
def agent_cost(fs: CgroupFS, tmp: str, window_s: float, calm: int, log=print, own: str = "") -> dict[str, Any]:
    """Agent CPU and RSS idle, then watching ``calm`` empty cgroups, each over ``window_s``.

    A sandbox of its own, so the calm cgroups never slow down the trials that follow. ``own``:
    the bench's main sandbox, which is not someone else's activity.
    """
    out: dict[str, Any] = {"window_s": window_s, "calm_cgroups": calm}
    sb = Sandbox.create(fs, prefix="cgguard-bench-cost", cap=64)
    try:
        # The third condition separates the watcher's cost from the proc connector's: with lineage
        # off the agent no longer hears the host's process events.
        for label, n, flags in (("idle", 0, ()), ("calm", calm, ()), ("calm_no_lineage", calm, ("--no-lineage",))):
            if n and not fs.exists(f"{sb.name}/calm"):
                base = sb.cgroup("calm")
                for i in range(n):
                    fs.mkdir(f"{base}/c{i:04d}")
            a = AgentProcess(os.path.join(tmp, f"agent-cost-{label}"), [f"{sb.name}/**"], *flags)
            try:
                st = a.wait_ready(timeout=60)
                watched = len(st.get("cgroups", []))
                # Start-up (tree walk, inotify watches, /proc scan) is not steady state, and calm
                # cgroups back off from 1 s to 4 s between samples over their first ~7 s.
                time.sleep(8.0)
                busy = other_sandboxes(fs, sb.name, own)
                # Its proc connector hears every process event on the host: count what it heard
                # during the window, so a busy host shows as such next to the CPU figure.
                e0 = _pc(a.status()).get("received")
                c0, t0 = a.cpu_seconds(), time.monotonic()
                time.sleep(window_s)
                c1, t1 = a.cpu_seconds(), time.monotonic()
                e1 = _pc(a.status()).get("received")
                busy += other_sandboxes(fs, sb.name, own)
                out[label] = {
                    "cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 3),
                    "cpu_s": round(c1 - c0, 4),
                    "rss_mib": round(a.rss_bytes() / 2**20, 1),
                    "watched_cgroups": watched,
                    "host_events_per_s": round((e1 - e0) / (t1 - t0)) if e0 is not None and e1 is not None else None,
                }
                if busy:
                    out[label]["overlapped"] = sorted(set(busy))
                log(f"  agent {label}: {out[label]['cpu_pct']} % of a core, RSS {out[label]['rss_mib']} MiB, "
                    f"{watched} cgroups watched, {out[label]['host_events_per_s']} process events/s on the host")
            finally:
                stop_agent(a, out.setdefault("notes", []), f"agent ({label})")
    finally:
        left = sb.close()
        if left:
            out.setdefault("notes", []).append(f"left behind: {left}")
    return out


# -- proc connector: events received vs generated -------------------------------------------
FORKN_SRC = r"""
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
/* N short-lived children, one at a time: a known number of FORK and EXIT events, never more
   than two tasks, so it is bounded by its count and harmless under any cap. */
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000, failed = 0;
    int use_vfork = argc > 2 && argv[2][0] == 'v';
    for (long i = 0; i < n; i++) {
        pid_t p = use_vfork ? vfork() : fork();
        if (p == 0) _exit(0);
        if (p < 0) { failed++; continue; }
        waitpid(p, 0, 0);
    }
    return failed ? 1 : 0;
}
"""


def forkn_binary(workdir: str) -> str:
    return compile_c(FORKN_SRC, "forkn", workdir)


def _pc(st: dict[str, Any]) -> dict[str, Any]:
    return st.get("connector") or {}


def events_probe(b: Bench, plan: list[tuple[str, int]], log=print) -> dict[str, Any]:
    """Proc-connector events the agent received vs a workload's known fork count."""
    out: dict[str, Any] = {"runs": []}
    if shutil.which("gcc") is None:
        out["note"] = "gcc is not installed: no fork-count probe"
        return out
    binary = forkn_binary(b.tmp)
    cg = b.trial_cgroup("events")
    agent = b.agent("events")
    try:
        time.sleep(1.0)
        s0 = _pc(agent.status())
        if "forks" not in s0:
            out["note"] = f"the agent exposes no proc-connector counters (connector: {s0 or 'missing'})"
            return out
        out["mode"] = s0.get("filter_mode") or s0.get("mode")
        out["rcvbuf"] = s0.get("rcvbuf")
        # Background: whatever else forks on the host while nothing of ours runs.
        time.sleep(1.0)
        s1 = _pc(agent.status())
        out["background_forks_per_s"] = s1["forks"] - s0["forks"]
        for mode, n in plan:
            before = _pc(agent.status())
            c0 = agent.cpu_seconds()
            t0 = time.monotonic()
            w = b.spawn([binary, str(n), mode], cg, deadline_s=60, name=f"forkn-{mode}")
            try:
                rc = w.proc.wait(60)
            except subprocess.TimeoutExpired:
                rc = None
            dt = time.monotonic() - t0
            time.sleep(0.5)  # the agent drains its socket; let it catch up before asking
            after = _pc(agent.status())
            cpu = agent.cpu_seconds() - c0
            b.finish(w, None, None)
            gen = n + 1  # + the fork that started the probe's wrapper shell
            got = after["forks"] - before["forks"]
            run = {
                "mode": mode,
                "forks_generated": gen,
                "forks_received": got,
                "exits_received": after.get("exits", 0) - before.get("exits", 0),
                "received_pct": round(100 * min(got, gen) / gen, 2),
                "lost_enobufs": after.get("overflows", 0) - before.get("overflows", 0),
                "seq_gaps": after.get("seq_gaps", 0) - before.get("seq_gaps", 0),
                "forks_per_s": round(n / dt) if dt > 0 else None,
                "agent_cpu_pct": round(100 * cpu / dt, 1) if dt > 0 else None,
                "exit_code": rc,
            }
            run["incidents"] = len(related(agent.incidents(), cg))
            out["runs"].append(run)
            log(f"  {mode} x{n}: received {got}/{gen} forks ({run['received_pct']} %), "
                f"{run['forks_per_s']}/s, agent {run['agent_cpu_pct']} % CPU, ENOBUFS {run['lost_enobufs']}")
    finally:
        b.end_trial(cg, None, None, None, agent=agent, notes=out.setdefault("notes", []))
    return out


def stop_agent(agent: Any, notes: list[str], label: str = "agent") -> None:
    """Stop a trial's agent; an exit other than 0 goes into the trial's notes with its last words."""
    rc = agent.stop()
    if rc not in (0, None):
        notes.append(f"{label} exited {rc}: {agent.output(300)}")


def trial_error(errors: list[str], what: str, e: Exception, log: Callable[[str], None]) -> None:
    """A broken trial is recorded, and the bench goes on with the next one."""
    errors.append(f"{what}: {type(e).__name__}: {e}")
    log(f"  {what}: ERROR {type(e).__name__}: {e}")
