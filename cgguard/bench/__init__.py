"""``cgguard bench``: detection, removal and cost of cgguard, against the usual alternatives.

Phases, strictly one workload at a time (never two bombs at once on a small machine):

1. agent cost: CPU and RSS of a real ``cgguard run`` idle and watching 1,000 calm cgroups;
2. proc connector: events received vs a probe's known fork count;
3. bombs under cgguard (a fresh agent per run, default settings), the classic bomb several times;
4. baselines on the same bombs: pids.max alone, a naive tree-walking killer, a threshold poller;
5. the benign corpus under cgguard (and under the threshold poller, to show what it kills);
6. the removal targets the named bombs do not cover (:mod:`.targets`): a runaway pinned at a
   readable limit, a runaway that predates the agent;
7. the generated family of shapes (:mod:`cgguard.testkit.shapes`, :mod:`.generated`): every shape
   with and without a limit the agent can read, one agent per arena; a confusion matrix each;
8. with ``--guest``: the same shapes in the pure cgroup-v2 test guest (:mod:`.inguest`).

``--shapes`` runs only 7 (and 8 with ``--guest``); ``--quick`` runs a subset of everything.

Every workload runs in one sandbox (:mod:`cgguard.testkit.sandbox`: kernel task cap + deadline) that is
closed, and checked for leftovers, whatever happens. Results: ``<out>/bench.md``, ``bench.json``
and ``tasks.png``; the tables are also printed.

Exit status: 0 when the run completed and cgguard was correct (every observable bomb removed,
no survivors, innocents spared, no benign workload killed, no generated shape missed or falsely
killed, nothing left behind); 1 otherwise;
2 when the bench cannot run here. Missed *performance* targets are reported, not failed on:
timings on a shared CI machine are too noisy to gate on.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cgguard.bench import bookkeeping
from cgguard.testkit.corpus import BENIGN, BOMBS, WORKLOADS, Workload

CAP = 1024  # the kernel task cap of every workload (<= 2048 by the bench's safety rules)
EXTRA_NAMES = ("cost", "events", "targets", "shapes", "sinks")  # --only names that are not workloads
# Baselines in a full run: the classic bomb and one of each other shape of runaway (every bomb
# would take as long as the rest of the run).
BASELINE_BOMBS = ("classic", "setsid", "c-fork", "threads", "fork-loop")


@dataclass
class Plan:
    quick: bool
    bombs: list[Workload]
    benign: list[Workload]
    classic_runs: int
    baseline_bombs: list[Workload]
    threshold_benign: bool
    cost: bool
    cost_window_s: float
    calm_cgroups: int
    events: list[tuple[str, int]]  # (fork | vfork, count)
    budget_s: float
    skipped: list[str] = field(default_factory=list)
    # -- removal targets, generated shapes, the guest (targets.py, generated.py, inguest.py) -------
    targets: bool = False
    sinks: bool = False  # removal time with a hanging hook and a dead webhook vs without sinks
    shapes: list[Any] = field(default_factory=list)  # testkit.shapes.Shape, run in every arena
    shape_budget: int = 256  # the task budget of every arena; bounded shapes stay under half of it
    shape_seed: int = 0
    shape_count: int = 0
    shape_names: list[str] = field(default_factory=list)  # --shape: only these (name prefixes)
    guest: bool = False  # run the shapes in the pure-v2 guest too
    guest_budget_s: float = 0.0


class PlanError(Exception):
    pass


def make_plan(quick: bool, only: list[str] | None, classic_runs: int | None = None, *,
              shapes_only: bool = False, guest: bool = False, seed: int | None = None,
              count: int | None = None, shape_names: list[str] | None = None) -> Plan:
    names = set(only or [])
    unknown = names - set(WORKLOADS) - set(EXTRA_NAMES)
    if unknown:
        raise PlanError(f"unknown workload(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(list(WORKLOADS) + list(EXTRA_NAMES))}")

    def pick(ws: list[Workload]) -> list[Workload]:
        return [w for w in ws if not names or w.name in names]

    bombs = pick(BOMBS)
    skipped = []
    for w in list(bombs) + pick(BENIGN):
        why = w.missing()
        if why:
            skipped.append(f"{w.name}: {why}")
    bombs = [w for w in bombs if not w.missing()]
    benign = [w for w in pick(BENIGN) if not w.missing()]
    # Baselines on representative bombs in a full run; quick runs compare on the classic bomb only.
    baseline = [w for w in bombs if w.name in (("classic",) if quick else BASELINE_BOMBS)]
    if shapes_only:
        bombs, benign, baseline = [], [], []
    plan = Plan(
        quick=quick,
        bombs=bombs,
        benign=benign,
        classic_runs=classic_runs or (3 if quick else 5),
        baseline_bombs=baseline,
        threshold_benign=not quick,
        cost=not names or "cost" in names,
        cost_window_s=3.0 if quick else 10.0,
        calm_cgroups=1000,
        events=([("fork", 10_000)] if quick else [("fork", 20_000), ("vfork", 100_000)])
        if not names or "events" in names else [],
        budget_s=170.0 if quick else 590.0,
        skipped=skipped,
    )
    if shapes_only:
        plan.cost, plan.events = False, []
    _plan_extras(plan, names, quick, shapes_only, guest, seed, count, shape_names)
    return plan


def _plan_extras(plan: Plan, names: set[str], quick: bool, shapes_only: bool, guest: bool,
                 seed: int | None, count: int | None, pick: list[str] | None) -> None:
    """Targets, generated shapes and the guest: asked for by name with --only, else in every run."""
    from cgguard.testkit import shapes

    plan.targets = not shapes_only and (not names or "targets" in names)
    plan.sinks = not shapes_only and (not names or "sinks" in names)
    plan.shape_seed = shapes.DEFAULT_SEED if seed is None else seed
    plan.shape_count = count or shapes.DEFAULT_COUNT
    if shapes_only or not names or "shapes" in names:
        family = shapes.generate(plan.shape_seed, plan.shape_count, plan.shape_budget)
        plan.shapes = shapes.quick_subset(family) if quick and not count else family
        if pick:
            plan.shape_names = list(pick)
            plan.shapes = [s for s in family if any(s.name.startswith(p) for p in pick)]
            if not plan.shapes:
                raise PlanError(f"no generated shape starts with {', '.join(pick)} (seed {plan.shape_seed}, "
                                f"{plan.shape_count} shapes: s000 to s{plan.shape_count - 1:03d})")
    plan.guest = guest and bool(plan.shapes)
    # Each arena's trials take ~2.5 s on average here (bombs drain their zombies between trials).
    per_trial = 2.6
    plan.budget_s += (30 if plan.targets and quick else 90 if plan.targets else 0) + per_trial * 2 * len(plan.shapes)
    plan.budget_s += (20 if quick else 40) if plan.sinks else 0
    # The guest emulates its CPU (TCG): several times slower than the host, boot included.
    # Bash starts 10x slower there: ~6 s per trial measured, twice that as a ceiling for retries.
    plan.guest_budget_s = 300 + 12.0 * 2 * len(plan.shapes) if plan.guest else 0.0


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _usage(msg: str) -> int:
    """Bad input or a host the bench cannot run on: one line on stderr, exit 2 (as the CLI does)."""
    print(f"cgguard: bench: {msg}", file=sys.stderr, flush=True)
    return 2


def main(args: Any) -> int:
    from cgguard.kernel.cgroupfs import CgroupFS, NoCgroup2, find_cgroup2_root
    from cgguard.testkit.sandbox import Sandbox

    from . import baselines, report, runner

    # -- agent cost on busy nodes (cgguard.bench.cost) -------------------------------------
    # ``cgguard bench --cost`` runs those scenarios alone; a full run includes them (below).
    if getattr(args, "cost", False):
        from . import cost

        return cost.main(args)
    # --------------------------------------------------------------------------------------

    t_start = time.monotonic()
    quick = bool(getattr(args, "quick", False))
    out_dir = getattr(args, "out", None) or "results"
    if getattr(args, "in_guest", False):
        from . import inguest

        return inguest.guest_main(args)
    try:
        # ``runs`` is not a CLI flag: the test suite uses it to keep its smoke run short.
        guest_only = bool(getattr(args, "guest_only", False))
        plan = make_plan(quick, getattr(args, "only", None), getattr(args, "runs", None),
                         shapes_only=guest_only or bool(getattr(args, "shapes", False)),
                         guest=guest_only or bool(getattr(args, "guest", False)),
                         seed=getattr(args, "seed", None), count=getattr(args, "count", None),
                         shape_names=getattr(args, "shape", None))
    except PlanError as e:
        return _usage(str(e))
    except Exception as e:  # a shape generator that cannot make its family (ShapeError)
        return _usage(f"cannot plan the run: {e}")
    if os.geteuid() != 0:
        return _usage("needs root (it creates cgroups and runs contained bombs)")
    try:
        fs = CgroupFS(find_cgroup2_root())
    except NoCgroup2 as e:
        return _usage(str(e))
    if not fs.supports_kill():
        return _usage("this kernel has no cgroup.kill (needs Linux 5.14+)")

    res: dict[str, Any] = {
        "quick": quick,
        "started_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bomb_runs": [],
        "benign_runs": [],
        "target_runs": [],
        "shape_arenas": [],
        "series": {},
        "notes": [f"skipped {s}" for s in plan.skipped],
        "errors": [],
    }
    if plan.shapes:
        res["shape_plan"] = {"seed": plan.shape_seed, "count": len(plan.shapes), "budget": plan.shape_budget,
                             "generated": plan.shape_count}
    sb = Sandbox.create(fs, prefix="cgguard-bench", cap=CAP)
    res["machine"] = report.machine(fs, sb.mode, CAP, own=sb.name)
    _say(report.machine_line(res["machine"]))
    _say(f"sandbox {fs.abspath(sb.name)} ({sb.mode}, cap {CAP}); {'quick' if quick else 'full'} run, "
         f"budget {plan.budget_s:.0f} s")
    b = runner.Bench(fs, sb, cap=CAP, log=_say)
    poller: baselines.ThresholdPoller | None = None

    def within_budget(what: str, need_s: float = 10.0) -> bool:
        if time.monotonic() - t_start + need_s <= plan.budget_s:
            return True
        res["notes"].append(f"skipped {what}: time budget of {plan.budget_s:.0f} s reached")
        return False

    def attempt(what: str, fn: Callable[[], Any]) -> Any:
        """One trial; a failure is recorded and the bench goes on with the next one."""
        try:
            return fn()
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a broken trial must not leave the rest unmeasured
            runner.trial_error(res["errors"], what, e, _say)
            return None

    def bomb_trial(what: str, fn: Callable[[], Any]) -> Any:
        """A bomb trial, run once more if the bomb never grew (the host stalled it, not the method)."""
        r = attempt(what, fn)
        if r is not None and runner.stalled(r):
            _say(f"  {what}: the bomb never grew (peak {r.peak_v1}): once more")
            r = attempt(what, fn)
            if r is not None:
                r.notes.append("second attempt: the bomb did not grow on the first")
        return r

    try:
        if plan.cost and within_budget("agent cost", 30):
            _say(f"agent cost: idle and with {plan.calm_cgroups} calm cgroups, {plan.cost_window_s:g} s each")
            res["agent_cost"] = attempt("agent cost", lambda: runner.agent_cost(
                fs, b.tmp, plan.cost_window_s, plan.calm_cgroups, log=_say, own=sb.name))
        if plan.cost and within_budget("lineage bookkeeping", 10):
            n = 20_000 if quick else 100_000
            _say(f"lineage bookkeeping: {n} synthetic records")
            res["lineage_bookkeeping"] = attempt("lineage bookkeeping", lambda: bookkeeping.measure_bookkeeping(n))
        if plan.events and within_budget("proc-connector probe", 15):
            _say("proc connector: events received vs generated")
            res["events"] = attempt("events", lambda: runner.events_probe(b, plan.events, log=_say))

        if plan.bombs:
            _say("bombs under cgguard")
        for wl in plan.bombs:
            runs = plan.classic_runs if wl.name == "classic" else 1
            for run in range(1, runs + 1):
                if not within_budget(f"{wl.name} run {run} under cgguard", runner.bomb_secs(wl) + 4):
                    break
                # The first classic run is the plotted one: sample it over the baselines' window.
                hold = runner.WINDOW_S if wl.name == "classic" and run == 1 else 0.0
                r = bomb_trial(f"{wl.name}/cgguard/{run}", lambda: runner.cgguard_bomb(b, wl, run, hold))
                if r is not None:
                    res["bomb_runs"].append(r)
                    _say(f"  {wl.name} #{run}: detected {r.detected}, start->verdict {r.start_to_verdict_ms} ms, "
                         f"start->gone {r.start_to_gone_ms} ms, peak {r.peak_v1}/{r.peak_incident}, "
                         f"survivors {r.survivors}" + (f" ({'; '.join(r.notes)})" if r.notes else ""))

        if plan.baseline_bombs:
            _say("baselines on the same bombs")
            poller = baselines.ThresholdPoller(fs).start()
            for wl in plan.baseline_bombs:
                for method, fn in (
                    ("pids.max", lambda: baselines.pids_max_only(b, wl)),
                    ("naive-killer", lambda: baselines.naive_killer(b, wl)),
                    ("threshold", lambda: baselines.threshold_bomb(b, wl, poller)),
                ):
                    if not within_budget(f"{wl.name} under {method}", 6):
                        break
                    r = bomb_trial(f"{wl.name}/{method}", fn)
                    if r is not None:
                        res["bomb_runs"].append(r)
                        _say(f"  {wl.name} / {method}: removed {r.removed}, start->gone {r.start_to_gone_ms} ms, "
                             f"peak {r.peak_v1}, survivors {r.survivors}, held {r.tasks_held}, CPU {r.bomb_cpu_s}")

        if plan.benign:
            _say("benign corpus")
            methods = ["cgguard"] + (["threshold"] if plan.threshold_benign else [])
            if "threshold" in methods and poller is None:
                poller = baselines.ThresholdPoller(fs).start()
            for wl in plan.benign:
                for method in methods:
                    if not within_budget(f"{wl.name} under {method}", 12):
                        break
                    r = attempt(f"{wl.name}/{method}", lambda: runner.run_benign(
                        b, wl, method, poller if method == "threshold" else None))
                    if r is not None:
                        res["benign_runs"].append(r)
                        _say(f"  {wl.name} / {method}: exit {r.exit_code}, incidents {r.incidents}, "
                             f"false kill {r.false_kill}, {r.duration_s} s"
                             + (f", agent {r.agent_cpu_pct} % CPU" if r.agent_cpu_pct is not None else ""))
        # -- removal targets and generated shapes (targets.py, generated.py) --------------------
        if plan.targets:
            from . import targets

            _say("targets: runaways pinned at a readable limit, runaways that predate the agent")
            res["target_runs"] = targets.run_targets(b, fs, quick, _say, attempt, within_budget)
        if plan.sinks and within_budget("sink overhead", 20):
            from . import operating

            _say("sinks: the classic bomb's removal time with a hanging hook and a dead webhook, and without sinks")
            res["sink_overhead"] = attempt("sink overhead", lambda: operating.sink_overhead(b, runs=3 if quick else 5, log=_say))
        if plan.shapes and not guest_only:
            from . import generated

            res["shape_arenas"] = generated.run_host(fs, sb, b.tmp, plan.shapes, plan.shape_budget, _say,
                                                     lambda need: time.monotonic() - t_start + need <= plan.budget_s,
                                                     res["errors"])
            generated.keep_logs(res["shape_arenas"], out_dir)
        # -- agent cost on busy nodes (cgguard.bench.cost): full runs only, on a budget of its own
        if plan.cost and not quick:
            from . import cost

            plan.budget_s += cost.FULL_RUN_S
            _say("agent cost on busy nodes (cgguard.bench.cost)")
            res["cost_scenarios"] = attempt("cost scenarios", lambda: cost.run(fs, quick, log=_say))
    except KeyboardInterrupt:
        res["errors"].append("interrupted")
    finally:
        if poller is not None:
            poller.close()
        left = sb.close()
        b.close()
        if left:
            res["errors"].append(f"cgroups left behind: {', '.join(left)}")
        res["series"] = b.series
        res["lineage"] = b.lineage
        res["overlapping_trials"] = b.overlaps
        if b.overlaps:
            res["notes"].append(f"{len(b.overlaps)} trials started while other cgguard cgroups existed (someone "
                                f"else's tests on this host): their timings and agent CPU may be skewed")

    if plan.guest and "interrupted" not in res["errors"]:
        from . import inguest

        _say(f"the pure cgroup-v2 guest: {len(plan.shapes)} shapes in each arena (budget {plan.guest_budget_s:.0f} s)")
        res["host_duration_s"] = round(time.monotonic() - t_start, 1)
        res["guest"] = inguest.run_guest(plan, out_dir, _say)
        res["shape_arenas"] += res["guest"].pop("arenas", [])
    res["duration_s"] = round(time.monotonic() - t_start, 1)
    res["targets"] = report.summarize(res)
    res["problems"] = correctness(res)
    for e in res["errors"]:
        res["notes"].append(f"error: {e}")
    paths = report.write(res, out_dir)
    print()
    print(report.markdown(res))
    if res.get("cost_scenarios"):  # agent cost on busy nodes (cgguard.bench.cost)
        print(report.cost_tables(res, paths["md"]))
    print(f"Ran on: {report.machine_line(res['machine'])}")
    print(f"Took {res['duration_s']:.0f} s. Wrote {', '.join(paths.values())}")
    if res["problems"]:
        for p in res["problems"]:
            print(f"FAILED: {p}")
        return 1
    return 0


def correctness(res: dict[str, Any]) -> list[str]:
    """What makes the run fail: cgguard wrong, not merely slow (see the module docstring)."""
    problems = list(res["errors"])
    for r in res["bomb_runs"]:
        if r.method != "cgguard":
            continue
        if r.detected is False:
            problems.append(f"{r.workload} run {r.run}: not detected")
        elif r.detected and not r.removed:
            problems.append(f"{r.workload} run {r.run}: not removed ({r.result})")
        if r.survivors:
            problems.append(f"{r.workload} run {r.run}: {r.survivors} survivors")
        if r.parent_actions:
            problems.append(f"{r.workload} run {r.run}: cgguard acted on an ancestor of the bomb's cgroup "
                            f"({r.parent_actions} actions): everything beside the bomb would go with it")
        if r.innocents and (r.innocents_alive or 0) < r.innocents:
            problems.append(f"{r.workload} run {r.run}: {r.innocents - (r.innocents_alive or 0)} innocents killed")
    for r in res["benign_runs"]:
        if r.method == "cgguard" and r.false_kill:
            problems.append(f"benign {r.workload}: false kill (exit {r.exit_code}, {r.incidents} incidents)")
    for t in res.get("target_runs", []):
        if t.method == "cgguard" and not t.removed:
            problems.append(f"{t.target} {t.workload} (limit {t.limit}): not removed")
    so = res.get("sink_overhead")
    if so:
        for label in ("plain", "hung_sinks"):
            if so[label]["removed"] != so["runs"]:
                problems.append(f"sinks ({label}): {so['runs'] - so[label]['removed']} of {so['runs']} classic bombs not removed")
        if so["hooks_left_running"]:
            problems.append(f"sinks: {len(so['hooks_left_running'])} hook processes still running after the agent stopped")
    for a in res.get("shape_arenas", []):
        for r in a["runs"]:
            if r.outcome == "FN":
                problems.append(f"{a['arena']}: missed bomb {r.shape} ({'; '.join(r.notes)})")
            elif r.outcome == "FP":
                problems.append(f"{a['arena']}: false kill of bounded {r.shape} ({'; '.join(r.incident_log)})")
            elif r.outcome == "ERR":
                problems.append(f"{a['arena']}: {r.shape}: {'; '.join(r.notes)}")
            if r.parent_actions:
                # Acting on the parent removes everything beside the runaway: wrong, whatever the outcome.
                problems.append(f"{a['arena']}: {r.shape}: cgguard acted on the trial's parent cgroup")
    if res.get("guest", {}).get("problem"):
        problems.append(f"guest: {res['guest']['problem']}")
    return problems
