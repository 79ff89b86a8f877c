"""The generated shapes (:mod:`cgguard.testkit.shapes`) under cgguard: one confusion matrix per
host type and limit mode.

An *arena* is where a run of shapes happens: a parent cgroup in the sandbox, how each trial's
tasks are capped, and one agent (the real ``cgguard run``) that watches ``<parent>/**`` for all
of the arena's trials. Four arenas exist:

========================  =====================================================================
hybrid host, with limit   each trial's v1 pids cap is the budget; the agent reads it (its default)
hybrid host, without      the v1 cap stays for safety at ``SAFETY_FACTOR`` x the budget, but the
                          agent runs with ``budget: {use_v1: false, default_tasks: budget}``: no
                          limit it can read, it measures against the default budget
pure-v2 guest, with       ``pids.max`` = the budget on the arena's parent (the pids controller
                          stops there, as at a Kubernetes pod): charged, refused and read there
pure-v2 guest, without    no pids.max anywhere, the default budget; real unbounded bombs, bounded
                          only by their deadline (only in the guest)
========================  =====================================================================

One agent per arena keeps the run short; kill budgets are per tenant and every trial is in the
same delegated tree (one tenant), so the arena's agent gets a kill budget far above the number
of bombs (``KILL_BUDGET``). Trials run strictly one at a time; after each, the bench kills what
is left and waits until the cap group (or the arena's parent) counts no task at all -- zombies
included, which stay charged for a second or two here -- before the next one starts.

Outcomes: a bomb removed (incident removed/gone and ``populated 0``) before its own deadline is a
TP; one that was detected but not removed, or that reached its budget and was not removed, an FN.
A bomb that never reached its budget before its deadline was too slow *here* to say anything (the
model decides slow runaways as they near their budget): it is run once more with twice the time,
then counted as a bench error. A bounded shape that any incident touched is an FP, one that
finished its work untouched a TN; one still working at its deadline gets the same second chance;
one that broke otherwise, or went over its computed peak, is a bench error (the generator was
wrong). Bench errors fail the run too, apart from cgguard's own mistakes.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from cgguard.kernel.cgroupfs import CgroupError, CgroupFS
from cgguard.testkit.sandbox import Sandbox
from cgguard.testkit.shapes import SPAWN_S, Shape, ShapeKit

from .agentproc import AgentProcess, AgentStartError
from .runner import _describe, agent_view, median, related, trial_error
from .sampler import Sampler, realtime

MAX_TIME_SCALE = 12.0
MAX_DEADLINE_S = 150
SAFETY_FACTOR = 8  # hybrid host, without limit: the v1 cap is this many budgets (<= 2048 tasks)
MAX_SAFETY_CAP = 2048
KILL_BUDGET = {"max_actions": 10_000, "per_seconds": 60, "node_max_actions": 100_000}
DRAIN_TIMEOUT_S = 15.0
HOSTS = {"hybrid": "hybrid host", "v2": "pure-v2 guest"}


@dataclass
class Arena:
    host: str  # hybrid | v2
    limited: bool
    budget: int
    parent: str  # the cgroup trials are made under (relative to the cgroup2 root)
    cap: int | None  # the per-trial v1 cap (hybrid hosts)
    count_dir: str | None  # pure v2: the parent's directory, whose pids.current counts the trial
    agent_config: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.host}/{'with' if self.limited else 'without'}"

    def describe(self) -> str:
        if self.host == "hybrid":
            if self.limited:
                return f"v1 pids cap {self.cap} per trial, read by the agent as its budget"
            return (f"v1 pids cap {self.cap} per trial for safety, not read by the agent "
                    f"(budget.use_v1 false, default budget {self.budget})")
        if self.limited:
            return f"pids.max {self.budget} on the trials' parent (the pids controller stops there)"
        return f"no pids.max anywhere, default budget {self.budget}; deadline-bounded only"


def make_arena(fs: CgroupFS, sb: Sandbox, limited: bool, budget: int) -> Arena:
    parent = sb.cgroup("with" if limited else "without")
    config: dict[str, Any] = {"kill_budget": dict(KILL_BUDGET)}
    if not limited:
        config["budget"] = {"use_v1": False, "default_tasks": budget}
    if sb.mode == "v1-pids":
        cap = budget if limited else min(MAX_SAFETY_CAP, SAFETY_FACTOR * budget)
        return Arena("hybrid", limited, budget, parent, cap, None, config)
    if sb.mode == "v2-pids":
        # The parent gets the pids controller (the sandbox hands it down) but does not hand it on:
        # its trials have no pids files, so every fork is charged -- and refused -- at the parent.
        if limited:
            fs.write(parent, "pids.max", str(budget))
        return Arena("v2", limited, budget, parent, None, fs.abspath(parent), config)
    raise CgroupError(f"the shapes need a pids controller (sandbox mode {sb.mode})")


@dataclass
class ShapeRun:
    shape: str
    label: str  # benign | bomb
    kind: str
    topology: str
    host: str
    limited: bool
    budget: int
    about: str
    outcome: str = "ERR"  # TP | FN | FP | TN | ERR
    deadline_s: float | None = None
    detector: str | None = None
    evidence: str | None = None
    action: str | None = None
    result: str | None = None
    budget_seen: int | None = None  # the budget the agent's verdict measured against
    budget_source: str | None = None
    start_to_verdict_ms: float | None = None
    start_to_gone_ms: float | None = None
    verdict_to_gone_ms: float | None = None
    limit_hit_ms: float | None = None  # the count first reached the kernel cap (readable or not)
    peak: int | None = None  # the cap group's kernel pids.peak (hybrid) or the 1 ms sampler's (v2)
    peak_bound: int | None = None  # bounded shapes: computed from the parameters
    leaves_done: int | None = None
    leaves_expected: int | None = None
    exit_code: int | None = None
    duration_s: float | None = None
    incidents: int = 0
    parent_actions: int = 0  # incidents that acted on an ancestor of the trial (collateral)
    incident_log: list[str] = field(default_factory=list)
    incident_records: list[dict[str, Any]] = field(default_factory=list)  # misses and false kills only
    notes: list[str] = field(default_factory=list)

    @property
    def arena(self) -> str:
        return f"{self.host}/{'with' if self.limited else 'without'}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arena"] = self.arena
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapeRun":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class ArenaAgent:
    """One ``cgguard run`` for all trials of an arena, restarted if it dies (and said so)."""

    def __init__(self, tmp: str, arena: Arena, log: Callable[[str], None]):
        self.tmp, self.arena, self.log = tmp, arena, log
        self.agent: AgentProcess | None = None
        self.restarts = 0
        self.logs: list[str] = []
        self.lineage: str | None = None

    def get(self) -> AgentProcess:
        if self.agent is not None and self.agent.alive():
            return self.agent
        if self.agent is not None:
            self.restarts += 1
            self.log(f"  the {self.arena.key} agent died ({self.agent.stop()}): {self.agent.output(400)}; restarting")
        n = len(self.logs)
        a = AgentProcess(os.path.join(self.tmp, f"agent-{self.arena.key.replace('/', '-')}-{n}"),
                         [f"{self.arena.parent}/**"], "--log-level", "info", config=self.arena.agent_config)
        try:
            st = a.wait_ready(timeout=60)
        except AgentStartError:
            a.stop()
            raise
        from .runner import describe_lineage

        self.lineage = self.lineage or describe_lineage(st)
        self.logs.append(a.log_path)
        self.agent = a
        return a

    def stop(self) -> int | None:
        if self.agent is None:
            return None
        return self.agent.stop()


class ShapeBench:
    """Runs shapes in arenas, one trial at a time.

    ``time_scale`` stretches every shape's deadline and ``sample_period_s`` spaces the bench's
    own samples: the emulated guest runs everything several times slower, and a 1 ms realtime
    sampler there would take the CPU the shapes need.
    """

    def __init__(self, fs: CgroupFS, sb: Sandbox, tmp: str, log: Callable[[str], None] = print, *,
                 time_scale: float = 1.0, sample_period_s: float = 0.001):
        self.fs, self.sb, self.tmp, self.log = fs, sb, tmp, log
        self.kit = ShapeKit(os.path.join(tmp, "shapes"))
        self.time_scale = time_scale
        self.scales: dict[tuple[str, bool], float] = {}  # (kind, exec) -> measured time scale
        self.sample_period_s = sample_period_s
        self._n = 0

    def prepare(self, shapes: list[Shape]) -> None:
        """Build the programs before any trial: a compile must not eat a shape's deadline. Where
        time runs slower (the guest), measure how much slower bash starts, forked and exec'd."""
        if any(s.kind in ("c-proc", "c-thread") and not ShapeKit.missing(s) for s in shapes):
            self.kit.c_binary()
        if self.time_scale > 1 and not self.scales and shutil.which("bash"):
            for ex, script, n in ((False, "for ((i = 0; i < 20; i++)); do ( : ); done", 20),
                                  (True, "for ((i = 0; i < 10; i++)); do bash -c :; done", 10)):
                t = time.monotonic()
                subprocess.run(["bash", "-c", script], stdin=subprocess.DEVNULL, timeout=120, check=False)
                per = (time.monotonic() - t) / n
                self.scales[("bash", ex)] = min(MAX_TIME_SCALE, max(self.time_scale, per / SPAWN_S[("bash", ex)]))
            scales = ", ".join(f"{kind} {'exec' if ex else 'fork'} x{v:.1f}" for (kind, ex), v in self.scales.items())
            self.log(f"  time scales here: {scales}, others x{self.time_scale:g}")

    def deadline(self, s: Shape) -> int:
        scale = self.scales.get((s.kind, s.exec), self.time_scale)
        return min(MAX_DEADLINE_S, math.ceil(s.deadline_s() * scale))

    # -- plumbing ----------------------------------------------------------------------------
    def _count(self, arena: Arena, w) -> int | None:
        path = os.path.join(w.v1_dir or arena.count_dir or "", "pids.current")
        try:
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def _peak(self, w, smp: Sampler) -> int | None:
        v = self.sb.v1_peak(w)
        return v if v is not None else smp.series.peak or None

    def _drain(self, arena: Arena, w) -> float | None:
        """Kill what is left and wait until nothing is charged; returns the wait (None: gave up)."""
        self.sb.kill(w)
        t = time.monotonic()
        while time.monotonic() - t < DRAIN_TIMEOUT_S:
            if not self._count(arena, w):
                return time.monotonic() - t
            time.sleep(0.01)
        return None

    def _remove(self, cg: str) -> None:
        for _ in range(100):
            if not self.fs.exists(cg) or self.fs.remove_tree(cg):
                return
            time.sleep(0.02)

    # -- one trial ---------------------------------------------------------------------------
    def run(self, arena: Arena, agent: ArenaAgent, s: Shape, retry: str = "") -> ShapeRun:
        r = ShapeRun(s.name, s.label, s.kind, s.topology, arena.host, arena.limited, arena.budget, s.describe())
        if s.budget != arena.budget:
            r.notes.append(f"generated for budget {s.budget}, run at {arena.budget}")
        secs = self.deadline(s) * (2 if retry else 1)
        r.deadline_s = secs
        if retry:
            r.notes.append(f"second attempt with twice the deadline: the first time it {retry}")
        self._n += 1
        cg = f"{arena.parent}/t{self._n:03d}-{s.name}"[:200]
        self.fs.mkdir(cg)
        done = os.path.join(self.tmp, f"done-{self._n:03d}") if s.bounded else ""
        a = agent.get()
        w = smp = None
        view = ""
        try:
            with realtime():
                argv = self.kit.argv(s, secs, done)
                t0, t0_wall = time.monotonic(), time.time()
                w = self.sb.spawn(argv, cg, deadline_s=secs + 2, cap=arena.cap, name=s.name)
                cap = arena.cap or (arena.budget if arena.limited else None)
                smp = Sampler(w.v1_dir, self.fs.abspath(cg), count_dir=arena.count_dir, threshold=cap,
                              period_s=self.sample_period_s, record_every_s=max(0.002, self.sample_period_s))
                smp.begin(t0)
                smp.start()
                smp.started_evt.wait(1)
                if s.bounded:
                    self._await_benign(smp, w, t0, secs)
                else:
                    self._await_bomb(a, smp, cg, t0, t0_wall, secs)
                    if not smp.unpopulated.is_set():
                        view = agent_view(a, cg)  # before the bench's own kill changes it
            r.duration_s = round(time.monotonic() - t0, 2)
            if s.bounded:
                time.sleep(0.3)  # a verdict made at the very end still lands in the log
            incs = trial_incidents(a, cg, t0_wall)
            r.incidents = len(incs)
            r.incident_log = [_describe(i, cg) for i in incs]
            above = [i for i in incs if cg.startswith(i["cgroup"] + "/") and i.get("action") != "report"]
            r.parent_actions = len(above)
            if above:
                r.notes.append(f"acted {len(above)}x on an ancestor of the trial, first: {_describe(above[0], cg)}")
            r.exit_code = w.proc.poll()
            r.peak = self._peak(w, smp)
            series = smp.series
            if series.t_threshold is not None:
                r.limit_hit_ms = round(series.t_threshold * 1000, 1)
            own = [i for i in incs if not cg.startswith(i["cgroup"] + "/")] or incs
            first = next((i for i in own if i.get("result") != "detected"), own[0] if own else None)
            if first is not None:
                r.detector, r.evidence = first.get("detector"), first.get("evidence")
                r.action, r.result = first.get("action"), first.get("result")
                r.budget_seen, r.budget_source = first.get("budget"), first.get("budget_source")
                r.start_to_verdict_ms = round((first["time"] - t0_wall) * 1000, 1)
            if s.bounded:
                r.peak_bound = s.peak_bound()
                r.leaves_expected = s.leaves()
                r.leaves_done = os.path.getsize(done) if os.path.exists(done) else 0
                self._judge_benign(r, incs)
                if r.outcome == "ERR" and r.duration_s is not None and r.duration_s >= secs - 0.5 \
                        and (r.leaves_done or 0) < (r.leaves_expected or 0):
                    r.outcome = "STALL"  # still working at its deadline: too slow here, not killed
            else:
                self._judge_bomb(r, incs, series, secs)
                if r.outcome == "FN" and not incs and (r.peak or 0) < 0.95 * arena.budget:
                    # It never reached its budget before its deadline: a slow runaway is decided as
                    # it nears its budget (the model), so this trial says nothing about cgguard.
                    r.outcome = "STALL"
            if r.outcome in ("FN", "STALL") and view:
                r.notes.append(view)
            if r.outcome in ("FN", "FP") or r.parent_actions:
                r.incident_records = incs
                r.notes.append(f"agent log: {a.log_path}")
        finally:
            if smp is not None:
                smp.stop()
            if w is not None:
                waited = self._drain(arena, w)
                if waited is None:
                    r.notes.append(f"the cap group still counted {self._count(arena, w)} tasks {DRAIN_TIMEOUT_S:g} s "
                                   "after the trial: the next trial may overlap it")
            self._remove(cg)
            if done and os.path.exists(done):
                os.unlink(done)
        return r

    def _await_benign(self, smp: Sampler, w, t0: float, secs: float) -> None:
        """Until every process of the shape exited (abandoning roots exit at once: not the root)."""
        end = t0 + secs + 1
        while time.monotonic() < end:
            if smp.unpopulated.wait(0.02):
                break
            # A shape that never got going (exec failed) is never populated: give up on its exit.
            if smp.series.t_populated is None and w.proc.poll() is not None and time.monotonic() - t0 > 2:
                break

    def _await_bomb(self, a: AgentProcess, smp: Sampler, cg: str, t0: float, t0_wall: float, secs: float) -> None:
        """Until the cgroup emptied and the agent's incident is final, or the bomb's own deadline."""
        end = t0 + secs - 1.0  # bash members read a whole-second clock: some stop a second early
        if not smp.unpopulated.wait(max(0.0, end - time.monotonic())):
            return
        settle = time.monotonic() + 1.0  # the incident's final line follows populated 0 closely
        while time.monotonic() < settle:
            incs = trial_incidents(a, cg, t0_wall)
            if incs and all(i.get("result") != "detected" for i in incs):
                return
            time.sleep(0.01)

    @staticmethod
    def _judge_benign(r: ShapeRun, incs: list[dict[str, Any]]) -> None:
        if incs:
            r.outcome = "FP"
            acted = [i for i in incs if i.get("action") != "report"]
            r.notes.append("killed or frozen by cgguard" if acted else "reported by cgguard (no action)")
            return
        problems = []
        if r.leaves_done != r.leaves_expected:
            problems.append(f"{r.leaves_done} of {r.leaves_expected} leaves finished")
        if r.exit_code not in (0, None):
            problems.append(f"root exited {r.exit_code}")
        if r.peak is not None and r.peak_bound is not None and r.peak > r.peak_bound:
            problems.append(f"peak {r.peak} over its computed bound {r.peak_bound}")
        if problems:
            r.outcome = "ERR"
            r.notes.append("bench error (not cgguard): " + "; ".join(problems))
        else:
            r.outcome = "TN"

    @staticmethod
    def _judge_bomb(r: ShapeRun, incs: list[dict[str, Any]], series, secs: float) -> None:
        t_gone = series.t_unpopulated
        removed = any(i.get("result") in ("removed", "gone") for i in incs)
        in_time = t_gone is not None and t_gone < secs - 1.0
        if removed and in_time:
            r.outcome = "TP"
            r.start_to_gone_ms = round(t_gone * 1000, 1)
            if r.start_to_verdict_ms is not None:
                r.verdict_to_gone_ms = round(r.start_to_gone_ms - r.start_to_verdict_ms, 1)
            return
        r.outcome = "FN"
        if r.limit_hit_ms is not None and not r.limited and (r.start_to_verdict_ms is None
                                                             or r.start_to_verdict_ms > r.limit_hit_ms):
            r.notes.append(f"held at the bench's safety cap from {r.limit_hit_ms:.0f} ms, before any verdict: a limit the "
                           "agent cannot read (as pid_max, threads-max, RLIMIT_NPROC would be) stopped its growth")
        if not incs:
            r.notes.append(f"no incident before its deadline ({secs - 1:.0f} s)")
        elif not removed:
            results = sorted({str(i.get("result")) for i in incs})
            r.notes.append(f"detected, not removed ({len(incs)} incidents, results: {', '.join(results)})")
        else:
            r.notes.append("removed only at or after its own deadline")


def trial_incidents(a: AgentProcess, cg: str, t0_wall: float) -> list[dict[str, Any]]:
    """Incidents of one trial: on its cgroup or below it, and on an ancestor (the arena's parent,
    shared by every trial) only if decided after the trial started."""
    return [i for i in related(a.incidents(), cg)
            if not cg.startswith(i["cgroup"] + "/") or i.get("time", 0) >= t0_wall - 0.05]


# -- a whole arena --------------------------------------------------------------------------
def _arena_out(arena: Arena) -> dict[str, Any]:
    return {"arena": arena.key, "host": HOSTS[arena.host], "limited": arena.limited, "budget": arena.budget,
            "setup": arena.describe(), "agent_config": arena.agent_config, "runs": [], "skipped": [], "errors": []}


def _trial(sbench: ShapeBench, arena: Arena, agent: ArenaAgent, s: Shape, out: dict[str, Any],
           log: Callable[[str], None], until: Callable[[float], bool]) -> ShapeRun | None:
    """One shape in one arena, with its second chance if it was too slow here to say anything."""
    why = ShapeKit.missing(s)
    if why:
        out["skipped"].append(f"{s.name}: {why}")
        return None
    if not until(sbench.deadline(s) + 3):
        out["skipped"].append(f"{s.name}: time budget reached")
        return None
    try:
        r = sbench.run(arena, agent, s)
        if r.outcome == "STALL" and until(2 * sbench.deadline(s) + 3):
            what = "never reached its budget" if s.label == "bomb" else "had not finished"
            log(f"  {s.name}: {what} (peak {r.peak}) by its deadline: once more, with twice the time")
            r = sbench.run(arena, agent, s, retry=f"{what}, peak {r.peak}")
        if r.outcome == "STALL":
            r.outcome = "ERR"
            r.notes.append("bench error (not cgguard): " + (
                f"the bomb never reached its budget (peak {r.peak}) before its deadline" if s.label == "bomb"
                else f"still working at its deadline ({r.leaves_done} of {r.leaves_expected} leaves)"))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one broken trial must not leave the others unmeasured
        trial_error(out["errors"], f"{arena.key} {s.name}", e, log)
        return None
    out["runs"].append(r)
    extra = f" ({'; '.join(r.notes)})" if r.outcome not in ("TP", "TN") or r.notes else ""
    how = f"{r.detector}/{r.evidence} -> {r.action}: {r.result}" if r.detector else "no incident"
    log(f"  {r.outcome} {s.name} [{'with' if arena.limited else 'without'}]: {how}, verdict {r.start_to_verdict_ms} ms, "
        f"gone {r.start_to_gone_ms} ms, peak {r.peak}" + (f"/{r.peak_bound}" if r.peak_bound else "") + extra)
    return r


def run_arenas(sbench: ShapeBench, arenas: list[Arena], shapes: list[Shape], *, log: Callable[[str], None],
               until: Callable[[float], bool],
               on_run: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Every shape in every arena, one agent per arena, interleaved shape by shape: a time budget
    that runs out leaves every arena with the same shapes measured. ``until(need_s)`` says whether
    time remains; ``on_run`` gets the results so far after each trial."""
    outs = [_arena_out(a) for a in arenas]
    agents = [ArenaAgent(sbench.tmp, a, log) for a in arenas]
    sbench.prepare(shapes)
    for a in arenas:
        log(f"shapes, {HOSTS[a.host]}, {'with' if a.limited else 'without'} limit: {a.describe()}")
    log(f"{len(shapes)} shapes in {len(arenas)} arenas, one agent each, one trial at a time")
    try:
        for s in shapes:
            for arena, agent, out in zip(arenas, agents, outs):
                if _trial(sbench, arena, agent, s, out, log, until) is not None and on_run is not None:
                    on_run(outs)
    finally:
        for agent, out in zip(agents, outs):
            rc = agent.stop()
            out["lineage"] = agent.lineage
            out["agent_restarts"] = agent.restarts
            out["agent_logs"] = list(agent.logs)
            if rc not in (0, None):
                out["errors"].append(f"{out['arena']} agent exited {rc}: {agent.agent.output(300) if agent.agent else ''}")
    return outs


def run_host(fs: CgroupFS, sb: Sandbox, tmp: str, shapes: list[Shape], budget: int, log: Callable[[str], None],
             until: Callable[[float], bool], errors: list[str]) -> list[dict[str, Any]]:
    """Every shape with a limit the agent reads and without (two arenas, an agent each)."""
    try:
        arenas = [make_arena(fs, sb, limited, budget) for limited in (True, False)]
    except CgroupError as e:
        errors.append(f"shapes: {e}")
        return []
    outs = run_arenas(ShapeBench(fs, sb, tmp, log), arenas, shapes, log=log, until=until)
    for a in outs:
        errors.extend(a["errors"])
        c = arena_summary(a)["confusion"]
        log(f"  {a['host']}, {'with' if a['limited'] else 'without'} limit: TP {c['TP']} FN {c['FN']} FP {c['FP']} "
            f"TN {c['TN']}" + (f" errors {c['ERR']}" if c["ERR"] else "")
            + (f"; skipped {len(a['skipped'])}" if a["skipped"] else ""))
    return outs


def keep_logs(arenas: list[dict[str, Any]], out_dir: str) -> None:
    """Copy each arena's agent log next to the results (the evidence for any miss or false kill)."""
    os.makedirs(out_dir, exist_ok=True)
    for a in arenas:
        kept = []
        for i, path in enumerate(a.get("agent_logs", [])):
            dest = os.path.join(out_dir, f"agent-{a['arena'].replace('/', '-')}{'-' + str(i) if i else ''}.log")
            try:
                shutil.copyfile(path, dest)
                kept.append(dest)
            except OSError:
                pass
        a["agent_logs"] = kept


# -- summaries ------------------------------------------------------------------------------
def confusion(runs: list[ShapeRun]) -> dict[str, int]:
    c = {"TP": 0, "FN": 0, "FP": 0, "TN": 0, "ERR": 0}
    for r in runs:
        c[r.outcome] = c.get(r.outcome, 0) + 1
    return c


def quantiles(xs: list[float | None]) -> dict[str, float | None]:
    vals = sorted(x for x in xs if x is not None)
    if not vals:
        return {"n": 0, "min": None, "median": None, "p90": None, "max": None}
    p90 = vals[min(len(vals) - 1, int(round(0.9 * (len(vals) - 1))))]
    return {"n": len(vals), "min": vals[0], "median": median(vals), "p90": p90, "max": vals[-1]}


def arena_summary(a: dict[str, Any]) -> dict[str, Any]:
    runs: list[ShapeRun] = a["runs"]
    bombs = [r for r in runs if r.label == "bomb"]
    tp = [r for r in bombs if r.outcome == "TP"]
    detectors: dict[str, int] = {}
    for r in tp:
        key = f"{r.detector} ({r.evidence})"
        detectors[key] = detectors.get(key, 0) + 1
    return {
        "confusion": confusion(runs),
        "parent_actions": sum(r.parent_actions for r in runs),
        "start_to_gone_ms": quantiles([r.start_to_gone_ms for r in tp]),
        "start_to_verdict_ms": quantiles([r.start_to_verdict_ms for r in tp]),
        "peak_bombs": quantiles([r.peak for r in tp]),
        "detectors": detectors,
    }


def wrong(runs: list[ShapeRun]) -> list[ShapeRun]:
    return [r for r in runs if r.outcome in ("FN", "FP", "ERR") or r.parent_actions]

