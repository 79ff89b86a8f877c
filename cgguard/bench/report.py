"""Results: bench.json (everything), bench.md (the tables), tasks.png (one classic bomb, per method)."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from cgguard import __version__
from cgguard.kernel.cgroupfs import CgroupFS

from .runner import BenignRun, BombRun, median, other_sandboxes

METHODS = ("cgguard", "pids.max", "naive-killer", "threshold")

TARGETS = {
    "classic_median_start_to_populated0_ms": 50,
    "classic_peak_tasks": 128,
    "survivors": 0,
    "pinned_limit_to_populated0_ms": 1000,
    "predating_readyz_to_populated0_ms": 2000,
    "agent_cpu_pct_1000_calm": 0.5,
    "benign_false_kills": 0,
    "shape_misses": 0,
    "shape_false_kills": 0,
}


# -- machine ---------------------------------------------------------------------------------
def machine(fs: CgroupFS, sandbox_mode: str, cap: int, own: str = "") -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ctrl = fs.controllers("")
    if fs.root == "/sys/fs/cgroup":
        mode = "unified (cgroup v2 only)"
    else:
        mode = f"hybrid: cgroup2 at {fs.root}, v1 controllers"
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    # Other cgguard sandboxes at start mean someone else's tests or bombs share the machine:
    # the timings and the agent's CPU are then noisier (its proc connector sees their forks).
    others = other_sandboxes(fs, own)
    return {
        "loadavg_at_start": load,
        "other_cgguard_cgroups_at_start": others,
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "cgroup_mode": mode,
        "cgroup2_root": fs.root,
        "cgroup2_controllers": ctrl,
        "containment": f"{sandbox_mode}, pids.max {cap} per workload",
        "python": platform.python_version(),
        "cgguard": __version__,
    }


def machine_line(m: dict[str, Any]) -> str:
    ctrl = ", ".join(m["cgroup2_controllers"]) or "none"
    return (f"{m['cpu_model']}, {m['cores']} cores, kernel {m['kernel']}, {m['cgroup_mode']} "
            f"(cgroup2 controllers: {ctrl}); Python {m['python']}, cgguard {m['cgguard']}")


# -- formatting ------------------------------------------------------------------------------
def _f(x: Any, nd: int = 0) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _detected(r: BombRun) -> str:
    if r.detected is None:
        return "n/a"
    return "yes" if r.detected else "**no**"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "–"
    return f"{a / b:.1f}×"


# -- summary ---------------------------------------------------------------------------------
def reference(runs: list[BombRun]) -> dict[str, float | None]:
    """cgguard's figures for one bomb: medians over its runs (the classic bomb has several)."""
    return {
        "start_to_gone_ms": median([r.start_to_gone_ms for r in runs]),
        "peak_v1": median([r.peak_v1 for r in runs]),
        "bomb_cpu_s": median([r.bomb_cpu_s for r in runs]),
    }


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue sets targets for, each with its goal and whether it was met."""
    bombs: list[BombRun] = res["bomb_runs"]
    benign: list[BenignRun] = res["benign_runs"]
    cg = [r for r in bombs if r.method == "cgguard"]
    classic = [r for r in cg if r.workload == "classic"]
    out: dict[str, Any] = {}

    def target(key: str, goal: str, value: Any, met: bool | None, note: str = "") -> None:
        out[key] = {"goal": goal, "value": value, "met": met, "note": note}

    if classic:
        goal = TARGETS["classic_median_start_to_populated0_ms"]
        med = median([r.start_to_gone_ms for r in classic])
        missing = sum(1 for r in classic if r.start_to_gone_ms is None)
        target("classic_median_start_to_populated0_ms", f"<= {goal} ms", med,
               None if med is None else med <= goal and not missing,
               f"{len(classic)} runs" + (f", {missing} not removed" if missing else ""))
        goal = TARGETS["classic_peak_tasks"]
        peak = max((r.peak_v1 or 0) for r in classic)
        target("classic_peak_tasks", f"<= {goal}", peak, peak <= goal,
               "max over runs of the cap group's pids.peak (zombies included); incident peak "
               f"max {max((r.peak_incident or 0) for r in classic)}")
        surv = sum(r.survivors or 0 for r in classic)
        target("classic_survivors", "0", surv, surv == 0 and not missing, f"{len(classic)} runs")
    _summarize_extras(res, target)
    counted = [r for r in cg if r.survivors is not None]
    surv = sum(r.survivors or 0 for r in counted)
    undetected = [r.workload for r in cg if r.detected is False]
    if cg:
        target("survivors", "0", surv, surv == 0 and not undetected,
               f"summed over {len(counted)} cgguard bomb runs"
               + (f"; not detected: {', '.join(sorted(set(undetected)))}" if undetected else ""))
    innocents = [r for r in cg if r.innocents]
    if innocents:
        lost = sum(r.innocents - (r.innocents_alive or 0) for r in innocents)
        target("innocents_killed", "0", lost, lost == 0, "sleep 60 processes sharing the bomb's cgroup")
    cost = res.get("agent_cost") or {}
    if "calm" in cost:
        v = cost["calm"]["cpu_pct"]
        target("agent_cpu_pct_1000_calm", "<= 0.5 % of a core", v, v <= 0.5,
               f"{cost['calm']['watched_cgroups']} cgroups watched, {cost['window_s']:g} s window")
    lin = res.get("lineage_bookkeeping") or {}
    if "bytes_per_record" in lin:
        target("lineage_bytes_per_record", "<= 600", lin["bytes_per_record"], lin["bytes_per_record"] <= 600,
               f"tracemalloc over {lin['records']} records; RSS {lin['rss_bytes_with_records'] / 2**20:.1f} MiB with them held")
    cg_benign = [r for r in benign if r.method == "cgguard"]
    if cg_benign:
        fk = [r.workload for r in cg_benign if r.false_kill]
        target("benign_false_kills", "0", len(fk), not fk,
               f"{len(cg_benign)} workloads" + (f"; {', '.join(fk)}" if fk else ""))
    return out


def _summarize_extras(res: dict[str, Any], target) -> None:
    """Targets of the pinned and predating trials and of the generated shapes."""
    runs = [t for t in res.get("target_runs", []) if t.method == "cgguard"]
    for kind, key in (("pinned", "pinned_limit_to_populated0_ms"), ("predating", "predating_readyz_to_populated0_ms")):
        mine = [t for t in runs if t.target == kind]
        if not mine:
            continue
        goal = TARGETS[key]
        lat = [t.latency_ms for t in mine if t.latency_ms is not None]
        worst = max(lat) if lat else None
        failed = [f"{t.workload}@{t.limit}" for t in mine if not t.removed]
        before = sum(1 for t in mine if t.removed and t.latency_ms is None)
        what = ("limit first hit (1 ms sampler) -> populated 0" if kind == "pinned"
                else "/readyz first 200 -> populated 0, bomb pinned at its cap before the agent started")
        target(key, f"<= {goal} ms", worst, not failed and all(t.met for t in mine),
               f"max over {len(mine)} runs ({what})" + (f"; {before} removed before reaching the limit" if before else "")
               + (f"; not removed: {', '.join(failed)}" if failed else ""))
    so = res.get("sink_overhead")
    if so:
        target("sink_overhead_pct", f"<= {so['target_pct']:g} % removal time", so["slowdown_pct"], so["met"],
               f"median start->populated 0 over {so['runs']} classic bombs, a hook that hangs and a webhook "
               f"that does not answer vs no sinks ({so['hung_sinks']['median_start_to_gone_ms']} vs "
               f"{so['plain']['median_start_to_gone_ms']} ms); hooks left running: {len(so['hooks_left_running'])}")
    for a in res.get("shape_arenas", []):
        c = _confusion(a["runs"])
        n = len(a["runs"])
        target(f"shape_misses[{a['arena']}]", "0", c["FN"], c["FN"] == 0,
               f"{c['TP'] + c['FN']} bombs of {n} shapes ({a['host']}, {'with' if a['limited'] else 'without'} limit)")
        target(f"shape_false_kills[{a['arena']}]", "0", c["FP"], c["FP"] == 0 and c["ERR"] == 0,
               f"{c['FP'] + c['TN'] + c['ERR']} bounded shapes" + (f"; {c['ERR']} bench errors" if c["ERR"] else ""))
        pa = sum(r.parent_actions for r in a["runs"])
        target(f"shape_parent_actions[{a['arena']}]", "0", pa, pa == 0,
               "incidents that acted on the arena's parent cgroup during a trial")


def _confusion(runs: list[Any]) -> dict[str, int]:
    from .generated import confusion

    return confusion(runs)


# -- markdown --------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    bombs: list[BombRun] = res["bomb_runs"]
    benign: list[BenignRun] = res["benign_runs"]
    L: list[str] = ["# cgguard bench", ""]
    L += [f"Machine: {machine_line(m)}.  ",
          f"Containment: {m['containment']}. Lineage: {res.get('lineage') or 'unknown'}.  ",
          f"Mode: {'quick' if res['quick'] else 'full'}; took {res['duration_s']:.0f} s; {res['started_iso']}; "
          f"load average at start {m.get('loadavg_at_start')}.", ""]
    if m.get("other_cgguard_cgroups_at_start"):
        L += [f"**Not a quiet host**: other cgguard cgroups existed at start "
              f"({', '.join(m['other_cgguard_cgroups_at_start'])}); timings and agent CPU are noisier.", ""]

    cg = [r for r in bombs if r.method == "cgguard"]
    if cg:
        L += ["## Bombs under cgguard (default settings)", ""]
        rows = []
        for r in cg:
            if r.workload == "classic" and r.run > 1:
                continue
            note = "; ".join(r.notes)
            rows.append([
                r.workload + (" (run 1)" if r.workload == "classic" else ""), _detected(r),
                f"{r.detector} ({r.evidence}) → {r.action}: {r.result}" if r.detector else "–", _f(r.incidents),
                _f(r.start_to_verdict_ms), _f(r.agent_detect_ms), _f(r.verdict_to_gone_ms), _f(r.start_to_gone_ms),
                f"{_f(r.peak_v1)} / {_f(r.peak_incident)}", _f(r.survivors),
                f"{r.innocents_alive}/{r.innocents}" if r.innocents else "–",
                _f(r.bomb_cpu_s, 2), _f(r.agent_cpu_s, 2), note,
            ])
        L += _table(["bomb", "detected", "verdict", "incidents", "start→verdict ms", "agent detect ms", "verdict→populated 0 ms",
                     "start→populated 0 ms", "peak tasks (cap group / incident)", "survivors", "innocents alive",
                     "bomb CPU s", "agent CPU s", "note"], rows)
        L += ["incidents: every incident touching the trial's cgroup, ancestors included (one is expected).", ""]
        L += ["start→verdict: spawn to the incident's timestamp; agent detect: the agent's first sign to its verdict; "
              "populated 0 from the bench's 1 ms sampler (for the shared cgroup: the bomb's processes gone, since "
              "the innocents keep it populated). Peak tasks: the cap group's kernel pids.peak (every task, "
              "zombies included) / the incident's peak.", ""]

    classic = [r for r in cg if r.workload == "classic"]
    if len(classic) > 1:
        L += [f"## Classic bash bomb, {len(classic)} runs", ""]
        rows = [[str(r.run), _f(r.start_to_verdict_ms), _f(r.verdict_to_gone_ms), _f(r.start_to_gone_ms),
                 _f(r.peak_v1), _f(r.peak_incident), _f(r.survivors), f"{r.detector} → {r.action}" if r.detector else "–"]
                for r in classic]
        rows.append(["**median**", _f(median([r.start_to_verdict_ms for r in classic])),
                     _f(median([r.verdict_to_gone_ms for r in classic])),
                     f"**{_f(median([r.start_to_gone_ms for r in classic]))}**",
                     _f(median([r.peak_v1 for r in classic])), _f(median([r.peak_incident for r in classic])),
                     _f(sum(r.survivors or 0 for r in classic)), ""])
        L += _table(["run", "start→verdict ms", "verdict→populated 0 ms", "start→populated 0 ms", "peak (cap group)",
                     "peak (incident)", "survivors", "verdict"], rows)

    base = [r for r in bombs if r.method != "cgguard"]
    if base:
        L += ["## Baselines on the same bombs", ""]
        rows = []
        names = list(dict.fromkeys(r.workload for r in base))
        for name in names:
            ref = reference([r for r in cg if r.workload == name])
            for method in METHODS:
                runs = [r for r in bombs if r.workload == name and r.method == method]
                if not runs:
                    continue
                r = runs[0]
                gone = median([x.start_to_gone_ms for x in runs]) if method == "cgguard" else r.start_to_gone_ms
                peak = median([x.peak_v1 for x in runs]) if method == "cgguard" else r.peak_v1
                cpu = median([x.bomb_cpu_s for x in runs]) if method == "cgguard" else r.bomb_cpu_s
                rows.append([
                    name, method, _f(r.removed), _f(r.start_to_verdict_ms), _f(gone),
                    _f(peak), _f(r.tasks_held), _f(cpu, 2), _f(r.survivors),
                    f"{r.innocents_alive}/{r.innocents}" if r.innocents else "–",
                    "1×" if method == "cgguard" else
                    f"gone {_ratio(gone, ref['start_to_gone_ms']) if r.removed else 'never'}, "
                    f"peak {_ratio(peak, ref['peak_v1'])}, CPU {_ratio(cpu, ref['bomb_cpu_s'])}",
                ])
        L += _table(["bomb", "method", "removed", "start→trigger ms", "start→gone ms", "peak tasks",
                     f"tasks after {base[0].window_s or 3:g} s", "bomb CPU s", "survivors", "innocents alive",
                     "vs cgguard"], rows)
        L += [f"pids.max: the cap alone ({m['containment']}); bomb CPU is the bomb cgroup's cpu.stat usage until "
              "removal, or over the window when never removed. naive-killer: psutil tree walk from the bomb's root + "
              "SIGKILL, started at 64 tasks. threshold: cgroup.kill when a cgroup holds > 64 tasks, polled every "
              "100 ms. Both run at the agent's priority. Ratios: baseline / cgguard (cgguard: median of its runs).", ""]

    if benign:
        L += ["## Benign corpus (false kills)", ""]
        names = list(dict.fromkeys(r.workload for r in benign))
        rows = []
        for name in names:
            c = next((r for r in benign if r.workload == name and r.method == "cgguard"), None)
            t = next((r for r in benign if r.workload == name and r.method == "threshold"), None)
            rows.append([
                name, _f(c.incidents) if c else "–", _f(c.exit_code) if c else "–",
                ("**yes**" if c.false_kill else "no") if c else "–",
                _f(c.duration_s, 1) if c else "–", _f(c.peak_v1) if c else "–",
                _f(c.agent_cpu_pct, 1) if c else "–",
                (("**yes**" if t.false_kill else "no") + (f" ({t.incidents} kills)" if t.incidents else "")) if t else "–",
                "; ".join((c.notes if c else []) + ([f"threshold: {n}" for n in t.notes] if t else [])),
            ])
        L += _table(["workload", "cgguard incidents", "exit", "cgguard false kill", "duration s", "peak tasks",
                     "agent CPU %", "threshold poller false kill", "note"], rows)

    L += _targets_markdown(res)
    L += _shapes_markdown(res)

    cost = res.get("agent_cost")
    ev = res.get("events")
    if cost or ev or benign:
        L += ["## What the agent costs", ""]
        rows = []
        for key, label in (("idle", "idle (empty sandbox watched)"), ("calm", "{n} calm cgroups watched"),
                           ("calm_no_lineage", "{n} calm cgroups watched, lineage off (--no-lineage)")):
            if cost and key in cost:
                c = cost[key]
                busy = " (overlapped other cgguard runs)" if c.get("overlapped") else ""
                rows.append([label.format(n=c["watched_cgroups"]) + busy, _f(c["cpu_pct"], 3), _f(c["rss_mib"], 1),
                             _f(c.get("host_events_per_s"))])
        for r in benign:
            if r.method == "cgguard" and r.workload in ("xargs", "make", "pool"):
                rows.append([f"under benign fork load: {r.workload} ({r.duration_s:.1f} s)", _f(r.agent_cpu_pct, 1), "–", "–"])
        for run in (ev or {}).get("runs", []):
            rows.append([f"fork probe: {run['mode']} loop at {run['forks_per_s']} forks/s", _f(run["agent_cpu_pct"], 1), "–",
                         "–"])
        if rows:
            L += _table(["condition", "agent CPU % of one core", "RSS MiB", "process events/s heard"], rows)
        if ev:
            if ev.get("runs"):
                L += [f"Proc connector ({ev.get('mode')}, rcvbuf {ev.get('rcvbuf')}): events received vs generated. "
                      "The agent hears every fork on the host, so 'received' includes other processes' forks "
                      f"(measured just before: {ev.get('background_forks_per_s')} forks/s); loss shows as ENOBUFS.", ""]
                L += _table(["probe", "forks generated", "forks received", "received %", "exits received",
                             "ENOBUFS", "seq gaps", "incidents"],
                            [[f"{x['mode']}+_exit+waitpid", _f(x["forks_generated"]), _f(x["forks_received"]),
                              _f(x["received_pct"], 1), _f(x["exits_received"]), _f(x["lost_enobufs"]),
                              _f(x["seq_gaps"]), _f(x["incidents"])] for x in ev["runs"]])
            if ev.get("note"):
                L += [f"Proc connector: {ev['note']}.", ""]

    lin = res.get("lineage_bookkeeping")
    if lin:
        L += ["## Lineage bookkeeping (synthetic bomb-shaped stream, one core)", ""]
        L += _table(
            ["records", "µs per fork", "µs per exit", "µs per event (fork+exit churn)", "bytes per record",
             "RSS with the records held, MiB"],
            [[_f(lin["records"]), _f(lin["us_per_fork"], 2), _f(lin["us_per_exit"], 2), _f(lin["us_per_churn_event"], 2),
              _f(lin["bytes_per_record"]), _f(lin["rss_bytes_with_records"] / 2**20, 1)]],
        )

    summ = res.get("targets") or {}
    if summ:
        L += ["## Targets", ""]
        L += _table(["figure", "goal", "measured", "met", "note"],
                    [[k, v["goal"], _f(v["value"], 1) if isinstance(v["value"], float) else _f(v["value"]),
                      {True: "yes", False: "**NO**", None: "–"}[v["met"]], v["note"]] for k, v in summ.items()])
    if res.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(L)


def _targets_markdown(res: dict[str, Any]) -> list[str]:
    runs = res.get("target_runs") or []
    if not runs:
        return []
    L = ["## Removal targets: a runaway pinned at a readable limit, a runaway that predates the agent", ""]
    rows = []
    for t in runs:
        verdict = f"{t.detector} ({t.evidence}) → {t.action}: {t.result}" if t.detector else (t.action or "–")
        rows.append([t.target, t.workload, t.method, _f(t.limit), _f(t.removed),
                     _f(t.limit_hit_ms) if t.target == "pinned" else _f(t.agent_start_to_ready_ms),
                     _f(t.gone_ms), f"**{_f(t.latency_ms)}**" if t.met is False else _f(t.latency_ms),
                     verdict, t.budget_source or "–", "; ".join(t.notes)])
    L += _table(["target", "bomb", "method", "limit", "removed", "limit hit ms / agent start→ready ms",
                 "start→populated 0 ms", "latency ms", "verdict", "budget source", "note"], rows)
    L += [f"pinned: latency = populated 0 minus the first time the cap group counted its limit (1 ms sampler), goal "
          f"<= {TARGETS['pinned_limit_to_populated0_ms']} ms; predating: the bomb pinned at its cap before a fresh agent "
          f"started, latency = populated 0 minus the first 200 from /readyz (5 ms polls), goal <= "
          f"{TARGETS['predating_readyz_to_populated0_ms']} ms (negative: removed before the agent said ready). "
          "threshold: the poller baseline on the same bomb (its start stands for /readyz). pids.max alone never "
          "removes a pinned runaway: it holds it at the limit until its own deadline.", ""]
    return L


def _q(d: dict[str, Any]) -> str:
    if not d or not d.get("n"):
        return "–"
    return f"{_f(d['min'])} / {_f(d['median'])} / {_f(d['p90'])} / {_f(d['max'])}"


def _shapes_markdown(res: dict[str, Any]) -> list[str]:
    from .generated import arena_summary, wrong

    arenas = res.get("shape_arenas") or []
    if not arenas:
        g = res.get("guest") or {}
        return [f"Guest: {g['problem']}", ""] if g.get("problem") else []
    plan = res.get("shape_plan") or {}
    L = ["## Generated shapes: confusion matrices", ""]
    L += [f"{plan.get('count', '?')} shapes from seed {plan.get('seed', '?')} (cgguard/testkit/shapes.py), labelled by "
          f"construction against a task budget of {plan.get('budget', '?')}: bounded (benign) shapes stay under half of "
          "it (peak computed from their parameters, checked against the kernel's count), unbounded ones (bombs) grow "
          "until stopped and end at their own deadline. Bounded shapes that abandon their children are at most 3 "
          "generations deep: the lineage rule's documented limit (4). One agent per arena, kill budget raised for the "
          "bench (every trial is in one tenant); trials strictly one at a time, the cap group drained between them.", ""]
    rows = []
    for a in arenas:
        c = _confusion(a["runs"])
        bombs, benign = c["TP"] + c["FN"], c["FP"] + c["TN"] + c["ERR"]
        pa = sum(r.parent_actions for r in a["runs"])
        rows.append([a["host"], "with" if a["limited"] else "without", a["setup"],
                     f"**{c['TP']}**", f"**{c['FN']}**" if c["FN"] else "0", f"**{c['FP']}**" if c["FP"] else "0",
                     f"**{c['TN']}**", _f(c["ERR"]), f"{bombs}/{benign}", _f(len(a.get("skipped", []))), _f(pa) if not pa else f"**{pa}**"])
    L += _table(["host", "limit", "setup", "TP (bomb removed)", "FN (bomb missed)", "FP (bounded killed/frozen)",
                 "TN", "bench errors", "bombs/bounded", "skipped", "actions on the parent"], rows)
    L += ["Actions on the parent: incidents during a trial that acted on the arena's parent cgroup (which holds "
          "only that trial here, but would hold the runaway's neighbours anywhere else); each fails the run.", ""]
    rows = []
    for a in arenas:
        s = arena_summary(a)
        rows.append([a["host"], "with" if a["limited"] else "without", _q(s["start_to_verdict_ms"]),
                     _q(s["start_to_gone_ms"]), _q(s["peak_bombs"]),
                     ", ".join(f"{k} {v}" for k, v in sorted(s["detectors"].items(), key=lambda kv: -kv[1])) or "–"])
    L += ["Bombs removed (TP): min / median / p90 / max.", ""]
    L += _table(["host", "limit", "start→verdict ms", "start→populated 0 ms", "peak tasks", "verdicts"], rows)
    # Outcome per kind of shape: where a miss or a false kill comes from at a glance.
    kinds = sorted({(r.kind, r.topology, r.label) for a in arenas for r in a["runs"]})
    if kinds:
        head = ["kind", "topology", "label"] + [f"{a['host']} {'with' if a['limited'] else 'without'}" for a in arenas]
        rows = []
        for k in kinds:
            row = list(k)
            for a in arenas:
                mine = [r for r in a["runs"] if (r.kind, r.topology, r.label) == k]
                c = _confusion(mine)
                good = c["TP"] + c["TN"]
                row.append(f"{good}/{len(mine)}" if good == len(mine) else f"**{good}/{len(mine)}**")
            rows.append(row)
        L += ["Correct outcomes per kind of shape (TP or TN / trials).", ""]
        L += _table(head, rows)
    bad = [(a, r) for a in arenas for r in wrong(a["runs"])]
    if bad:
        L += ["### Misses, false kills and bench errors", ""]
        rows = []
        for a, r in bad:
            inc = "; ".join(r.incident_log[:3]) or "none"
            if len(r.incident_log) > 3:
                inc += f"; and {len(r.incident_log) - 3} more"
            rows.append([r.outcome, a["arena"], r.shape, r.about, _f(r.peak) + (f" / {r.peak_bound}" if r.peak_bound else ""),
                         _f(r.start_to_verdict_ms), inc, "; ".join(r.notes)])
        L += _table(["outcome", "arena", "shape", "what it is", "peak / bound", "start→verdict ms", "incidents", "note"], rows)
        logs = sorted({p for a, _ in bad for p in a.get("agent_logs", [])})
        if logs:
            L += ["Agent logs of these arenas: " + ", ".join(logs), ""]
    g = res.get("guest")
    if g:
        L += [f"Guest: status {g.get('status', '–')}, boot {_f(g.get('boot_s'), 1)} s, {_f(g.get('elapsed_s'), 0)} s in "
              f"all" + (f"; **{g['problem']}**" if g.get("problem") else "") + ".", ""]
    return L


# -- json ------------------------------------------------------------------------------------
def to_json(res: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in res.items() if k not in ("bomb_runs", "benign_runs", "series", "target_runs", "shape_arenas")}
    out["bomb_runs"] = [r.to_dict() for r in res["bomb_runs"]]
    out["benign_runs"] = [r.to_dict() for r in res["benign_runs"]]
    out["target_runs"] = [t.to_dict() for t in res.get("target_runs", [])]
    out["shape_arenas"] = [{**a, "runs": [r.to_dict() for r in a["runs"]]} for a in res.get("shape_arenas", [])]
    out["shape_summary"] = {a["arena"]: _arena_summary(a) for a in res.get("shape_arenas", [])}
    # [ms since spawn, tasks (pids.current, zombies included), live processes]
    out["classic_series"] = {
        k: [[round(t * 1000, 1), n, live] for t, n, live in s.points]
        for k, s in res.get("series", {}).items() if k.startswith("classic/") and k.endswith("/1")
    }
    return out


# -- plot ------------------------------------------------------------------------------------
PLOT_STYLE = {
    "pids.max": ("pids.max only", "tab:red"),
    "naive-killer": ("naive userspace killer", "tab:orange"),
    "threshold": ("threshold poller (>64 tasks, 100 ms)", "tab:purple"),
    "cgguard": ("cgguard", "tab:green"),
}


def _arena_summary(a: dict[str, Any]) -> dict[str, Any]:
    from .generated import arena_summary

    return arena_summary(a)


def plot(res: dict[str, Any], path: str) -> str | None:
    """tasks.png: the classic bomb's task count (cap group pids.current) over time, per method."""
    series = res.get("series", {})
    curves = [(m, series[f"classic/{m}/1"]) for m in PLOT_STYLE if f"classic/{m}/1" in series]
    if not curves:
        return "no classic-bomb series to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'cgguard[bench]'): no plot"
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    for m, s in curves:
        label, color = PLOT_STYLE[m]
        xs = [t * 1000 for t, _, _ in s.points]
        tasks = [n for _, n, _ in s.points]
        live = [lv for _, _, lv in s.points]
        for a in (ax, zoom):
            a.plot(xs, tasks, color=color, lw=1.6, label=label if a is ax else None)
            a.plot(xs, live, color=color, lw=0.9, ls=":")
    cap = res["machine"]["containment"]
    ax.plot([], [], color="black", lw=1.6, label="tasks: pids.current (zombies included)")
    ax.plot([], [], color="black", lw=0.9, ls=":", label="live processes (cgroup.procs)")
    ax.set_title(f"classic bash bomb in its cap group ({cap})", fontsize=10)
    ax.set_xlabel("ms since start")
    ax.set_ylabel("tasks")
    ax.set_xlim(0, 3000)
    ax.grid(alpha=0.3)
    # Below the axes: inside, it would hide the plateaus (the cap, the zombies awaiting reaping).
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    zoom.set_title("first 400 ms", fontsize=10)
    zoom.set_xlim(0, 400)
    zoom.set_xlabel("ms since start")
    goal = TARGETS["classic_peak_tasks"]
    zoom.axhline(goal, color="grey", ls="--", lw=0.8)
    zoom.text(5, goal + 6, f"peak target {goal}", fontsize=7, color="grey")
    zoom.grid(alpha=0.3)
    fig.suptitle(machine_line(res["machine"]), fontsize=7)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(res: dict[str, Any], out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"md": os.path.join(out_dir, "bench.md"), "json": os.path.join(out_dir, "bench.json"),
             "png": os.path.join(out_dir, "tasks.png")}
    why = plot(res, paths["png"])
    if why:
        res.setdefault("notes", []).append(why)
        del paths["png"]
    with open(paths["json"], "w") as f:
        json.dump(to_json(res), f, indent=2, default=str)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(markdown(res))
    return paths


# -- agent cost on busy nodes (cgguard.bench.cost) -------------------------------------------
def cost_tables(res: dict[str, Any], md_path: str | None = None) -> str:
    """The cost scenarios' tables; appended to bench.md when ``md_path`` is given."""
    from .cost import markdown as cost_markdown

    md = cost_markdown(res["cost_scenarios"])
    if md_path:
        with open(md_path, "a") as f:
            f.write("\n" + md)
    return md
