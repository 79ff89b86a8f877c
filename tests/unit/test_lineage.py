"""The record tree on synthetic event streams (tests/lineage_sim.py); real processes are in
tests/integration/test_lineage_live.py."""

from __future__ import annotations

import pytest

from cgguard.agent.status import tree_json
from cgguard.state.lineage_aging import nr_processes, read_vmstat
from cgguard.state.lineage_proc import RESIGHT_EVERY
from cgguard.state.lineage_record import FORGOTTEN, FREED
from cgguard.state.lineage_walk import descends_from
from lineage_sim import MS, S, FakeProcess, Sim, consistent


# -- forks, execs, exits ---------------------------------------------------------------------
def test_fork_of_known_parent_links_and_counts():
    sim = Sim()
    sh = sim.start("bash", "bash -l")
    kid = sim.fork(sh)
    t = sim.tree
    r, p = t.get(kid), t.get(sh)
    assert r.parent is p and r.depth == p.depth + 1 and r.cgroup == "sim"
    assert r.exec_ns is None, "a fork runs its parent's image until it execs"
    assert p.nforks == 1 and p.nlive == 1 and p.last_fork_ns == r.start_ns
    assert r.identity == (kid, r.start_ns)
    assert t.describe(r) == ("bash", "bash -l")  # a clone answers with its parent's image
    consistent(t)


def test_forks_and_execs_read_nothing_from_proc():
    """The hot path: a binary tree of clones and a shell running 200 commands that never fork."""
    sim = Sim()
    sh = sim.start("bash", "bash")
    sim.tree.flush()
    before = sim.proc.reads
    frontier = [sh]
    for _ in range(6):
        frontier = [sim.fork(p) for p in frontier for _ in range(2)]
    for _ in range(200):
        c = sim.spawn(sh, "true", "/bin/true")
        sim.exit(c)
    sim.tree.flush()
    assert sim.proc.reads == before
    assert sim.tree.stats.live == 1 + 2 + 4 + 8 + 16 + 32 + 64


def test_image_is_read_when_an_execed_process_forks():
    sim = Sim()
    sh = sim.start("bash", "bash")
    kid = sim.fork(sh)
    sim.exec(kid, "make", "make -j8")
    t = sim.tree
    t.flush()
    r = t.get(kid)
    assert r.image is None, "exec reads nothing"
    sim.fork(kid)  # it forks: it may be a family's origin
    reads = sim.proc.reads
    t.flush()
    assert sim.proc.reads == reads + 1 and r.image == ("make", "make -j8")
    sim.fork(kid)
    t.flush()
    assert sim.proc.reads == reads + 1, "read once per image"


def test_image_reads_are_rate_limited_and_then_lazy():
    sim = Sim(tree_kwargs={"image_reads_per_s": 10})
    sh = sim.start("bash", "bash")
    forkers = []
    for _ in range(50):
        k = sim.spawn(sh, "sh", "sh -c job", dt=1000)
        sim.fork(k, dt=1000)
        forkers.append(k)
    t = sim.tree
    t.flush()
    assert t.stats.image_reads_skipped >= 30
    unread = [t.get(k) for k in forkers if t.get(k).image is None]
    assert unread, "an exec storm degrades to unnamed records"
    assert t.describe(unread[0]) == ("sh", "sh -c job")  # named on demand


def test_dead_origin_is_named_from_a_live_clone():
    sim = Sim()
    sh = sim.start("bash", "bash")
    bomb = sim.spawn(sh, "bash", "bash -c :(){ :|:& };:")
    kid = sim.fork(bomb)  # a clone: same image
    sim.exit(bomb)  # gone before anyone read its image
    r = sim.tree.get(kid).parent
    assert not r.alive and r.image is None
    assert sim.tree.describe(r) == ("bash", "bash -c :(){ :|:& };:")


def test_exit_frees_childless_and_keeps_placeholders():
    sim = Sim()
    sh = sim.start("bash", "bash")
    a = sim.fork(sh)
    b = sim.fork(a)
    t = sim.tree
    ra = t.get(a)
    sim.exit(a)
    assert not ra.alive and ra.exit_ns and t.stats.placeholders == 1
    assert list(ra.children())[0].tgid == b
    sim.exit(b)
    # b freed, then its parent placeholder a became childless and is freed too.
    assert t.stats.records == 1 and t.stats.placeholders == 0
    assert ra.flags & FREED
    consistent(t)


# -- abandonment ---------------------------------------------------------------------------
def test_a_parent_that_waits_abandons_nothing():
    sim = Sim()
    sh = sim.start("bash", "bash")
    kids = [sim.fork(sh) for _ in range(4)]
    for k in kids:
        sim.exit(k)
    sim.exit(sh)
    cg = sim.tree.cgstat("sim")
    assert not cg.abandons


def test_abandoning_generations_add_up_down_a_pipe_bomb():
    """f(){ f|f & }; f: each member forks two copies and exits at once."""
    sim = Sim()
    frontier = [sim.start("bash", "bash -c f")]
    for _ in range(5):
        nxt = []
        for p in frontier:
            nxt += [sim.fork(p), sim.fork(p)]
            sim.exit(p)
        frontier = nxt
    depths = sorted(d for _, d, _ in sim.tree.cgstat("sim").abandons)
    assert depths[-1] == 5 and depths.count(1) == 1 and len(depths) == 1 + 2 + 4 + 8 + 16
    consistent(sim.tree)


def test_abandoning_counts_through_living_generations():
    """setsid + double fork: members live on and loop, the intermediates exit at once."""
    sim = Sim()
    member = sim.start("python3", "python3 bomb.py")
    for _ in range(4):
        mid = sim.fork(member)
        member = sim.fork(mid)
        sim.exit(mid)  # abandons the new member
    depths = [d for _, d, _ in sim.tree.cgstat("sim").abandons]
    assert depths == [1, 2, 3, 4]


def test_old_abandonment_does_not_count():
    sim = Sim(tree_kwargs={"abandon_window_ns": 1 * S})
    a = sim.start("bash", "bash")
    b = sim.fork(a)
    sim.exit(a)
    sim.tick(5 * S)
    c = sim.fork(b)
    sim.exit(b)
    sim.fork(c)
    assert [d for _, d, _ in sim.tree.cgstat("sim").abandons] == [1, 1]


def test_daemonizing_double_fork_is_two_generations():
    sim = Sim()
    sh = sim.start("sshd", "sshd")
    first = sim.fork(sh)
    second = sim.fork(first)
    sim.exit(first)
    daemon = sim.fork(second)
    sim.exit(second)
    assert max(d for _, d, _ in sim.tree.cgstat("sim").abandons) == 2
    assert sim.tree.get(daemon) is not None


# -- identities -----------------------------------------------------------------------------
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
    assert not old.alive and old.exit_ns
    assert [c.tgid for c in old.children()] == [b], "the old identity keeps its own children"
    assert new.first_child is None
    assert sim.tree.stats.pid_reuse == 1
    live = {r.identity for r in sim.tree.records_in("sim") if r.alive}
    assert live == {sim.tree.get(sh).identity, new.identity, sim.tree.get(b).identity}
    consistent(sim.tree)


def test_threads_count_as_tasks_not_records():
    sim = Sim()
    py = sim.start("python3", "python3 app.py")
    births = sim.tree.births_in("sim")
    tids = [sim.thread(py) for _ in range(5)]
    r = sim.tree.get(py)
    assert r.threads == 6 and r.nforks == 0 and sim.tree.stats.records == 1
    assert sim.tree.tasks_in("sim") == 6 and sim.tree.births_in("sim") == births + 5
    for tid in tids[:2]:
        sim.thread_exit(py, tid)
    assert r.threads == 4 and sim.tree.tasks_in("sim") == 4
    consistent(sim.tree)


def test_counts_per_cgroup_follow_forks_exits_and_moves():
    sim = Sim()
    sh = sim.start("bash", "bash", cgroup="sim/a")
    kids = [sim.fork(sh) for _ in range(3)]
    t = sim.tree
    assert t.tasks_in("sim/a") == 4 and t.tasks_in("sim") == 4
    sim.exit(kids[0])
    t.move(t.get(kids[1]), "sim/b")
    assert (t.tasks_in("sim/a"), t.tasks_in("sim/b"), t.tasks_in("sim")) == (2, 1, 3)
    consistent(t)


# -- scope ------------------------------------------------------------------------------------
def test_unknown_parent_in_scope_gets_a_record_once():
    sim = Sim()
    # A shell that was in the cgroup before the tree started listening.
    sh = sim._new(sim.outside, "bash", "bash -i", "sim")
    kid = sim.fork(sh)
    t = sim.tree
    p = t.get(sh)
    assert p is not None and t.get(kid).parent is p
    t.flush()
    assert t.describe(p) == ("bash", "bash -i")
    reads = sim.proc.reads
    sim.fork(sh)
    t.flush()
    assert sim.proc.reads == reads


def test_storm_outside_scope_costs_no_stat_reads():
    sim = Sim()
    out = sim._new(sim.outside, "bash", "bash", "user.slice")
    frontier = [out]
    for _ in range(7):
        frontier = [sim.fork(p) for p in frontier for _ in range(2)]
    assert sim.tree.stats.records == 0
    assert sim.proc.reads == 0  # only cgroup_of(out), which is not a stat read
    assert sim.tree.stats.negative_cache > 0


def test_a_family_moved_into_scope_is_found_within_a_few_hundred_forks():
    """A runtime forks outside, moves the process into the container's cgroup, and it forks on."""
    sim = Sim()
    shim = sim._new(sim.outside, "shim", "containerd-shim", "system.slice/containerd.service")
    init = sim.fork(shim)
    sim.fork(init)  # seen as an outsider's family
    sim.procs[init].cgroup = "sim/ctr"  # moved into the watched cgroup, events say nothing
    kids = [sim.fork(init) for _ in range(RESIGHT_EVERY)]
    t = sim.tree
    assert t.get(init) is not None and t.get(init).cgroup == "sim/ctr"
    assert t.stats.resights >= 1
    later = sim.fork(init)
    assert t.get(later).parent is t.get(init)
    assert t.get(kids[0]) is None  # forked before the re-check: found by adoption, not here
    consistent(t)


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
    sim.tree.flush()
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


def test_aging_clears_incomplete_marks_and_old_abandonments():
    sim, _ = aged_sim()
    sim.resync(["sim"])
    assert sim.tree.stats.incomplete == ("sim",)
    sim.tree.age()
    assert sim.tree.stats.incomplete == ()
    assert not sim.tree.cgstat("sim").abandons  # a's abandonment is 40 s old


def test_default_calm_sources_read_the_kernel():
    vm = read_vmstat()
    assert "pageoutrun" in vm and any(k.startswith("allocstall") for k in vm)
    assert nr_processes() > 1


# -- start-up, loss, adoption ---------------------------------------------------------------
def test_load_from_proc_links_known_parents_and_marks_what_it_loaded():
    sim = Sim()
    sim.deliver = False
    sh = sim.start("bash", "bash")
    a = sim.fork(sh)
    a1 = sim.fork(a)
    sim.spawn(sh, "sleep", "sleep 60")
    sim.deliver = True
    assert sim.load() == 4
    t = sim.tree
    assert t.get(a).parent is t.get(sh) and t.get(a1).parent is t.get(a)
    assert [r.tgid for r in t.forest("sim")[1]] == [sh]
    assert t.loaded_start("sim") > 0
    # The FORK event of a process the scan already saw is not a pid reuse.
    t.on_fork(sim.procs[a1].start_ns + 2 * MS, a, a, a1, a1)
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
    sim.resync()
    t = sim.tree
    assert not t.loss_pending and t.stats.incomplete == ("sim",)
    live_fake = {p.pid for p in sim.procs.values() if p.cgroup == "sim"}
    live_tree = {r.tgid for r in t.records_in("sim") if r.alive}
    assert live_tree == live_fake
    assert t.get(grand).parent.tgid == kids[0] and not t.get(grand).parent.alive
    for n in new:
        assert t.get(n).parent is t.get(kids[2])
    consistent(t)


def test_adopt_tracks_processes_moved_in_after_their_fork():
    sim = Sim()
    sim.start("bash", "bash")
    runner = sim._new(sim.outside, "runc", "runc init", "system.slice")
    sim.procs[runner].cgroup = "sim"  # moved in; nothing in the event stream says so
    assert sim.tree.get(runner) is None
    assert sim.adopt() == 1
    assert sim.tree.get(runner) is not None
    assert sim.adopt() == 0
    consistent(sim.tree)


# -- queries -------------------------------------------------------------------------------
def test_queries_and_json():
    sim = Sim()
    sh = sim.start("bash", "bash -c work")
    a = sim.fork(sh)
    b = sim.fork(a)
    sim.exit(a)
    c = sim.spawn(sh, "sleep", "sleep 5")
    sim.fork(c)
    t = sim.tree
    t.flush()
    rsh = t.get(sh)
    assert set(t.live_members(rsh)) == {t.get(x).identity for x in (sh, b, c)} | {
        r.identity for r in t.records_in("sim") if r.alive and r.parent is t.get(c)
    }
    doc = tree_json(t, "sim", badness=lambda pid: 7)
    (root,) = doc["forest"]
    assert root["pid"] == sh and root["family"] == 3 and root["depth"] == 0
    kids = {k["pid"]: k for k in root["children"]}
    assert kids[a]["placeholder"] and not kids[a]["alive"] and kids[a]["children"][0]["pid"] == b
    assert kids[c]["comm"] == "sleep"
    # seed score: own badness 7 + children's scores + 1 per live child
    assert kids[a]["score"] == 0 + (7 + 0) + 1  # a placeholder: no badness of its own
    st = t.stats
    assert st.records == 5 and st.live == 4 and st.placeholders == 1
    assert t.take_activity() == {"sim"} and t.take_activity() == set()


def test_an_outsider_that_execs_is_checked_at_its_first_fork():
    """The sandbox's (and runc's) way: fork outside, move into the cgroup, exec, then fork."""
    sim = Sim()
    sim.start("sleep", "sleep 60")  # the cgroup is populated already: no populated event
    spawner = sim._new(sim.outside, "python3", "pytest", "user.slice")
    child = sim.fork(spawner)  # an outsider's child
    sim.procs[child].cgroup = "sim"
    sim.exec(child, "bash", "bash -c bomb")
    assert sim.tree.get(child) is None
    first = sim.fork(child)
    t = sim.tree
    assert t.get(child) is not None and t.get(first).parent is t.get(child)
    assert t.describe(t.get(child)) == ("bash", "bash -c bomb")
    # An outsider that execs and stays outside costs one read at its first fork, then none.
    out = sim.fork(spawner)
    sim.exec(out, "make", "make")
    reads = sim.proc.reads
    for _ in range(20):
        sim.fork(out)
    assert sim.proc.reads == reads
    consistent(t)


# -- who descends from a bomb's origin (the surgical kill's question) -------------------------
def test_descent_is_unknown_above_a_young_root_and_false_above_an_old_one():
    sim = Sim()
    innocent = sim.start("sleep", "sleep 600")
    sim.tick(5 * S)
    origin = sim.start("bash", "bash -c bomb")
    kids = [sim.fork(origin) for _ in range(3)]
    grandkid = sim.fork(kids[0])
    # Events lost: a fork the tree never heard of, whose parent then exits. The child is an
    # orphan of the bomb that the tree first sees from /proc, as a root of unknown ancestry.
    sim.deliver = False
    lost = sim.fork(kids[1])
    sim.exit(kids[1])
    sim.deliver = True
    sim.resync()
    t = sim.tree
    o = t.get(origin)
    assert descends_from(t.get(grandkid), o) is True
    assert descends_from(t.get(kids[2]), o) is True
    assert t.get(lost).parent is None
    assert descends_from(t.get(lost), o) is None, "a young root may be the bomb's: not innocent"
    assert descends_from(t.get(innocent), o) is False, "older than the origin: cannot descend"
    # A neighbour started after the bomb by a tracked process of its own is known innocent.
    helper = sim.spawn(innocent, "cat", "cat")
    assert descends_from(t.get(helper), o) is False


def test_surgical_members_take_unknown_orphans_and_spare_older_neighbours():
    from cgguard.act import bomb_members
    from cgguard.agent.tracking import Tracking

    sim = Sim()
    innocent = sim.start("sleep", "sleep 600")
    sim.tick(5 * S)
    origin = sim.start("bash", "bash -c bomb")
    kid = sim.fork(origin)
    sim.deliver = False
    orphan = sim.fork(kid)
    sim.exit(kid)
    sim.deliver = True
    sim.resync()
    helper = sim.spawn(innocent, "cat", "cat")
    o = sim.tree.get(origin)
    tracking = Tracking.__new__(Tracking)  # only its tree is consulted
    tracking.tree = sim.tree
    classify = tracking.member_test(o)
    procs = sim.fs.procs("sim")
    stats = {pid: sim.proc.stat(pid) for pid in procs}
    out, guessed = bomb_members(procs, frozenset({o.identity}), classify, o.start_ns, stats)
    assert out == {origin, orphan} and guessed == 1
    assert innocent not in out and helper not in out
    why: dict[str, int] = {}
    bomb_members(procs, frozenset({o.identity}), classify, o.start_ns, stats, why=why)
    assert why == {"older than the origin": 1, "recorded ancestry outside the lineage": 1}, why
