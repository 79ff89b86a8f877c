"""A tiny process simulator for lineage tests: a fake /proc, a fake cgroup tree, a pid allocator
and a clock, feeding the matching proc-connector events straight into a LineageTree."""

from __future__ import annotations

from dataclasses import dataclass, field

from cgguard.kernel.procfs import ProcStat
from cgguard.state import lineage_scan
from cgguard.state.lineage import LineageTree
from cgguard.state.lineage_record import FREED

MS = 1_000_000
S = 1_000_000_000


# -- simulator -----------------------------------------------------------------------------
@dataclass
class FakeProcess:
    pid: int
    ppid: int
    start_ns: int
    comm: str
    cmdline: str
    cgroup: str
    threads: int = 1


class FakeProc:
    """The ProcFS interface over the simulator's processes."""

    def __init__(self, sim: "Sim"):
        self.sim = sim
        self.reads = 0

    def stat(self, pid: int) -> ProcStat | None:
        self.reads += 1
        p = self.sim.procs.get(pid)
        if p is None:
            return None
        # /proc has tick resolution.
        return ProcStat(pid, p.comm, "S", p.ppid, p.start_ns - p.start_ns % (10 * MS), p.threads)

    def cmdline(self, pid: int) -> str | None:
        p = self.sim.procs.get(pid)
        return None if p is None else p.cmdline


class FakeFS:
    """walk() and procs() of CgroupFS over the simulator's processes."""

    def __init__(self, sim: "Sim"):
        self.sim = sim

    def walk(self, rel: str) -> list[str]:
        cgs = {p.cgroup for p in self.sim.procs.values()} | {rel}
        return sorted(c for c in cgs if c == rel or c.startswith(rel + "/"))

    def procs(self, rel: str) -> list[int]:
        return sorted(p.pid for p in self.sim.procs.values() if p.cgroup == rel)


@dataclass
class Sim:
    scope: str = "sim"
    t: int = 1000 * S
    next_pid: int = 300
    procs: dict[int, FakeProcess] = field(default_factory=dict)
    vm: dict[str, int] = field(default_factory=lambda: {"pageoutrun": 0, "allocstall_normal": 0})
    deliver: bool = True  # False simulates lost events
    tree_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.proc = FakeProc(self)
        self.fs = FakeFS(self)
        self.tree = LineageTree(
            in_scope=lambda cg: cg == self.scope or cg.startswith(self.scope + "/"),
            cgroup_of=self.cgroup_of,
            proc=self.proc,
            clock=lambda: self.t,
            vmstat=lambda: dict(self.vm),
            nr_processes=lambda: len(self.procs),
            **self.tree_kwargs,
        )
        # A process outside every watched cgroup, like systemd or a terminal.
        self.outside = self._new(1, "systemd", "/sbin/init", "init.scope")

    def cgroup_of(self, pid: int) -> str | None:
        p = self.procs.get(pid)
        return None if p is None else p.cgroup

    def _new(self, ppid: int, comm: str, cmdline: str, cgroup: str) -> int:
        pid = self.next_pid
        self.next_pid += 1
        self.procs[pid] = FakeProcess(pid, ppid, self.t, comm, cmdline, cgroup)
        return pid

    def tick(self, ns: int) -> None:
        self.t += ns

    # -- events ----------------------------------------------------------------------------
    def start(self, comm: str, cmdline: str, cgroup: str | None = None, parent: int | None = None) -> int:
        """A process started from outside (e.g. by a runtime), moved into ``cgroup`` and exec'd.
        The tree hears its fork as an outsider's; the agent then sees the cgroup populated (or
        its count above what the tree knows) and adopts it from /proc, as modelled here."""
        ppid = self.outside if parent is None else parent
        pid = self._new(ppid, self.procs[ppid].comm, self.procs[ppid].cmdline, self.procs[ppid].cgroup)
        if self.deliver:
            self.tree.on_fork(self.t, ppid, ppid, pid, pid)
        self.tick(MS)
        self.procs[pid].cgroup = cgroup or self.scope
        self.exec(pid, comm, cmdline)
        if self.deliver:  # the agent is listening: it sees the cgroup populated and adopts
            self.adopt(cgroup or self.scope)
        return pid

    def adopt(self, cgroup: str | None = None) -> int:
        return lineage_scan.adopt(self.tree, self.fs, cgroup or self.scope)

    def load(self, cgroups: list[str] | None = None) -> int:
        return lineage_scan.load(self.tree, self.fs, cgroups or [self.scope])

    def resync(self, cgroups: list[str] | None = None) -> int:
        return lineage_scan.resync(self.tree, self.fs, cgroups)

    def fork(self, ppid: int, dt: int = 100_000) -> int:
        self.tick(dt)
        p = self.procs[ppid]
        pid = self._new(ppid, p.comm, p.cmdline, p.cgroup)
        if self.deliver:
            self.tree.on_fork(self.t, ppid, ppid, pid, pid)
        return pid

    def exec(self, pid: int, comm: str, cmdline: str, dt: int = 50_000) -> None:
        self.tick(dt)
        p = self.procs[pid]
        p.comm, p.cmdline = comm, cmdline
        if self.deliver:
            self.tree.on_exec(self.t, pid, pid)

    def spawn(self, ppid: int, comm: str, cmdline: str, dt: int = 100_000) -> int:
        """fork + exec, like posix_spawn or a shell running a command."""
        pid = self.fork(ppid, dt)
        self.exec(pid, comm, cmdline)
        return pid

    def exit(self, pid: int, dt: int = 50_000) -> None:
        self.tick(dt)
        self.procs.pop(pid)
        for c in self.procs.values():
            if c.ppid == pid:
                c.ppid = 1  # reparented to init, as the kernel does
        if self.deliver:
            self.tree.on_exit(self.t, pid, pid, 0, 17)

    def thread(self, pid: int) -> int:
        tid = self.next_pid
        self.next_pid += 1
        self.procs[pid].threads += 1
        if self.deliver:
            # CLONE_THREAD: the kernel names the process's parent as the parent.
            ppid = self.procs[pid].ppid
            self.tree.on_fork(self.t, ppid, ppid, tid, pid)
        return tid

    def thread_exit(self, pid: int, tid: int) -> None:
        self.procs[pid].threads -= 1
        if self.deliver:
            self.tree.on_exit(self.t, tid, pid, 0, -1)

    def live_in_scope(self) -> int:
        return sum(1 for p in self.procs.values() if p.cgroup == self.scope or p.cgroup.startswith(self.scope + "/"))


def consistent(tree: LineageTree) -> None:
    """Structural invariants: links agree, every non-live record has children, counts add up."""
    seen = 0
    for cg, stat in tree._cg.items():
        for r in stat.members:
            seen += 1
            assert r.cgroup == cg
            assert not r.flags & FREED, "freed record still indexed"
            if not r.alive:
                assert r.first_child is not None, f"childless placeholder {r}"
            if r.alive:
                assert tree.get(r.tgid) is r
            kids = list(r.children())
            for c in kids:
                assert c.parent is r
            if r.parent is not None:
                assert r in list(r.parent.children())
            assert r.nlive == sum(1 for c in kids if c.alive), f"nlive of {r}"
        assert stat.tasks == sum(r.threads for r in stat.members if r.alive), f"tasks of {cg}"
    assert seen == tree.stats.records

