"""The record tree on synthetic event streams (tests/lineage_sim.py); real processes are in
tests/integration/test_lineage_live.py."""

from __future__ import annotations


import pytest

from cgguard.agent.status import tree_json
from cgguard.state.lineage import FORGOTTEN, FREED, nr_processes, read_vmstat
from lineage_sim import MS, S, FakeProcess, Sim, consistent

def test_fork_of_known_parent_inherits_and_links():
    sim = Sim()
    sh = sim.start("bash", "bash -l")
    kid = sim.fork(sh)
    t = sim.tree
    r, p = t.get(kid), t.get(sh)
    assert r.parent is p and r.depth == p.depth + 1
    assert (r.comm, r.cmdline, r.cgroup) == ("bash", "bash -l", "sim")
    assert r.exec_ns is None and r.cloned() and r.cdepth == p.cdepth + 1
    assert p.nforks == 1 and p.last_fork_ns == r.start_ns
    assert r.identity == (kid, r.start_ns)
    consistent(t)


def test_no_proc_reads_on_forks_of_known_parents():
    sim = Sim()
    sh = sim.start("bash", "bash")
    before = sim.proc.reads
    frontier = [sh]
    for _ in range(8):
        frontier = [sim.fork(p) for p in frontier for _ in range(2)]
    assert sim.proc.reads == before
    assert sim.tree.stats.live == 1 + 2 + 4 + 8 + 16 + 32 + 64 + 128 + 256


def test_exec_rereads_comm_cmdline_and_cgroup():
    sim = Sim()
    sh = sim.start("bash", "bash")
    kid = sim.fork(sh)
    sim.procs[kid].cgroup = "sim/job"  # moved between fork and exec
    sim.exec(kid, "make", "make -j8")
    r = sim.tree.get(kid)
    assert (r.comm, r.cmdline, r.cgroup) == ("make", "make -j8", "sim/job")
    assert r.exec_ns is not None and not r.cloned() and r.cdepth == 0
    assert [x.tgid for x in sim.tree.records_in("sim/job")] == [kid]
    assert {x.tgid for x in sim.tree.records_in("sim")} == {sh, kid}
    assert [x.tgid for x in sim.tree.records_in("sim", subtree=False)] == [sh]
    consistent(sim.tree)


def test_exec_into_the_same_program_counts_as_a_clone():
    sim = Sim()
    a = sim.start("bomb.sh", "bash ./bomb.sh")
    b = sim.fork(a)
    sim.exec(b, "bomb.sh", "bash ./bomb.sh")
    assert sim.tree.get(b).cloned() and sim.tree.get(b).cdepth == 1
    c = sim.fork(a)
    sim.exec(c, "make", "make -C sub")
    assert not sim.tree.get(c).cloned()


def test_exec_out_of_scope_stops_tracking():
    sim = Sim()
    sh = sim.start("bash", "bash")
    kid = sim.fork(sh)
    sim.procs[kid].cgroup = "elsewhere"
    sim.exec(kid, "sleep", "sleep 1")
    assert sim.tree.get(kid) is None
    sim.fork(kid)  # its children are outside too and cost no /proc read
    reads = sim.proc.reads
    sim.fork(kid)
    assert sim.proc.reads == reads
    consistent(sim.tree)


def test_exec_storm_beyond_budget_reads_lazily():
    sim = Sim(tree_kwargs={"exec_reads_per_s": 10})
    sh = sim.start("bash", "bash")
    kids = [sim.spawn(sh, "true", "true", dt=1000) for _ in range(50)]
    t = sim.tree
    assert t.stats.exec_reads_skipped >= 30
    lazy = [t.get(k) for k in kids if t.get(k).comm is None]
    assert lazy, "some execs must have been left for later"
    assert t.describe(lazy[0]) == ("true", "true")


def test_exit_frees_childless_and_keeps_placeholders():
    sim = Sim()
    sh = sim.start("bash", "bash")
    a = sim.fork(sh)
    b = sim.fork(a)
    t = sim.tree
    ra = t.get(a)
    sim.exit(a)
    assert not ra.alive and ra.exit_ns is not None and t.stats.placeholders == 1
    assert list(ra.children())[0].tgid == b
    sim.exit(b)
    # b freed, then its parent placeholder a became childless and is freed too.
    assert t.stats.records == 1 and t.stats.placeholders == 0
    assert ra.flags & FREED
    consistent(t)


def test_pid_reuse_never_merges_identities():
    sim = Sim()
    sh = sim.start("bash", "bash")
    a = sim.fork(sh)
    b = sim.fork(a)  # keeps a as a placeholder once a is gone
    old = sim.tree.get(a)
    # a's exit event is lost; then the kernel hands pid a to a new child of sh.
    sim.deliver = False
    sim.exit(a)
    sim.deliver = True
    sim.tick(5 * MS)
    sim.procs[a] = FakeProcess(a, sh, sim.t, "bash", "bash", "sim")
    sim.tree.on_fork(sim.t, sh, sh, a, a)
    new = sim.tree.get(a)
    assert new is not old and new.start_ns != old.start_ns
    assert not old.alive and old.exit_ns is not None
    assert [c.tgid for c in old.children()] == [b], "the old identity keeps its own children"
    assert new.first_child is None
    assert sim.tree.stats.pid_reuse == 1
    assert {r.identity for r in sim.tree.records_in("sim") if r.alive} == {
        sim.tree.get(sh).identity,
        new.identity,
        sim.tree.get(b).identity,
    }
    consistent(sim.tree)


def test_pid_reuse_seen_at_exec_by_start_time():
    sim = Sim()
    sh = sim.start("bash", "bash")
    a = sim.fork(sh)
    old = sim.tree.get(a)
    # Both a's exit and the fork of a new process with the same pid were lost.
    del sim.procs[a]
    sim.tick(S)
    sim.procs[a] = FakeProcess(a, sh, sim.t, "bash", "bash", "sim")
    sim.exec(a, "sleep", "sleep 9")
    new = sim.tree.get(a)
    assert new is not old and new.comm == "sleep" and old.flags & FREED
    assert sim.tree.stats.pid_reuse == 1


def test_threads_are_counted_not_recorded():
    sim = Sim()
    py = sim.start("python3", "python3 app.py")
    tids = [sim.thread(py) for _ in range(5)]
    r = sim.tree.get(py)
    assert r.threads == 6 and r.nforks == 0 and sim.tree.stats.records == 1
    for tid in tids[:2]:
        sim.thread_exit(py, tid)
    assert r.threads == 4


def test_unknown_parent_in_scope_gets_a_record_once():
    sim = Sim()
    # A shell that was in the cgroup before the tree started listening.
    sh = sim._new(sim.outside, "bash", "bash -i", "sim")
    kid = sim.fork(sh)
    t = sim.tree
    p = t.get(sh)
    assert p is not None and p.comm == "bash" and p.cmdline == "bash -i"
    assert t.get(kid).parent is p
    reads = sim.proc.reads
    sim.fork(sh)
    assert sim.proc.reads == reads


def test_storm_outside_scope_costs_one_lookup():
    sim = Sim()
    out = sim._new(sim.outside, "bash", "bash", "user.slice")
    frontier = [out]
    for _ in range(8):
        frontier = [sim.fork(p) for p in frontier for _ in range(2)]
    assert sim.tree.stats.records == 0
    assert sim.proc.reads == 0  # only cgroup_of(out), which is not a /proc stat read
    assert sim.tree.stats.negative_cache > 0


def test_parent_gone_child_becomes_root():
    sim = Sim()
    sh = sim._new(sim.outside, "bash", "bash", "sim")
    sim.deliver = False
    kid = sim.fork(sh)
    sim.exit(sh)
    sim.deliver = True
    gk = sim.fork(kid)
    r = sim.tree.get(kid)
    assert r is not None and r.parent is None and sim.tree.get(gk).parent is r
    assert sim.tree.describe(r) == ("bash", "bash")


def test_tracking_disabled_makes_no_records_but_keeps_existing():
    sim = Sim()
    sh = sim.start("bash", "bash")
    a = sim.fork(sh)
    sim.tree.tracking_enabled = False
    b = sim.fork(sh)
    assert sim.tree.get(b) is None
    sim.exit(a)
    assert sim.tree.get(a) is None
    sim.tree.tracking_enabled = True
    c = sim.fork(sh)
    assert sim.tree.get(c).parent is sim.tree.get(sh)


# -- aging (the seed's reset_mm_tracking) --------------------------------------------------
def aged_sim() -> tuple[Sim, dict[str, int]]:
    sim = Sim()
    old = sim.start("bash", "bash")
    a = sim.fork(old)
    a1 = sim.fork(a)
    sim.exit(a)  # a is a placeholder for a1
    sim.tick(40 * S)
    young = sim.fork(old)
    return sim, {"old": old, "a": a, "a1": a1, "young": young}


def test_aging_forgets_only_when_calm():
    sim, p = aged_sim()
    t = sim.tree
    # First run: nr_processes went up from 0 -> remember, do not forget (as the seed).
    assert t.age() == 0
    assert t.stats.aging_runs == 1
    # Calm now: forget records older than the interval.
    n = t.age()
    assert n > 0
    assert t.get(p["a1"]) is None, "a live old process is detached"
    assert t.get(p["young"]) is not None
    ro = [r for r in t.records_in("sim") if r.tgid == p["old"]][0]
    # The old shell has a young child: it stays as a placeholder (mm = NULL), detached.
    assert not ro.alive and ro.flags & FORGOTTEN
    assert [c.tgid for c in ro.children()] == [p["young"]]
    assert t.stats.forgotten_total == n
    consistent(t)
    # A forgotten process that forks again is an unknown parent: a fresh record.
    kid = sim.fork(p["a1"])
    assert t.get(p["a1"]) is not None and t.get(kid).parent is t.get(p["a1"])
    assert t.get(p["a1"]).flags & FORGOTTEN == 0


@pytest.mark.parametrize(
    "change",
    [
        lambda sim: sim._new(sim.outside, "x", "x", "elsewhere"),  # more processes
        lambda sim: sim.vm.__setitem__("pageoutrun", 5),  # kswapd ran
        lambda sim: sim.vm.__setitem__("allocstall_normal", 1),  # an allocation stalled
    ],
)
def test_aging_keeps_everything_while_not_calm(change):
    sim, p = aged_sim()
    t = sim.tree
    t.age()
    change(sim)
    assert t.age() == 0
    assert t.get(p["a1"]) is not None and t.stats.forgotten_total == 0
    # The values were remembered: the next calm run forgets.
    assert t.age() > 0


def test_aging_uses_the_current_interval_and_frees_placeholders_bottom_up():
    sim, p = aged_sim()
    t = sim.tree
    t.age()
    sim.exit(p["young"])
    t.reset_interval_ns = 100 * S  # nothing is that old
    assert t.age() == 0
    t.reset_interval_ns = 1 * S
    n = t.age()
    # a1 (live, childless) freed -> placeholder a childless -> freed; old detached and freed.
    assert t.stats.records == 0 and n == 3
    consistent(t)


def test_aging_clears_incomplete_marks():
    sim, _ = aged_sim()
    sim.tree.resync(["sim"])
    assert sim.tree.stats.incomplete == ("sim",)
    sim.tree.age()
    assert sim.tree.stats.incomplete == ()


def test_default_calm_sources_read_the_kernel():
    vm = read_vmstat()
    assert "pageoutrun" in vm and any(k.startswith("allocstall") for k in vm)
    assert nr_processes() > 1


# -- start-up and resync ---------------------------------------------------------------------
def test_load_from_proc_links_known_parents():
    sim = Sim()
    sim.deliver = False
    sh = sim.start("bash", "bash")
    a = sim.fork(sh)
    a1 = sim.fork(a)
    other = sim.spawn(sh, "sleep", "sleep 60")
    sim.deliver = True
    assert sim.tree.load_from_proc(["sim"]) == 4
    t = sim.tree
    assert t.get(a).parent is t.get(sh) and t.get(a1).parent is t.get(a)
    assert t.get(a).cloned() and not t.get(other).cloned()
    assert [r.tgid for r in t.roots("sim")] == [sh]
    # The FORK event of a process the scan already saw is not a pid reuse.
    sim.tree.on_fork(sim.procs[a1].start_ns + 2 * MS, a, a, a1, a1)
    assert t.stats.pid_reuse == 0
    consistent(t)


def test_resync_after_loss_restores_consistency():
    sim = Sim()
    sh = sim.start("bash", "bash")
    kids = [sim.fork(sh) for _ in range(5)]
    grand = sim.fork(kids[0])
    sim.tree.on_loss("enobufs")
    assert sim.tree.loss_pending
    sim.deliver = False
    sim.exit(kids[0])  # placeholder-to-be for grand
    sim.exit(kids[1])
    new = [sim.fork(kids[2]) for _ in range(3)]
    sim.deliver = True
    sim.tree.resync()
    t = sim.tree
    assert not t.loss_pending and t.stats.incomplete == ("sim",)
    live_fake = {(p.pid) for p in sim.procs.values() if p.cgroup == "sim"}
    live_tree = {r.tgid for r in t.records_in("sim") if r.alive}
    assert live_tree == live_fake
    assert t.get(grand).parent.tgid == kids[0] and not t.get(grand).parent.alive
    for n in new:
        assert t.get(n).parent is t.get(kids[2])
    consistent(t)


# -- queries -------------------------------------------------------------------------------
def test_queries_and_json():
    sim = Sim()
    sh = sim.start("bash", "bash -c work")
    a = sim.fork(sh)
    b = sim.fork(a)
    sim.exit(a)
    c = sim.spawn(sh, "sleep", "sleep 5")
    t = sim.tree
    rsh = t.get(sh)
    assert set(t.live_members(rsh)) == {t.get(x).identity for x in (sh, b, c)}
    doc = tree_json(t, "sim", badness=lambda pid: 7)
    (root,) = doc["forest"]
    assert root["pid"] == sh and root["family"] == 2 and root["depth"] == 0
    # seed score: own 7 + children's scores + 1 per live child
    assert root["score"] == 7 + (7 + 0) + 1 + (0 + 7 + 1)
    kids = {k["pid"]: k for k in root["children"]}
    assert kids[a]["placeholder"] and not kids[a]["alive"] and kids[a]["children"][0]["pid"] == b
    assert kids[c]["comm"] == "sleep"
    st = t.stats_dict()
    assert st["records"] == 4 and st["live"] == 3 and st["placeholders"] == 1
    assert t.take_activity() == {"sim"} and t.take_activity() == set()
