"""Policy: what the agent does with a verdict (``decide``), and the kill budgets.

Pure: verdicts and contexts are built here, the budgets' clock is injected. Fail safe: a runaway
past a kill budget is frozen, never left growing; a lineage only partly known never spares anyone.
"""

from __future__ import annotations

import itertools

import pytest

from cgguard.agent.policy import Budgets, Context, Decision, KillBudget, decide
from cgguard.config import Action
from cgguard.detect import Origin, Reason, Verdict

MS = 1_000_000


def cgroup_verdict(evidence: str = "trajectory", tasks: int = 600) -> Verdict:
    detector = {"trajectory": "trajectory", "budget": "pinned"}[evidence]
    return Verdict(
        cgroup="kubepods/pod1/c1",
        detector=detector,
        reasons=(Reason("growing-toward-budget" if evidence == "trajectory" else "pinned-at-limit", "grew", {"tasks": tasks}),),
        tasks=tasks,
        first_sign_ns=1 * MS,
        at_ns=300 * MS,
        evidence=evidence,
        budget=1024,
        budget_source="v2:kubepods/pod1",
    )


def lineage_verdict(family: int = 40, complete: bool = True, tasks: int | None = None, first_pid: int = 1000) -> Verdict:
    members = frozenset((first_pid + i, 10_000 + i) for i in range(family))
    return Verdict(
        cgroup="kubepods/pod1/c1",
        detector="lineage",
        reasons=(Reason("abandoning-generations", "5 generations", {"generations": 5}),),
        tasks=family if tasks is None else tasks,
        first_sign_ns=2 * MS,
        at_ns=50 * MS,
        evidence="lineage",
        complete=complete,
        origin=Origin(first_pid, 10_000, "bash", "bash -c bomb", True),
        members=members,
        family=family,
        depth=5,
        origin_ref=object(),
    )


def ctx(configured: Action = Action.auto, **kw) -> Context:
    return Context(configured=configured, **kw)


# -- not acting ------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [cgroup_verdict(), cgroup_verdict("budget"), lineage_verdict()])
def test_refusal_reports_and_refuses(v):
    d = decide(v, ctx(refusal="protected by --protect", exhausted="node", escalate="missed members"))
    assert (d.action, d.result, d.unremoved) == (Action.report, "refused", "protected")
    assert not d.acts and not d.kills
    assert d.notes == ("not acting: protected by --protect",)
    assert d.verdict is v


@pytest.mark.parametrize("v", [cgroup_verdict(), cgroup_verdict("budget"), lineage_verdict()])
def test_exempt_origin_is_allowed(v):
    d = decide(v, ctx(allowed="allow rule (exempt: comm~'make' in **)", exhausted="tenant"))
    assert (d.action, d.result, d.unremoved) == (Action.report, "allowed", "allowed")
    assert "allow rule (exempt" in d.notes[0]


def test_relaxed_origin_spares_lineage_evidence_only():
    relaxed = "allow rule (relax: exe~'/usr/bin/make' in **)"
    d = decide(lineage_verdict(), ctx(relaxed=relaxed))
    assert (d.action, d.result, d.unremoved) == (Action.report, "allowed", "allowed")
    assert relaxed in d.notes[0] and "budget rules still apply" in d.notes[0]
    # Budget and trajectory evidence still protect the node.
    for v in (cgroup_verdict("budget"), cgroup_verdict("trajectory")):
        d = decide(v, ctx(relaxed=relaxed))
        assert d.acts and d.action == Action.kill_cgroup and d.unremoved is None


@pytest.mark.parametrize("configured", list(Action))
def test_dry_run_only_reports(configured):
    for v in (cgroup_verdict(), lineage_verdict()):
        d = decide(v, ctx(configured, dry_run=True, exhausted="tenant"))
        assert (d.action, d.result, d.unremoved) == (Action.report, "reported", "dry-run")
        assert d.notes == ("dry run: reporting only",)


def test_configured_report_only_reports():
    d = decide(cgroup_verdict(), ctx(Action.report, worst_lineage=lineage_verdict()))
    assert (d.action, d.result, d.unremoved) == (Action.report, "reported", "report-only")
    assert d.notes and "report" in d.notes[0]


# -- kill budgets spent: freeze, never leave it growing --------------------------------------
@pytest.mark.parametrize("who, words", [("tenant", "this tenant's"), ("node", "the node's")])
@pytest.mark.parametrize("configured", [Action.auto, Action.kill_cgroup, Action.kill_lineage])
def test_spent_budget_freezes(who, words, configured):
    text = "5 per 60s for pod:abc, 50 per node"
    for v in (cgroup_verdict(), cgroup_verdict("budget"), lineage_verdict(), lineage_verdict(complete=False)):
        d = decide(v, ctx(configured, exhausted=who, budget_text=text, escalate="x", worst_lineage=lineage_verdict()))
        assert d.action == Action.freeze and d.acts and not d.kills
        assert d.unremoved == "budget"
        assert words in d.notes[0] and text in d.notes[0] and "frozen" in d.notes[0]


def test_configured_freeze_stays_freeze_with_or_without_budget():
    for exhausted in (None, "tenant", "node"):
        d = decide(lineage_verdict(), ctx(Action.freeze, exhausted=exhausted, escalate="x", family_is_whole=True))
        assert d.action == Action.freeze and not d.kills


# -- which kill ------------------------------------------------------------------------------
@pytest.mark.parametrize("configured", [Action.auto, Action.kill_lineage])
def test_escalation_removes_the_whole_cgroup(configured):
    d = decide(lineage_verdict(), ctx(configured, escalate="a surgical kill left 12 members"))
    assert d.action == Action.kill_cgroup
    assert d.notes == ("a surgical kill left 12 members: removing the whole cgroup",)


def test_auto_complete_lineage_kills_the_lineage():
    v = lineage_verdict()
    d = decide(v, ctx())
    assert d.action == Action.kill_lineage and d.kills
    assert d.verdict.members == v.members and d.notes == ()


def test_auto_complete_lineage_that_is_the_whole_cgroup_kills_the_cgroup():
    d = decide(lineage_verdict(), ctx(family_is_whole=True))
    assert d.action == Action.kill_cgroup
    assert any("whole cgroup" in n for n in d.notes)
    # Configured kill-lineage is honored even then.
    assert decide(lineage_verdict(), ctx(Action.kill_lineage, family_is_whole=True)).action == Action.kill_lineage


def test_auto_incomplete_lineage_kills_the_cgroup():
    d = decide(lineage_verdict(complete=False), ctx())
    assert d.action == Action.kill_cgroup
    assert any("partly known" in n for n in d.notes)


def test_auto_cgroup_verdict_with_a_dominant_complete_lineage_goes_surgical():
    v = cgroup_verdict(tasks=600)
    lin = lineage_verdict(family=300, tasks=600)  # exactly half still counts
    d = decide(v, ctx(worst_lineage=lin))
    assert d.action == Action.kill_lineage
    e = d.verdict
    assert e.members == lin.members and e.family == 300 and e.origin == lin.origin and e.depth == lin.depth
    assert e.origin_ref is lin.origin_ref and e.complete
    assert e.reasons == v.reasons + lin.reasons  # the cgroup rule first, then the lineage's
    assert (e.detector, e.evidence, e.tasks, e.cgroup) == (v.detector, v.evidence, v.tasks, v.cgroup)
    assert any("300 of 600" in n for n in d.notes)


def test_auto_cgroup_verdict_with_a_minor_lineage_kills_the_cgroup():
    d = decide(cgroup_verdict(tasks=600), ctx(worst_lineage=lineage_verdict(family=299)))
    assert d.action == Action.kill_cgroup and d.verdict.members is None


def test_auto_cgroup_verdict_with_an_incomplete_lineage_kills_the_cgroup():
    d = decide(cgroup_verdict(tasks=600), ctx(worst_lineage=lineage_verdict(family=590, complete=False)))
    assert d.action == Action.kill_cgroup and d.verdict.members is None
    assert any("partly known" in n for n in d.notes)


def test_auto_cgroup_verdict_with_a_dominant_lineage_that_is_the_whole_cgroup():
    d = decide(cgroup_verdict(tasks=600), ctx(worst_lineage=lineage_verdict(family=600), family_is_whole=True))
    assert d.action == Action.kill_cgroup


def test_auto_cgroup_verdict_without_lineage_kills_the_cgroup():
    d = decide(cgroup_verdict(), ctx())
    assert d.action == Action.kill_cgroup and d.notes == ()


@pytest.mark.parametrize("worst", [None, lineage_verdict(complete=False)])
def test_kill_lineage_without_a_whole_lineage_kills_the_cgroup(worst):
    d = decide(cgroup_verdict(), ctx(Action.kill_lineage, worst_lineage=worst))
    assert d.action == Action.kill_cgroup
    assert any("no lineage known whole" in n for n in d.notes)


def test_kill_lineage_of_a_cgroup_verdict_takes_the_known_lineage():
    lin = lineage_verdict(family=10, tasks=600)  # even a minor one: the operator asked for surgery
    d = decide(cgroup_verdict(tasks=600), ctx(Action.kill_lineage, worst_lineage=lin))
    assert d.action == Action.kill_lineage and d.verdict.members == lin.members


def test_configured_kill_cgroup_is_kept():
    for v in (lineage_verdict(), cgroup_verdict()):
        d = decide(v, ctx(Action.kill_cgroup, worst_lineage=lineage_verdict()))
        assert d.action == Action.kill_cgroup


# -- invariants over every combination -------------------------------------------------------
VERDICTS = {
    "trajectory": cgroup_verdict("trajectory"),
    "budget": cgroup_verdict("budget"),
    "lineage": lineage_verdict(),
    "lineage-partial": lineage_verdict(complete=False),
}
WORST = {"none": None, "whole": lineage_verdict(family=400, tasks=600), "partial": lineage_verdict(family=400, complete=False), "minor": lineage_verdict(family=5)}


def combos():
    for (vn, v), configured, refusal, allowed, relaxed, dry, exhausted, escalate, (wn, worst), whole in itertools.product(
        VERDICTS.items(), list(Action), (None, "protected"), (None, "exempt rule"), (None, "relax rule"), (False, True),
        (None, "tenant", "node"), (None, "missed"), WORST.items(), (False, True),
    ):
        c = Context(configured, refusal, dry, exhausted, "5 per 60s", worst, escalate, allowed, relaxed, whole)
        yield f"{vn}/{configured.value}/{refusal}/{allowed}/{relaxed}/{dry}/{exhausted}/{escalate}/{wn}/{whole}", v, c


def test_invariants_over_all_contexts():
    n = 0
    for name, v, c in combos():
        n += 1
        d = decide(v, c)
        assert isinstance(d, Decision), name
        assert d.action != Action.auto, name
        # Why it does not remove the runaway is always said, and counted.
        if d.action == Action.report:
            assert d.notes and d.unremoved and d.result, name
        else:
            assert d.result is None, name
        # Nothing acts on a refused, exempt, dry-run or report-only target.
        if c.refusal or c.allowed or c.dry_run or c.configured == Action.report:
            assert d.action == Action.report, name
        # A spent budget never kills, and never leaves a runaway growing unless told to report.
        if c.exhausted:
            assert not d.kills, name
            if d.action != Action.report:
                assert d.action == Action.freeze, name
                if c.configured != Action.freeze:
                    assert d.unremoved == "budget" and d.notes, name
        # A surgical kill always has members to kill; under auto only a lineage known whole.
        if d.action == Action.kill_lineage:
            assert d.verdict.members, name
            if c.configured == Action.auto:
                assert d.verdict.complete and not c.family_is_whole and not c.escalate, name
        if d.kills and c.configured == Action.auto and (v.complete is False or (c.worst_lineage is not None and not c.worst_lineage.complete and not v.members)):
            assert d.action == Action.kill_cgroup, name
        if d.action == Action.freeze and d.unremoved is None:
            assert c.configured == Action.freeze, name
    assert n > 10_000


# -- kill budgets ----------------------------------------------------------------------------
class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_kill_budget_sliding_window():
    clk = Clock()
    b = KillBudget(2, 60.0, clk)
    assert b.available() and b.idle()
    b.take()
    clk.t += 10
    b.take()
    assert not b.available() and not b.idle()
    clk.t += 49.9  # the first kill is 59.9 s old
    assert not b.available()
    clk.t += 0.1  # 60 s: it leaves the window
    assert b.available()
    b.take()
    assert not b.available()
    clk.t += 70
    assert b.available() and b.idle()


def test_tenants_are_isolated():
    clk = Clock()
    b = Budgets(per_tenant=3, node=100, per_seconds=60, clock=clk)
    for _ in range(3):
        assert b.exhausted("pod:a") is None
        b.take("pod:a")
    assert b.exhausted("pod:a") == "tenant"
    # Tenant B's budget is whole.
    for _ in range(3):
        assert b.exhausted("pod:b") is None
        b.take("pod:b")
    assert b.exhausted("pod:b") == "tenant"
    assert b.exhausted("user:1000") is None


def test_node_budget_caps_all_tenants_together():
    clk = Clock()
    b = Budgets(per_tenant=5, node=4, per_seconds=30, clock=clk)
    for t in ("a", "b", "c", "d"):
        assert b.exhausted(t) is None
        b.take(t)
    assert b.exhausted("e") == "node"
    assert b.exhausted("a") == "node"
    clk.t += 30
    assert b.exhausted("e") is None


def test_tenant_spent_is_reported_before_node():
    clk = Clock()
    b = Budgets(per_tenant=1, node=1, per_seconds=30, clock=clk)
    b.take("a")
    assert b.exhausted("a") == "tenant"
    assert b.exhausted("b") == "node"


def test_budget_windows_expire_with_the_clock():
    clk = Clock()
    b = Budgets(per_tenant=2, node=3, per_seconds=60, clock=clk)
    b.take("a")
    clk.t += 30
    b.take("a")
    b.take("b")
    assert b.exhausted("a") == "tenant" and b.exhausted("c") == "node"
    clk.t += 30  # the first kill of "a" is 60 s old
    assert b.exhausted("a") is None and b.exhausted("c") is None
    clk.t += 30
    assert all(b.exhausted(t) is None for t in "abc")
    assert b.node.idle()


def test_tenants_table_stays_bounded():
    clk = Clock()
    b = Budgets(per_tenant=2, node=100_000, per_seconds=60, clock=clk)
    b.take("busy")
    b.take("busy")
    for i in range(20_000):
        b.exhausted(f"pod:{i}")  # a tenant looked up once (a verdict it got refused, say)
        if i % 1000 == 0:
            b.take(f"pod:{i}")  # some kill
    assert len(b.tenants) <= 4097 + 1
    # Tenants with recent kills are kept: their spending is not forgotten.
    assert b.exhausted("busy") == "tenant"
    kept = [k for k in b.tenants if k.startswith("pod:") and int(k[4:]) % 1000 == 0]
    assert len(kept) == 20
    # Once idle (the window passed), they go too.
    clk.t += 61
    for i in range(5000):
        b.exhausted(f"later:{i}")
    assert "busy" not in b.tenants
    assert b.exhausted("busy") is None
