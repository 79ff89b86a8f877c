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
