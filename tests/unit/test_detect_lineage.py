"""The lineage detector: bomb shapes are found well before 256 tasks, parallel work is spared.

Unit tests drive synthetic event streams through a LineageTree (see ``Sim`` in
tests/lineage_sim.py) and call the detector the way the agent does: the cheap pre-check after every
batch of events, a full evaluation when it says so. Benign shapes are also evaluated after
every batch regardless of the pre-check, so a pre-check that hides a false positive would not
pass. Integration tests run real bombs inside a contained Sandbox.
"""

from __future__ import annotations

import os


from cgguard.detect import Verdict
from cgguard.config import LineageDetect
from cgguard.detect.lineage import detect_lineage, worst_lineage
from cgguard.state.lineage import LineageTree
from cgguard.testkit.cnproc import replay

from lineage_sim import MS, S, Sim

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
        hot = self.sim.tree.take_activity()
        if self.strict or hot:
            self.evaluations += 1
            v = detect_lineage(self.sim.tree, "sim", self.sim.t, P)
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
    assert v.detector == "lineage"
    assert w.live_at_verdict is not None and w.live_at_verdict <= max_live, w.live_at_verdict
    assert v.origin.pid == origin_pid and v.origin.alive == origin_alive
    assert v.family >= P.min_family and v.depth >= P.min_generations
    rules = {r.rule: r.values for r in v.reasons}
    assert rules["lineage-replication"]["generations"] >= P.min_generations
    assert rules["lineage-replication"]["forkers"] >= P.min_forkers
    assert rules["lineage-growth"]["growth_per_s"] > 0
    # Every live member of the lineage was a live process of the bomb.
    assert {pid for pid, _ in v.members} <= w.live_pids_at_verdict
    assert v.first_sign_ns <= v.at_ns
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


def test_python_fork_loop_bomb():
    sim = Sim()
    w = Watch(sim)
    py = sim.start("python3", "python3 -c while True: os.fork()")
    run_loop_bomb(sim, w, py, gap=60_000)
    v = assert_bomb(w, py, origin_alive=True, max_live=128)
    assert (py, v.origin.start_ns) in v.members, "a live origin that keeps forking is part of the kill"


def test_c_fork_loop_bomb_stays_flagged_at_the_cap():
    sim = Sim()
    w = Watch(sim, batch=64)
    a = sim.start("a.out", "./a.out")
    run_loop_bomb(sim, w, a, gap=15_000)
    assert_bomb(w, a, origin_alive=True, max_live=160)
    # Pinned at pids.max no more forks arrive; the family is still a bomb seconds later.
    sim.tick(20 * S)
    assert detect_lineage(sim.tree, "sim", sim.t, P) is not None


def test_slow_bomb_doubling_every_300ms():
    sim = Sim()
    w = Watch(sim)
    b = sim.start("bash", "bash -c f(){ sleep 0.3; f & f & }; f")

    def sleep_first(frontier):
        sleeps = [sim.spawn(p, "sleep", "sleep 0.3", dt=200_000) for p in frontier]
        sim.tick(300 * MS)
        for s in sleeps:
            sim.exit(s, dt=10_000)

    run_pipe_bomb(sim, w, b, origin_exits=True, each_generation=sleep_first)
    assert_bomb(w, b, origin_alive=False, max_live=80)


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


def test_self_exec_script_bomb():
    sim = Sim()
    w = Watch(sim)
    b = sim.start("bomb.sh", "bash ./bomb.sh")
    run_pipe_bomb(sim, w, b, origin_exits=True, child=lambda p: sim.spawn(p, "bomb.sh", "bash ./bomb.sh", dt=300_000))
    assert_bomb(w, b, origin_alive=False, max_live=64)


def test_recorded_bash_bomb_stream():
    """A real `f(){ f|f & }; f` recorded through the proc connector (cap 256, first 0.6 s,
    ProcConnector.record_to, then keep_lineage to the bash's descendants) and replayed."""
    path = os.path.join(DATA, "bash-bomb.cnproc")
    tree = LineageTree(in_scope=lambda cg: True, cgroup_of=lambda pid: "rec", proc=_NoProc())
    origin = _recording_origin(path)
    # The recording starts with the exec of the bomb's bash: feed events in batches.
    verdicts = []

    class Batcher:
        n = 0

        def __getattr__(self, name):
            fn = getattr(tree, name)

            def call(*a):
                fn(*a)
                Batcher.n += 1
                if Batcher.n % 64 == 0 and not verdicts and tree.take_activity():
                    v = detect_lineage(tree, "rec", a[0], P)
                    if v is not None:
                        verdicts.append((v, tree.stats.live))

            return call

    replay(path, Batcher())
    assert verdicts, "recorded bomb not flagged"
    v, live = verdicts[0]
    assert v.origin.pid == origin and not v.origin.alive
    assert live < 128


class _NoProc:
    def stat(self, pid):
        return None

    def cmdline(self, pid):
        return None


def _recording_origin(path: str) -> int:
    from cgguard.kernel.procconn import PROC_EVENT_EXEC
    from cgguard.testkit.cnproc import iter_events

    for ev in iter_events(path):
        if ev[0] == PROC_EVENT_EXEC:
            return ev[3]
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


def test_precheck_is_cheap_and_quiet_for_builds():
    sim = Sim()
    make = sim.start("make", "make -j8")
    for i in range(50):
        compile_job(sim, make, i)
        assert sim.tree.deep_forks_since("sim") is None


def test_wide_shallow_fork_loop_bush_is_flagged():
    """A fork-loop bomb on a busy 2-core host can fill its cap as a bush only 3-4 clone
    generations deep (measured: the C loop at pids.max 1024 gave chain 4 and ~100 forkers) and
    never reach min_generations. The wide rule catches it; the bounded worker tree above (fan-out
    5, depth 3, 31 forkers, 155 processes) stays below it."""
    sim = Sim()
    w = Watch(sim, strict=True)
    grow_tree(sim, w, sim.start("cbomb", "./cbomb 8"), (40, 8, 2, 1), dt=20_000)
    assert w.verdict is not None
    assert w.verdict.reasons[0].values["rule"] == "wide"
    assert w.live_at_verdict is not None and w.live_at_verdict < 1024


def test_bounded_tree_running_a_command_per_leaf_is_spared():
    """The bench's 'tree': bash subshells fan-out 5, depth 3, each leaf starting a 'sleep'. Its
    forkers (156) and clone chain (4) look like the wide bush; only its size (312) is smaller."""
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
