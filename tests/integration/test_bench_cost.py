"""cgguard bench --cost: the scenarios run against a real agent and report against the targets
(figures only; no speed is asserted)."""

from __future__ import annotations

from cgguard.bench import cost


def test_idle_and_classic_scenarios_report_their_figures(cgfs):
    out = cost.run(cgfs, quick=True, log=print, only=("idle", "classic"))
    assert out["notes"] == [], out["notes"]
    figs = out["figures"]
    assert figs["idle_rss_mib"] > 5
    assert out["runs"]["idle_rss_mib"]["fds"] > 3
    q = out["quiet_classic"]
    assert len(q["runs"]) == 3
    for r in q["runs"]:
        # every bomb was found and removed by the agent (lineage or budget, as it decides)
        assert "kill-cgroup: removed" in r["result"] or "not observed" in r["result"], r
        assert r["peak"] is not None and r["peak"] < 1024, r
    assert q["removed"] + q["not_observed"] == 3
    t = out["targets"]
    assert t["idle_rss_mib"]["value"] == figs["idle_rss_mib"] and t["idle_rss_mib"]["before"] == 48.9
    assert t["idle_rss_mib"]["met"] is (figs["idle_rss_mib"] <= 35)
    md = cost.markdown(out, "test machine")
    assert "| figure | before (issue) | target | measured | met |" in md
    assert "classic bomb verdict -> populated 0 ms (median)" in md
