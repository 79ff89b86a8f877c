"""``cgguard bench``: a real, small run of the whole machinery (contained bombs, real agent)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from cgguard.bench import PlanError, correctness, main, make_plan
from cgguard.bench.runner import BenignRun, BombRun, median
from cgguard.testkit.sandbox import V1_PIDS


def test_plan_rejects_unknown_names_and_honours_only():
    with pytest.raises(PlanError, match="nope"):
        make_plan(True, ["classic", "nope"])
    p = make_plan(True, ["classic", "xargs"])
    assert [w.name for w in p.bombs] == ["classic"]
    assert [w.name for w in p.benign] == ["xargs"]
    assert not p.cost and not p.events  # not asked for
    full = make_plan(False, None)
    assert full.classic_runs == 5 and full.cost and full.events and full.threshold_benign
    assert "zombies" not in [w.name for w in full.baseline_bombs]
    assert {"shared", "c-fork", "threads", "setsid"} <= {w.name for w in full.bombs}


def test_unknown_only_is_a_usage_error(capsys):
    rc = main(argparse.Namespace(quick=True, out="/nonexistent", only=["no-such-workload"]))
    assert rc == 2
    assert "no-such-workload" in capsys.readouterr().err


def test_correctness_flags_what_must_fail_the_run():
    ok = BombRun("classic", "cgguard", 1, detected=True, removed=True, survivors=0)
    assert correctness({"errors": [], "bomb_runs": [ok], "benign_runs": [BenignRun("xargs", "cgguard")]}) == []
    bad = [
        BombRun("seed", "cgguard", 1, detected=False, survivors=40),
        BombRun("shared", "cgguard", 1, detected=True, removed=True, survivors=0, innocents=3, innocents_alive=1),
        BombRun("classic", "pids.max", 1, detected=None, survivors=900),  # a baseline failing is the point
    ]
    fk = BenignRun("make", "cgguard", exit_code=-9, killed=True, false_kill=True)
    problems = correctness({"errors": [], "bomb_runs": bad, "benign_runs": [fk]})
    assert any("seed" in p and "not detected" in p for p in problems)
    assert any("2 innocents killed" in p for p in problems)
    assert any("make" in p for p in problems)
    assert not any("pids.max" in p or "900" in p for p in problems)
    assert median([None, 3.0, 1.0, 2.0]) == 2.0 and median([None]) is None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_bench_on_one_bomb_and_one_benign_workload(cgfs, tmp_path):
    out = tmp_path / "results"
    rc = main(argparse.Namespace(quick=True, out=str(out), only=["classic", "sleepers"], runs=1))
    data = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    assert rc == 0, data.get("problems") or data.get("notes")

    runs = {(r["workload"], r["method"]): r for r in data["bomb_runs"]}
    cg = runs[("classic", "cgguard")]
    assert cg["detected"] is True and cg["removed"] is True, cg
    assert cg["survivors"] == 0
    assert 0 < cg["start_to_verdict_ms"] <= cg["start_to_gone_ms"] < 10_000
    assert cg["peak_v1"] >= 2  # measured from the kernel, not assumed

    # The baselines really ran on the same bomb: the cap alone holds it, the threshold removes it.
    cap = runs[("classic", "pids.max")]
    assert cap["removed"] is False and cap["tasks_held"] > 64 and cap["survivors"] > 64
    assert runs[("classic", "threshold")]["detected"] is True
    assert ("classic", "naive-killer") in runs

    benign = [r for r in data["benign_runs"] if r["workload"] == "sleepers"]
    assert len(benign) == 1 and benign[0]["method"] == "cgguard"
    assert benign[0]["false_kill"] is False and benign[0]["exit_code"] == 0 and benign[0]["incidents"] == 0
    assert benign[0]["peak_v1"] >= 300  # its 300 children were really there and counted

    assert "| classic (run 1) | yes |" in md and "| sleepers |" in md and "## Targets" in md
    assert data["machine"]["cores"] == os.cpu_count() and data["machine"]["kernel"]
    assert data["classic_series"]["classic/cgguard/1"], "no samples for the plot"
    try:
        import matplotlib  # noqa: F401

        assert (out / "tasks.png").stat().st_size > 10_000
    except ImportError:
        assert any("matplotlib" in n for n in data["notes"])

    # Nothing of this run may outlive it, in either hierarchy.
    mine = f"cgguard-bench-{os.getpid()}-"
    assert not [d for d in os.listdir(cgfs.root) if d.startswith(mine)]
    if os.path.isdir(V1_PIDS):
        assert not [d for d in os.listdir(V1_PIDS) if d.startswith(mine)]


def test_a_bomb_that_ends_by_itself_or_never_grows_proves_nothing():
    from cgguard.bench.runner import by_itself, stalled
    from cgguard.testkit.corpus import WORKLOADS

    classic = WORKLOADS["classic"]  # lives 5-6 s
    assert not by_itself(classic, 0.2) and by_itself(classic, 5.5) and not by_itself(classic, None)
    assert stalled(BombRun("slow", "threshold", 1, detected=False, peak_v1=2))
    assert not stalled(BombRun("slow", "threshold", 1, detected=False, peak_v1=900))
    assert not stalled(BombRun("classic", "cgguard", 1, detected=True, peak_v1=3))
