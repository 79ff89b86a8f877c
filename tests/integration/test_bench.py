"""``cgguard bench``: a real, small run of the whole machinery (contained bombs, real agent)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from cgguard.bench import main
from cgguard.testkit.sandbox import V1_PIDS


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


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_generated_shapes_in_both_arenas(cgfs, tmp_path):
    """A few generated shapes through both host arenas: labels, limits and outcomes as built."""
    from cgguard.bench import generated
    from cgguard.testkit.sandbox import Sandbox
    from cgguard.testkit.shapes import generate

    family = generate()
    pick = [
        next(s for s in family if s.kind == "bash" and s.label == "benign" and s.wait and s.peak_bound() >= 20),
        next(s for s in family if s.kind == "py-thread" and s.label == "benign" and not s.wait),
        next(s for s in family if s.kind == "bash" and s.label == "bomb" and not s.wait and s.topology == "tree"),
        next(s for s in family if s.kind == "py-thread" and s.label == "bomb" and s.wait),
    ]
    logs: list[str] = []
    sb = Sandbox.create(cgfs, prefix="cgguard-bench", cap=1024)
    try:
        if sb.mode != "v1-pids":
            reason = f"the host arenas need a v1 pids hierarchy (sandbox mode {sb.mode})"
            print(reason)
            pytest.skip(reason)
        errors: list[str] = []
        arenas = generated.run_host(cgfs, sb, str(tmp_path), pick, 256, logs.append, lambda need: True, errors)
    finally:
        left = sb.close()
    assert not left and not errors, (left, errors, logs)
    assert [(a["arena"], a["limited"]) for a in arenas] == [("hybrid/with", True), ("hybrid/without", False)]
    for a in arenas:
        runs = {r.shape: r for r in a["runs"]}
        assert set(runs) == {s.name for s in pick}, logs
        for s in pick:
            r = runs[s.name]
            if s.label == "benign":
                assert r.outcome == "TN", (r, logs)
                assert r.leaves_done == r.leaves_expected == s.leaves()
                # The kernel's count of the cap group, never above what the parameters allow.
                assert 2 <= r.peak <= s.peak_bound() < 128
            else:
                assert r.outcome == "TP", (r, logs)
                assert r.start_to_verdict_ms < r.start_to_gone_ms < r.deadline_s * 1000
                # The arena decides which budget the agent measures against.
                if a["limited"]:
                    assert r.budget_source is None or r.budget_source.startswith("v1:") or r.evidence == "lineage"
                else:
                    assert r.budget_source in ("default", None) or r.evidence == "lineage"
                    assert r.budget_seen in (256, None)
        assert generated.arena_summary(a)["confusion"] == {"TP": 2, "FN": 0, "FP": 0, "TN": 2, "ERR": 0}
