"""The lineage detector: families that abandon their copies are found early, bounded work is spared.

Synthetic event streams go through a LineageTree (``Sim`` in tests/lineage_sim.py) and the
detector is called the way the agent calls it: after each burst of events, the cheap check on
the per-cgroup abandonment counts, then the full evaluation when they qualify. Benign shapes are
evaluated after every step regardless of the check (``strict``), so a check that hid a false
positive would not pass. Real processes are in tests/integration/test_detect_lineage_live.py.
"""

from __future__ import annotations

import os

import pytest
from lineage_sim import MS, S, Sim

from cgguard.config import LineageDetect
from cgguard.detect import Verdict
from cgguard.kernel.procfs import ProcStat
from cgguard.detect.lineage import detect_lineage, qualifies, worst_lineage
from cgguard.state.lineage import LineageTree
from cgguard.testkit.cnproc import replay

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
P = LineageDetect()


class Watch:
    """Evaluates like the agent: every ``batch`` events, pre-check then detect."""

    def __init__(self, sim: Sim, batch: int = 16, strict: bool = False):
        self.sim, self.batch, self.strict = sim, batch, strict
        self.events = 0
        self.verdict: Verdict | None = None
        self.live_at_verdict: int | None = None
        self.live_pids_at_verdict: set[int] = set()
        self.evaluations = 0

    def step(self, n: int = 1) -> None:
        self.events += n
        if self.events % self.batch and n == 1:
            return
        self.check()

    def check(self) -> None:
        tree = self.sim.tree
        tree.flush()
        hot = tree.take_activity()
        if self.strict or (hot and qualifies(tree, "sim", self.sim.t, P)):
            self.evaluations += 1
            v = detect_lineage(tree, "sim", self.sim.t, P)
            if v is not None and self.verdict is None:
                self.verdict = v
                self.live_at_verdict = self.sim.live_in_scope()
                self.live_pids_at_verdict = {p.pid for p in self.sim.procs.values() if p.cgroup == "sim"}


# -- bombs -----------------------------------------------------------------------------------
def run_pipe_bomb(
    sim: Sim,
    w: Watch,
    origin: int,
    origin_exits: bool,
    cap: int = 256,
    child=None,
    each_generation=None,
) -> None:
    """``f(){ f|f & }; f``: every member starts two copies (``child``, default a plain fork)
    and exits at once; ``each_generation(frontier)`` runs before a generation forks."""
    child = child or (lambda p: sim.fork(p, dt=150_000))
    frontier = [origin]
    while frontier:
        if each_generation is not None:
            each_generation(frontier)
        nxt = []
        for p in frontier:
            for _ in range(2):
                if sim.live_in_scope() >= cap:
                    break  # fork refused at pids.max
                nxt.append(child(p))
                w.step()
                if w.verdict:
                    return
            if p != origin or origin_exits:
                sim.exit(p, dt=20_000)
                w.step()
                if w.verdict:
                    return
        frontier = nxt
    w.check()


def assert_bomb(w: Watch, origin_pid: int, origin_alive: bool, max_live: int = 128) -> Verdict:
    v = w.verdict
    assert v is not None, "bomb not flagged"
    assert v.detector == "lineage" and v.evidence == "lineage"
    assert w.live_at_verdict is not None and w.live_at_verdict <= max_live, w.live_at_verdict
    assert v.origin.pid == origin_pid and v.origin.alive == origin_alive
    assert v.family >= P.min_family
    rules = {r.rule: r.values for r in v.reasons}
    assert rules["lineage-abandoning-replication"]["generations"] >= P.min_generations
    assert rules["lineage-abandoning-replication"]["abandoners"] >= P.min_abandoners
    assert rules["lineage-family"]["born"] > 0
    # Every live member of the lineage was a live process of the bomb.
    assert {pid for pid, _ in v.members} <= w.live_pids_at_verdict
    assert v.first_sign_ns <= v.at_ns and v.complete
    return v


def test_bash_function_bomb_origin_is_a_dead_placeholder():
    sim = Sim()
    w = Watch(sim)
    b = sim.start("bash", "bash -c f(){ f|f & }; f")
    run_pipe_bomb(sim, w, b, origin_exits=True)
    v = assert_bomb(w, b, origin_alive=False, max_live=64)
    assert v.origin.cmdline == "bash -c f(){ f|f & }; f" and v.origin.comm == "bash"
    assert v.origin_ref.identity == (b, v.origin.start_ns) and not v.origin_ref.alive
    assert (b, v.origin.start_ns) not in v.members


def test_classic_colon_bomb_from_an_interactive_shell():
    sim = Sim()
    w = Watch(sim)
    login = sim.start("bash", "-bash")
    # `:(){ :|:& };:` typed at the prompt: the shell itself runs the function, forks and lives on.
    run_pipe_bomb(sim, w, login, origin_exits=False)
    v = assert_bomb(w, login, origin_alive=True, max_live=64)
    assert v.origin.cmdline == "-bash"


def test_bomb_started_by_a_long_lived_runner_names_the_job_not_the_runner():
    sim = Sim()
    w = Watch(sim)
    runner = sim.start("runner", "gitlab-runner run")
    sim.tick(60 * S)
    job = sim.spawn(runner, "bash", "bash job.sh")
    run_pipe_bomb(sim, w, job, origin_exits=True)
    assert_bomb(w, job, origin_alive=False, max_live=64)


def run_loop_bomb(sim: Sim, w: Watch, origin: int, gap: int, cap: int = 256) -> None:
    """``while True: os.fork()`` (Python or C): every process keeps forking, nobody exits."""
    procs = [origin]
    while w.verdict is None and len(procs) < cap:
        for p in list(procs):
            if len(procs) >= cap:
                break
            procs.append(sim.fork(p, dt=gap))
            w.step()
    w.check()


@pytest.mark.parametrize("gap", [60_000, 15_000], ids=["python", "c"])
def test_fork_loop_bombs_that_never_exit_are_left_to_the_budget_rules(gap):
    """``while True: os.fork()``: nobody exits, so nobody abandons anything; the same shape up
    to any size is a pool filling up. Budget and trajectory remove it (test_detect_cgroup, the
    integration tests); lineage names its origin for them (worst_lineage)."""
    sim = Sim()
    w = Watch(sim, strict=True)
    py = sim.start("python3", "python3 -c while True: os.fork()")
    run_loop_bomb(sim, w, py, gap=gap)
    assert w.verdict is None
    v = worst_lineage(sim.tree, "sim", sim.t, P)
    assert v is not None and v.origin.pid == py and v.family == 255


def test_slow_bomb_that_waits_is_left_to_the_budget_rules():
    """f(){ sleep 0.3; f & f & wait; }: unbounded, but shaped like a parallel merge sort until it
    passes half its budget. Trajectory removes it there."""
    sim = Sim()
    w = Watch(sim, strict=True)
    level = [sim.start("bash", "bash -c f(){ sleep 0.3; f & f & wait; }; f")]
    for _ in range(7):
        sim.tick(300 * MS)
        level = [sim.fork(p) for p in level for _ in range(2)]
        w.step(len(level))
    assert_spared(w)


def test_setsid_double_fork_bomb():
    sim = Sim()
    w = Watch(sim)
    py = sim.start("python3", "python3 bomb.py")
    # Each member forks an intermediate that calls setsid(), forks the next member and exits:
    # no member is the child of a live process, yet the records still link them.
    members = [py]
    while w.verdict is None and len(members) < 200:
        for m in list(members):
            mid = sim.fork(m, dt=80_000)
            members.append(sim.fork(mid, dt=80_000))
            sim.exit(mid, dt=20_000)
            w.step(3)
            if w.verdict:
                break
    assert_bomb(w, py, origin_alive=True, max_live=128)


def test_exec_chain_bomb_with_a_new_command_line_every_generation():
    """A script that runs itself again with a generation counter, twice, and exits: every member
    execs into another command line, so no member is a clone; abandonment still adds up."""
    sim = Sim()
    w = Watch(sim)
    b = sim.start("bash", "bash ./bomb.sh 0")
    gen = {b: 0}

    def child(p):
        c = sim.spawn(p, "bash", f"bash ./bomb.sh {gen[p] + 1}", dt=300_000)
        gen[c] = gen[p] + 1
        return c

    run_pipe_bomb(sim, w, b, origin_exits=True, child=child)
    v = assert_bomb(w, b, origin_alive=False, max_live=64)
    assert v.origin.cmdline == "bash ./bomb.sh 0"


def test_recorded_bash_bomb_stream():
    """A real `f(){ f|f & }; f` recorded through the proc connector (cap 256, first 0.6 s,
    ProcConnector.record_to, then keep_lineage to the bash's descendants) and replayed."""
    path = os.path.join(DATA, "bash-bomb.cnproc")
    origin, start = _recording_origin(path)
    # The bash is alive at its first fork, when the tree sights it through /proc.
    tree = LineageTree(in_scope=lambda cg: True, cgroup_of=lambda pid: "rec", proc=_OriginProc(origin, start))
    # The recording starts with the exec of the bomb's bash: feed events in batches.
    verdicts = []

    class Batcher:
        n = 0

        def __getattr__(self, name):
            fn = getattr(tree, name)

            def call(*a):
                fn(*a)
                Batcher.n += 1
                if Batcher.n % 64 == 0 and not verdicts and tree.take_activity() and qualifies(tree, "rec", a[0], P):
                    v = detect_lineage(tree, "rec", a[0], P)
                    if v is not None:
                        verdicts.append((v, tree.stats.live))

            return call

    replay(path, Batcher())
    assert verdicts, "recorded bomb not flagged"
    v, live = verdicts[0]
    assert v.origin.pid == origin and not v.origin.alive and v.origin.cmdline == "bash -c f(){ f|f & }; f"
    assert live < 128


class _OriginProc:
    """A /proc that knows only the recording's bash."""

    def __init__(self, pid: int, start_ns: int):
        self.pid, self.start_ns = pid, start_ns

    def stat(self, pid):
        return ProcStat(pid, "bash", "S", 1, self.start_ns, 1) if pid == self.pid else None

    def cmdline(self, pid):
        return "bash -c f(){ f|f & }; f" if pid == self.pid else None


def _recording_origin(path: str) -> tuple[int, int]:
    from cgguard.kernel.procconn_abi import PROC_EVENT_EXEC
    from cgguard.testkit.cnproc import iter_events

    for ev in iter_events(path):
        if ev[0] == PROC_EVENT_EXEC:
            return ev[3], ev[1]
    raise AssertionError("no exec in recording")


# -- benign shapes -----------------------------------------------------------------------------
def assert_spared(w: Watch) -> None:
    w.check()
    assert w.verdict is None, w.verdict.summary() if w.verdict else ""


def test_wide_flat_burst_of_300_sleepers():
    sim = Sim()
    w = Watch(sim, strict=True)
    sh = sim.start("bash", "bash -c for i in $(seq 300); do sleep 5 & done; wait")
    for _ in range(300):
        k = sim.fork(sh, dt=200_000)
        sim.exec(k, "sleep", "sleep 5")
        w.step(2)
    assert_spared(w)
    

def run_jobs(sim: Sim, w: Watch, n_jobs: int, concurrency: int, start_job, job_ns: int = 20 * MS) -> None:
    """A scheduler that keeps ``concurrency`` jobs running until ``n_jobs`` are done."""
    running: list[tuple[int, list[int]]] = []  # (end time, pids to exit in order)
    started = 0
    while started < n_jobs or running:
        while started < n_jobs and len(running) < concurrency:
            pids = start_job(started)
            running.append((sim.t + job_ns, pids))
            started += 1
            w.step(len(pids) * 2)
        running.sort()
        end, pids = running.pop(0)
        if end > sim.t:
            sim.tick(end - sim.t)
        for pid in pids:
            sim.exit(pid, dt=30_000)
        w.step(len(pids))


def compile_job(sim: Sim, parent: int, i: int) -> list[int]:
    """make's recipe: sh -c 'gcc ...' -> gcc -> cc1 and as; exits innermost first."""
    sh = sim.spawn(parent, "sh", f"/bin/sh -c gcc -c f{i}.c")
    gcc = sim.spawn(sh, "gcc", f"gcc -c f{i}.c")
    cc1 = sim.spawn(gcc, "cc1", f"cc1 f{i}.c")
    asm = sim.spawn(gcc, "as", f"as -o f{i}.o")
    return [asm, cc1, gcc, sh]


def test_make_j8():
    sim = Sim()
    w = Watch(sim, strict=True)
    make = sim.start("make", "make -j8")
    run_jobs(sim, w, 200, 8, lambda i: compile_job(sim, make, i))
    assert_spared(w)


def test_recursive_make_through_sh_and_directly():
    sim = Sim()
    w = Watch(sim, strict=True)
    top = sim.start("make", "make -j16")
    # Kbuild-like descent: make execs make directly, 6 directory levels deep.
    chain = [top]
    for d in range(6):
        chain.append(sim.spawn(chain[-1], "make", f"make -f scripts/Makefile.build obj=d{d}"))
    # ... and the classic `cd sub && $(MAKE)` through sh, 3 levels.
    sh1 = sim.spawn(top, "sh", "/bin/sh -c cd lib && make")
    m1 = sim.spawn(sh1, "make", "make -C lib")
    sh2 = sim.spawn(m1, "sh", "/bin/sh -c cd sub && make")
    m2 = sim.spawn(sh2, "make", "make -C sub")
    leaves = [chain[-1], m2]
    run_jobs(sim, w, 300, 16, lambda i: compile_job(sim, leaves[i % 2], i))
    assert_spared(w)


def test_xargs_P16_churn():
    sim = Sim()
    w = Watch(sim, strict=True)
    xargs = sim.start("xargs", "xargs -P 16 -n 1 true")
    run_jobs(sim, w, 300, 16, lambda i: [sim.spawn(xargs, "true", "true", dt=50_000)], job_ns=2 * MS)
    assert_spared(w)


def test_nested_xargs():
    sim = Sim()
    w = Watch(sim, strict=True)
    outer = sim.start("xargs", "xargs -P4 -n1 sh -c 'seq 8 | xargs -P4 -n1 true'")
    for i in range(8):
        inners = []
        for _ in range(4):
            sh = sim.spawn(outer, "sh", "sh -c seq 8 | xargs -P4 -n1 true")
            seq = sim.spawn(sh, "seq", "seq 8")
            inner = sim.spawn(sh, "xargs", "xargs -P4 -n1 true")
            sim.exit(seq)
            inners.append((sh, inner, [sim.spawn(inner, "true", "true") for _ in range(4)]))
            w.step(12)
        sim.tick(5 * MS)
        for sh, inner, leaves in inners:
            for leaf in leaves:
                sim.exit(leaf)
            sim.exit(inner)
            sim.exit(sh)
            w.step(6)
    assert_spared(w)


def test_multiprocessing_pool_with_task_churn():
    sim = Sim()
    w = Watch(sim, strict=True)
    main = sim.start("python3", "python3 etl.py")
    tracker = sim.spawn(main, "python3", "python3 -c from multiprocessing.resource_tracker import main")
    # Pool(8, maxtasksperchild=1): a fresh forked worker per task, each task runs a subprocess.
    workers = [sim.fork(main) for _ in range(8)]
    for task in range(200):
        wk = workers[task % 8]
        gz = sim.spawn(wk, "gzip", f"gzip part{task}")
        sim.tick(3 * MS)
        sim.exit(gz)
        sim.exit(wk)
        workers[task % 8] = sim.fork(main)
        w.step(5)
    assert tracker
    assert_spared(w)


def test_prefork_server():
    sim = Sim()
    w = Watch(sim, strict=True)
    master = sim.start("apache2", "/usr/sbin/apache2 -k start")
    workers = [sim.fork(master) for _ in range(10)]
    for req in range(300):
        i = req % 10
        cgi = sim.spawn(workers[i], "perl", "perl /usr/lib/cgi-bin/app.pl")
        sim.tick(MS)
        sim.exit(cgi)
        if req % 20 == 19:  # MaxRequestsPerChild: recycle the worker
            sim.exit(workers[i])
            workers[i] = sim.fork(master)
        w.step(4)
    assert_spared(w)


def test_tight_sequential_loop():
    sim = Sim()
    w = Watch(sim, strict=True, batch=64)
    sh = sim.start("bash", "bash -c for i in $(seq 1000); do date; done")
    for _ in range(1000):
        k = sim.spawn(sh, "date", "date", dt=50_000)
        sim.exit(k, dt=100_000)
        w.step(3)
    assert_spared(w)


def grow_tree(sim: Sim, w: Watch, root: int, fanouts: tuple[int, ...], dt: int) -> list[int]:
    """Fork a clone tree level by level (``fanouts[i]`` children per process of level i),
    evaluating after every fork; returns the last level."""
    level = [root]
    for fanout in fanouts:
        nxt = []
        for p in level:
            for _ in range(fanout):
                nxt.append(sim.fork(p, dt=dt))
                w.step()
        level = nxt
    return level


def test_bounded_worker_tree_fanout_5_depth_3():
    sim = Sim()
    w = Watch(sim, strict=True)
    grow_tree(sim, w, sim.start("python3", "python3 tree.py"), (5, 5, 5), dt=100_000)
    assert sim.live_in_scope() == 156
    assert_spared(w)
    sim.tick(10 * S)
    assert_spared(w)


def test_parallel_bash_script_with_nested_subshells():
    sim = Sim()
    w = Watch(sim, strict=True)
    sh = sim.start("bash", "bash build.sh")
    # for d in */; do ( cd $d; x=$( ( ls | wc -l ) ); ... ) & done
    for _ in range(3):
        for _ in range(8):
            item = sim.fork(sh)
            subst = sim.fork(item)
            pipe = sim.fork(subst)
            sim.exec(pipe, "ls", "ls")
            pipe2 = sim.fork(subst)
            sim.exec(pipe2, "wc", "wc -l")
            w.step(7)
            for p in (pipe, pipe2, subst, item):
                sim.exit(p)
            w.step(4)
    assert_spared(w)


# -- API details -------------------------------------------------------------------------------
def test_verdict_names_the_smallest_cgroup_holding_the_lineage():
    sim = Sim()
    w = Watch(sim)
    sim.start("xargs", "xargs -P4 true", cgroup="sim/sibling")
    b = sim.start("bash", "bash -c f(){ f|f & }; f", cgroup="sim/bomb/inner")
    run_pipe_bomb(sim, w, b, origin_exits=True)
    assert w.verdict is not None and w.verdict.cgroup == "sim/bomb/inner"


def test_worst_lineage_is_the_seed_choice():
    sim = Sim()
    make = sim.start("make", "make -j4")
    for i in range(4):
        compile_job(sim, make, i)
    v = worst_lineage(sim.tree, "sim", sim.t, P, badness=lambda pid: 1)
    assert v is not None and v.origin.pid == make and v.family == 16
    assert len(v.members) == 17
    assert detect_lineage(sim.tree, "sim", sim.t, P) is None


def test_bounded_tree_running_a_command_per_leaf_is_spared():
    """The bench's 'tree': bash subshells fan-out 5, depth 3, each leaf starting a 'sleep'."""
    sim = Sim()
    w = Watch(sim, strict=True)
    leaves = grow_tree(sim, w, sim.start("bash", "bash -c t(){ ...; }; t 3"), (5, 5, 5), dt=100_000)
    for leaf in leaves:
        sleeper = sim.fork(leaf, dt=50_000)
        w.step()
        sim.exec(sleeper, "sleep", "sleep 2")
        w.step()
    assert sim.live_in_scope() == 156 + 125
    assert_spared(w)


def wait_tree(sim: Sim, w: Watch, node: int, fanout: int, depth: int, leaf=None) -> None:
    """Bounded divide and conquer: fork ``fanout`` copies, recurse, then wait for them (children
    exit before their parent)."""
    if depth == 0:
        if leaf is not None:
            leaf(node)
        return
    kids = [sim.fork(node, dt=50_000) for _ in range(fanout)]
    w.step(len(kids))
    for k in kids:
        wait_tree(sim, w, k, fanout, depth - 1, leaf)
    for k in kids:
        sim.exit(k, dt=20_000)
        w.step()


def test_parallel_merge_sort_depth_6():
    sim = Sim()
    w = Watch(sim, strict=True)
    wait_tree(sim, w, sim.start("python3", "python3 msort.py"), 2, 6)
    assert_spared(w)


def test_parallel_directory_walk_with_a_subshell_per_directory():
    """walk(){ for d in "$1"/*/; do (walk "$d") & done; wait; } five levels deep, ls at the leaves."""
    sim = Sim()
    w = Watch(sim, strict=True)

    def leaf(p):
        ls = sim.spawn(p, "ls", "ls -l")
        sim.exit(ls)
        w.step(2)

    wait_tree(sim, w, sim.start("bash", "bash walk.sh /srv"), 2, 5, leaf)
    assert_spared(w)


def test_bounded_binary_worker_tree_depth_6():
    sim = Sim()
    w = Watch(sim, strict=True)
    wait_tree(sim, w, sim.start("bash", "bash tree.sh 6"), 2, 6, leaf=lambda p: sim.tick(MS))
    assert_spared(w)


def fire_and_forget(sim: Sim, w: Watch, node: int, fanout: int, depth: int) -> None:
    """Each member forks its copies and exits without waiting (no result is ever collected)."""
    level = [node]
    for _ in range(depth):
        nxt = []
        for p in level:
            nxt += [sim.fork(p, dt=50_000) for _ in range(fanout)]
            sim.exit(p, dt=10_000)
            w.step(fanout + 1)
        level = nxt


def test_daemons_and_detached_jobs_abandon_for_a_generation_or_two():
    """A shell starting background jobs and exiting, each job daemonizing by double fork."""
    sim = Sim()
    w = Watch(sim, strict=True)
    for _ in range(20):
        sh = sim.start("bash", "bash start-services.sh")
        for _ in range(3):
            job = sim.spawn(sh, "svc", "svc --daemon")
            first = sim.fork(job)
            sim.exit(job)
            second = sim.fork(first)
            sim.exit(first)
            w.step(5)
            assert second
        sim.exit(sh)
    assert_spared(w)


def test_a_shallow_fire_and_forget_tree_is_spared():
    sim = Sim()
    w = Watch(sim, strict=True)
    fire_and_forget(sim, w, sim.start("bash", "bash fanout.sh"), 4, P.min_generations - 1)
    assert_spared(w)


def test_documented_limit_a_deep_fire_and_forget_tree_is_taken_for_a_bomb():
    """The README says so: a bounded program that forks copies which fork copies and exit,
    min_generations deep, is indistinguishable from :(){ :|:& };: until it stops. An allow rule
    (relax) is the way to run one."""
    sim = Sim()
    w = Watch(sim)
    root = sim.start("bash", "bash fanout.sh")
    fire_and_forget(sim, w, root, 2, P.min_generations + 2)
    w.check()
    assert w.verdict is not None and w.verdict.origin.pid == root


def test_a_family_with_members_known_only_from_proc_is_incomplete():
    """The agent started while a bomb ran: a /proc scan gives records without their lineage. A
    verdict on the family must say so, so that nothing of it is spared as a neighbour."""
    sim = Sim()
    w = Watch(sim)
    b = sim.start("bash", "bash -c f(){ f|f & }; f")
    orphan = sim.fork(b)  # a member whose events the agent never saw ...
    sim.tree.on_exit(sim.t, orphan, orphan, 0, 0)
    sim.procs[orphan].ppid = 1  # ... and whose parent exited, as a bomb's parents do
    sim.tick(MS)
    sim.adopt()  # found again by a scan: a root record, young, from /proc
    run_pipe_bomb(sim, w, b, origin_exits=True)
    assert w.verdict is not None and not w.verdict.complete


def test_a_member_sighted_from_proc_under_a_tracked_parent_keeps_the_family_whole():
    sim = Sim()
    w = Watch(sim)
    b = sim.start("bash", "bash -c f(){ f|f & }; f")
    kid = sim.fork(b)
    sim.tree.on_exit(sim.t, kid, kid, 0, 0)  # its events missed, but its parent is alive
    sim.adopt()
    assert sim.tree.get(kid).parent is sim.tree.get(b)
    run_pipe_bomb(sim, w, b, origin_exits=True)
    assert w.verdict is not None and w.verdict.complete


def test_origin_climbs_past_a_generation_whose_exit_is_still_queued():
    """Exec chain: every member execs a new command line, forks two and exits. When the verdict
    comes, one member of a middle generation has forked its two (who abandoned theirs already) but
    not exited yet: the origin is still the chain's root, not the exec'd child below that member --
    else the surgical kill would take the root's other descendants for innocents."""
    from cgguard.detect.lineage import find_origin

    sim = Sim()
    root = sim.start("bash", "bash ./chain.sh 0")
    gen = {root: 0}

    def two(p, leave=True):
        kids = []
        for _ in range(2):
            c = sim.spawn(p, "bash", f"bash ./chain.sh {gen[p] + 1}", dt=300_000)
            gen[c] = gen[p] + 1
            kids.append(c)
        if leave:
            sim.exit(p)
        return kids

    c1, c2 = two(root)
    two(c1)
    d3, d4 = two(c2, leave=False)  # c2 forked both, its exit not heard yet
    two(d3)
    two(d4)
    tree = sim.tree
    c2r = tree.get(c2)
    assert c2r is not None and c2r.abd == 0  # alive, as far as the tree heard
    d3r = c2r.first_child
    while d3r.tgid != d3:
        d3r = d3r.next_sib
    assert d3r.abd > 0 and not d3r.alive
    origin = find_origin(d3r.first_child, "sim")  # from a member of the youngest generation
    assert (origin.tgid, origin.alive) == (root, False)
