"""The generated shapes in the pure cgroup-v2 test guest (:mod:`cgguard.testkit.guest`).

The host is hybrid: its limits are v1 caps. The guest boots Debian's kernel with
``cgroup_no_v1=all``, so there the agent reads ``pids.max`` and -- in the arena without a limit --
nothing at all: real unbounded bombs run there, bounded only by their own deadline.

Host side (:func:`run_guest`): boot the guest with ``python -m cgguard.bench --in-guest`` as its
job, in this checkout (the guest mounts the host's tree read-only at the same paths), and read
back ``<out>/guest/bench/shapes.json`` from the results share. Guest side (:func:`guest_main`):
run the shapes in both arenas and rewrite ``shapes.json`` after every trial, so a guest killed at
its timeout still leaves what it measured.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GUEST_OUT = "bench"  # below the guest's results share
GUEST_TIME_SCALE = 3.0  # shapes' deadlines in the guest, relative to the host's
RESULTS_FILE = "shapes.json"


def run_guest(plan: Any, out_dir: str, log) -> dict[str, Any]:
    """Boot the guest, run the plan's shapes there, return {arenas, status, ...} for the report."""
    from cgguard.testkit import guest

    from .generated import ShapeRun

    out: dict[str, Any] = {"arenas": []}
    reason = guest.guest_unavailable_reason(lambda m: log(f"  guest: {m}"))
    if reason:
        out["unavailable"] = reason
        out["problem"] = f"the guest could not be had: {reason}"
        log(f"  guest unavailable: {reason}")
        return out
    repo = str(Path(__file__).resolve().parents[2])
    results = Path(out_dir).resolve() / "guest"
    argv = [sys.executable, "-m", "cgguard.bench", "--in-guest", "--out", f"{guest.GUEST_RESULTS}/{GUEST_OUT}",
            "--seed", str(plan.shape_seed), "--count", str(plan.shape_count),
            "--shape-budget", str(plan.shape_budget), "--time-budget", str(int(plan.guest_budget_s))]
    if plan.quick and len(plan.shapes) < plan.shape_count:
        argv.append("--quick")
    for name in getattr(plan, "shape_names", None) or []:
        argv += ["--shape", name]
    env = {"PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)}
    timeout = plan.guest_budget_s + 240  # boot, image checks, agent starts: the bench inside stops itself first
    log(f"  booting the guest (timeout {timeout:.0f} s); results in {results}")
    res = guest.run_in_guest(argv, timeout, cwd=repo, env=env, results_dir=results)
    out.update(status=res.status, exit_code=res.exit_code, boot_s=res.boot_seconds,
               elapsed_s=round(res.elapsed_seconds, 1), results_dir=str(results))
    data_path = results / GUEST_OUT / RESULTS_FILE
    try:
        data = json.loads(data_path.read_text())
    except (OSError, ValueError) as e:
        out["problem"] = f"no results from the guest ({e}): {res.describe()}"
        log(f"  guest: {out['problem']}")
        return out
    for a in data.get("arenas", []):
        a["runs"] = [ShapeRun.from_dict(r) for r in a.get("runs", [])]
        # The guest's log paths are inside it; the same files are in the results share.
        a["agent_logs"] = [str(results / GUEST_OUT / os.path.basename(p)) for p in a.get("agent_logs", [])]
        out["arenas"].append(a)
    out["machine"] = data.get("machine")
    out["notes"] = data.get("notes", [])
    out["errors"] = data.get("errors", [])
    if res.status != "ok":
        out["problem"] = f"the guest ended with status {res.status} (partial results kept): {res.describe()[:2000]}"
    elif data.get("errors"):
        out["problem"] = "; ".join(data["errors"])
    log(f"  guest: status {res.status}, exit {res.exit_code}, boot {res.boot_seconds} s, "
        f"{res.elapsed_seconds:.0f} s in all")
    return out


def guest_main(args: Any) -> int:
    """Inside the guest: every shape in both arenas; results rewritten after each trial."""
    from cgguard.kernel.cgroupfs import CgroupFS, find_cgroup2_root
    from cgguard.testkit import shapes as shapes_mod
    from cgguard.testkit.sandbox import Sandbox

    from . import generated, report

    t0 = time.monotonic()
    out_dir = getattr(args, "out", None) or "results"
    os.makedirs(out_dir, exist_ok=True)
    budget = int(getattr(args, "shape_budget", None) or 256)
    seed = getattr(args, "seed", None)
    seed = shapes_mod.DEFAULT_SEED if seed is None else seed
    count = getattr(args, "count", None) or shapes_mod.DEFAULT_COUNT
    family = shapes_mod.generate(seed, count, budget)
    if getattr(args, "quick", False):
        family = shapes_mod.quick_subset(family)
    pick = getattr(args, "shape", None)
    if pick:
        family = [s for s in family if any(s.name.startswith(p) for p in pick)]
    time_budget = float(getattr(args, "time_budget", None) or 3600)

    def say(msg: str) -> None:
        print(f"[bench:guest] {msg}", flush=True)

    fs = CgroupFS(find_cgroup2_root())
    sb = Sandbox.create(fs, prefix="cgguard-bench", cap=4 * budget)
    data: dict[str, Any] = {"arenas": [], "errors": [], "notes": [],
                            "machine": report.machine(fs, sb.mode, budget, own=sb.name)}
    path = os.path.join(out_dir, RESULTS_FILE)

    def save(outs: list[dict[str, Any]]) -> None:
        data["arenas"] = [{**a, "runs": [r.to_dict() for r in a["runs"]]} for a in outs]
        data["duration_s"] = round(time.monotonic() - t0, 1)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, path)

    say(f"{report.machine_line(data['machine'])}; sandbox {sb.mode}; {len(family)} shapes, budget {budget}")
    tmp = tempfile.mkdtemp(prefix="cgguard-bench-")
    rc = 0
    outs: list[dict[str, Any]] = []
    try:
        # The guest emulates its CPUs: shapes grow several times slower, and the bench's samples
        # must leave them the CPU (see ShapeBench).
        sbench = generated.ShapeBench(fs, sb, tmp, say, time_scale=GUEST_TIME_SCALE, sample_period_s=0.005)
        arenas = [generated.make_arena(fs, sb, limited, budget) for limited in (True, False)]
        outs = generated.run_arenas(sbench, arenas, family, log=say, on_run=save,
                                    until=lambda need: time.monotonic() - t0 + need <= time_budget)
        generated.keep_logs(outs, out_dir)
        for a in outs:
            data["errors"] += a["errors"]
            a["agent_logs"] = [os.path.basename(p) for p in a["agent_logs"]]
            if a["skipped"]:
                data["notes"].append(f"{a['arena']}: skipped {len(a['skipped'])} shapes, e.g. {a['skipped'][0]}")
    except KeyboardInterrupt:
        data["errors"].append("interrupted")
        rc = 1
    except Exception as e:  # the host reads the error from the results
        data["errors"].append(f"{type(e).__name__}: {e}")
        rc = 1
    finally:
        left = sb.close()
        if left:
            data["errors"].append(f"cgroups left behind: {left}")
        save(outs)
    say(f"done in {time.monotonic() - t0:.0f} s; wrote {path}")
    return rc
