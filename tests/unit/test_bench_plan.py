"""``cgguard bench``: a real, small run of the whole machinery (contained bombs, real agent)."""

from __future__ import annotations

import argparse

import pytest

from cgguard.bench import PlanError, correctness, main, make_plan
from cgguard.bench.runner import BenignRun, BombRun, median


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


def test_a_bomb_that_ends_by_itself_or_never_grows_proves_nothing():
    from cgguard.bench.runner import by_itself, stalled
    from cgguard.testkit.corpus import WORKLOADS

    classic = WORKLOADS["classic"]  # lives 5-6 s
    assert not by_itself(classic, 0.2) and by_itself(classic, 5.5) and not by_itself(classic, None)
    assert stalled(BombRun("slow", "threshold", 1, detected=False, peak_v1=2))
    assert not stalled(BombRun("slow", "threshold", 1, detected=False, peak_v1=900))
    assert not stalled(BombRun("classic", "cgguard", 1, detected=True, peak_v1=3))


def test_plan_of_the_generated_shapes_and_targets():
    from cgguard.testkit import shapes

    full = make_plan(False, None)
    assert full.targets and len(full.shapes) == shapes.DEFAULT_COUNT >= 100
    assert full.shapes == shapes.generate(shapes.DEFAULT_SEED, shapes.DEFAULT_COUNT, full.shape_budget)
    quick = make_plan(True, None)
    assert len(quick.shapes) == 16 and quick.budget_s < full.budget_s
    # --shapes: nothing but the shapes; --only without "shapes" or "targets": neither.
    only_shapes = make_plan(False, None, shapes_only=True)
    assert only_shapes.shapes and not (only_shapes.bombs or only_shapes.benign or only_shapes.cost
                                       or only_shapes.events or only_shapes.targets or only_shapes.baseline_bombs)
    named = make_plan(True, ["classic", "sleepers"])
    assert not named.shapes and not named.targets and not named.guest
    assert make_plan(True, ["targets"]).targets and not make_plan(True, ["targets"]).shapes
    # Another seed, another family; --shape picks by name, and names nothing it does not know.
    assert make_plan(True, ["shapes"], seed=1, count=100).shapes != full.shapes[:100]
    one = make_plan(False, None, shapes_only=True, shape_names=["s027"])
    assert [s.name[:4] for s in one.shapes] == ["s027"] and one.shape_names == ["s027"]
    with pytest.raises(PlanError, match="s999"):
        make_plan(False, None, shapes_only=True, shape_names=["s999"])
    g = make_plan(True, None, shapes_only=True, guest=True)
    assert g.guest and g.guest_budget_s > 300


def test_correctness_fails_on_every_shape_miss_false_kill_and_parent_action():
    from cgguard.bench.generated import ShapeRun
    from cgguard.bench.targets import TargetRun

    def run(outcome, **kw):
        return ShapeRun("s001-x", "bomb" if outcome in ("TP", "FN") else "benign", "bash", "tree", "hybrid", True, 256,
                        "", outcome=outcome, **kw)

    ok = {"errors": [], "bomb_runs": [], "benign_runs": [],
          "shape_arenas": [{"arena": "hybrid/with", "runs": [run("TP"), run("TN")]}]}
    assert correctness(ok) == []
    bad = {**ok, "shape_arenas": [{"arena": "v2/without", "runs": [
        run("FN", notes=["no incident"]), run("FP", incident_log=["lineage -> kill-cgroup"]), run("ERR", notes=["0 of 4"]),
        run("TP", parent_actions=1)]}],
        "target_runs": [TargetRun("predating", "c-fork", "cgguard", 256, removed=False),
                        TargetRun("pinned", "c-fork", "threshold", 256, removed=False)]}
    problems = correctness(bad)
    assert any("missed bomb" in p and "v2/without" in p for p in problems)
    assert any("false kill" in p for p in problems)
    assert any("0 of 4" in p for p in problems)
    assert any("parent" in p for p in problems)
    assert any("predating c-fork" in p for p in problems)
    assert not any("threshold" in p for p in problems)  # a baseline failing is the point
    assert len(problems) == 5
