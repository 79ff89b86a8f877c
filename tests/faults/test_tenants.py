"""Kill budgets per tenant and per node, with hostile tenants.

A kill budget stops a detector gone wrong from emptying a node. It must not let one tenant
disarm the guard for the others (by spending a shared budget on its own bombs), and a bomb past
any budget must not be left running: it is frozen (it cannot fork, so it cannot grow) and
reported with a note saying which budget was spent.
"""

from faultkit import agents_fixture, classic, final_incident, wait_until  # noqa: F401 (fixture)


def _config(tmp_path, **kb) -> str:
    path = tmp_path / "cgguard.yaml"
    path.write_text("kill_budget: {" + ", ".join(f"{k}: {v}" for k, v in kb.items()) + "}\n")
    return str(path)


def _bomb(sandbox, cg):
    return sandbox.spawn(classic(6), cg, deadline_s=20, cap=300)


def _assert_frozen_not_running(agent, sandbox, cg, w, who):
    inc = final_incident(agent, cg)
    assert inc["action"] == "freeze" and inc["result"] == "frozen", inc
    assert any(f"{who} kill budget is spent" in n for n in inc["notes"]), inc["notes"]
    assert sandbox.fs.frozen(cg), "a runaway past its budget must be frozen"
    assert sandbox.live_pids(w), "frozen, not killed"
    return inc


def test_one_tenant_spending_its_budget_leaves_the_other_protected(tmp_path, sandbox, agents):
    """Tenant A (the tree SB/a) spends its two kills; a bomb of tenant B (SB/b) in the same
    window is still killed, and A's third bomb is frozen, never left running.

    Old agent: one kill budget for the whole node, and an exhausted budget meant "report only":
    B's bomb was reported and left running, and so was A's third.
    """
    cfg = _config(tmp_path, max_actions=2, per_seconds=600, node_max_actions=50)
    for sub in ("a/x1", "a/x2", "a/x3", "b/y"):
        sandbox.cgroup(sub)
    agent = agents([f"{sandbox.name}/a/**", f"{sandbox.name}/b/**"], "--config", cfg)
    a, b = f"{sandbox.name}/a", f"{sandbox.name}/b"
    for sub in ("x1", "x2"):
        cg = f"{a}/{sub}"
        w = _bomb(sandbox, cg)
        inc = final_incident(agent, cg)
        assert inc["action"] in ("kill-cgroup", "kill-lineage") and inc["result"] == "removed", inc
        assert inc["tenant"] == f"cgroup:{a}", inc
        wait_until(lambda w=w: not sandbox.live_pids(w), 15, f"no bomb process in {cg}")

    w_b = _bomb(sandbox, f"{b}/y")
    inc_b = final_incident(agent, f"{b}/y")
    assert inc_b["tenant"] == f"cgroup:{b}" and inc_b["result"] == "removed", inc_b
    assert inc_b["action"] in ("kill-cgroup", "kill-lineage")
    wait_until(lambda: not sandbox.live_pids(w_b), 15, "no bomb process of tenant B")

    w3 = _bomb(sandbox, f"{a}/x3")
    _assert_frozen_not_running(agent, sandbox, f"{a}/x3", w3, "this tenant's")
    before = sandbox.v1_current(w3)
    # Frozen means not growing: cgroup.events says frozen 1 for every task, so the count stands.
    assert sandbox.fs.frozen(f"{a}/x3") and sandbox.v1_current(w3) == before
    st = agent.status()
    assert st["incidents"]["not_removed"].get("budget") == 1, st["incidents"]
    sandbox.fs.kill(f"{a}/x3")


def test_node_budget_caps_all_tenants_together_and_freezes(tmp_path, sandbox, agents):
    """``node_max_actions: 2``: one kill in each of two tenants spends the node's budget; the
    next bomb (tenant B, with its own budget barely touched) is frozen with a note naming the
    node's budget.

    Old agent: past the budget it only reported; the third bomb ran on until its cap.
    """
    cfg = _config(tmp_path, max_actions=5, per_seconds=600, node_max_actions=2)
    for sub in ("a/x1", "b/y1", "b/y2"):
        sandbox.cgroup(sub)
    agent = agents([f"{sandbox.name}/a/**", f"{sandbox.name}/b/**"], "--config", cfg)
    for sub in ("a/x1", "b/y1"):
        cg = f"{sandbox.name}/{sub}"
        w = _bomb(sandbox, cg)
        inc = final_incident(agent, cg)
        assert inc["result"] == "removed" and inc["action"] in ("kill-cgroup", "kill-lineage"), inc
        wait_until(lambda w=w: not sandbox.live_pids(w), 15, f"no bomb process in {cg}")
    cg = f"{sandbox.name}/b/y2"
    w = _bomb(sandbox, cg)
    inc = _assert_frozen_not_running(agent, sandbox, cg, w, "the node's")
    assert inc["tenant"] == f"cgroup:{sandbox.name}/b"
    sandbox.fs.kill(cg)
