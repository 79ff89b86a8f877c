"""``cgguard bench --cost``: what the agent costs on busy nodes, against the issue's targets.

Scenarios (each with a real ``cgguard run`` subprocess, default settings, its CPU read from
``/proc/<pid>/stat`` -- utime + stime of every thread -- over the workload's own window):

* **fork load**: ``seq 3000 | xargs -P 16 -n 1 true`` in a watched cgroup and in one nothing
  watches (the proc connector hears it either way), the nested and sequential loops, a C fork
  loop paced at 3k forks/s, ``make -j8``;
* **idle**: RSS of an agent watching an empty tree;
* **classic bomb, quiet node**: verdict -> ``populated 0`` and start -> ``populated 0``, the
  reference for the two loaded cases below;
* **busy node**: a steady exec load (fork + exec ``/bin/true``, reaped) in a cgroup outside the
  watch globs at 1k/s, 3k/s and as fast as this machine goes, while classic bombs run in watched
  cgroups: agent CPU, proc-connector events received vs generated (and ENOBUFS), bomb removal
  time and peak against the quiet node;
* **10,000 calm cgroups**: ``/readyz`` after start, calm CPU, RSS, open descriptors against
  ``sampling.max_open_files``, how fast a new cgroup gets its inotify watch, also right after an
  inotify queue overflow (the agent is stopped with SIGSTOP while 16,400 cgroups appear);
* **scrape load**: 5,000 watched cgroups, 8 clients scraping ``/metrics`` back to back, the
  classic bomb's removal against the same agent unscraped.

Every workload runs through :class:`cgguard.testkit.sandbox.Sandbox` (kernel task cap + deadline);
every bomb is the corpus's deadline-bounded classic bomb. Numbers are reported against their
targets; a missed target is not a failure of the run (timings on a shared machine are noisy).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from cgguard.kernel.cgroupfs import CgroupFS
from cgguard.testkit.corpus import WORKLOADS, compile_c
from cgguard.testkit.sandbox import Sandbox

from .agentproc import AgentProcess
from .runner import Bench, by_itself, related
from .sampler import realtime

CLK_TCK = os.sysconf("SC_CLK_TCK")
CLASSIC_SECS = 6
REPEAT = 5  # runs of the short corpus workloads (nested, make) in one measured window

# The "before" figures (agent CPU in % of one core unless said otherwise).
BEFORE: dict[str, Any] = {
    "xargs_watched_cpu_pct": 26.1,
    "xargs_unwatched_cpu_pct": 15.4,
    "nested_cpu_pct": 25.5,
    "sequential_cpu_pct": 15.8,
    "forkloop_3k_cpu_pct": 14.9,  # measured at 3.3k forks/s
    "make_cpu_pct": 8.5,
    "idle_rss_mib": 48.9,
    "classic_verdict_to_populated0_ms": 13.0,
    "scrape_5000_removal_s": "0.08-0.28 -> 1.1-2.1",
}
# Upper bounds: (bound, unit of the goal text). Every cost target is "at most".
TARGETS: dict[str, tuple[float, str]] = {
    "xargs_watched_cpu_pct": (3, "%"), "xargs_unwatched_cpu_pct": (1, "%"),
    "forkloop_3k_cpu_pct": (4, "%"), "make_cpu_pct": (2, "%"),
    "idle_rss_mib": (35, "MiB"), "classic_verdict_to_populated0_ms": (5, "ms median"),
    "calm10k_readyz_s": (5, "s"), "calm10k_cpu_pct": (0.5, "%"), "calm10k_rss_mib": (80, "MiB"),
    "calm10k_new_cgroup_s": (1, "s"), "calm10k_new_cgroup_churn_overflow_s": (1, "s"),
    "calm10k_new_cgroup_overflow_s": (1, "s"),
}
LABELS = {
    "xargs_watched_cpu_pct": "xargs -P16 (3000 x true), watched cgroup: agent CPU %",
    "xargs_unwatched_cpu_pct": "xargs -P16 (3000 x true), unwatched cgroup: agent CPU %",
    "nested_cpu_pct": "nested xargs (x5), watched: agent CPU %",
    "sequential_cpu_pct": "sequential loop (2000 x true), watched: agent CPU %",
    "forkloop_3k_cpu_pct": "C fork loop paced at 3k forks/s, watched: agent CPU %",
    "make_cpu_pct": "make -j8 (x5 projects), watched: agent CPU %",
    "idle_rss_mib": "idle agent RSS MiB",
    "classic_verdict_to_populated0_ms": "classic bomb verdict -> populated 0 ms (median)",
    "calm10k_readyz_s": "10,000 calm cgroups (500 holding a process): start -> /readyz 200 s",
    "calm10k_cpu_pct": "10,000 calm cgroups: agent CPU %",
    "calm10k_rss_mib": "10,000 calm cgroups: RSS MiB",
    "calm10k_fds": "10,000 calm cgroups: open fds (bound: max_open_files + base)",
    "calm10k_new_cgroup_s": "10,000 calm cgroups: mkdir -> watched s",
    "calm10k_new_cgroup_churn_overflow_s": "after an inotify overflow from churn (~17,000 populated changes): mkdir -> watched s",
    "calm10k_new_cgroup_overflow_s": "after an inotify overflow from 16,400 new cgroups: mkdir -> watched s",
    "scrape_5000_removal_s": "5,000 cgroups, 8 scrapers: classic start -> populated 0 s (quiet -> scraped)",
}

# A steady process load, paced: fork (+ exec of /bin/true) and reap, RATE per second for SECS
# seconds (RATE 0: as fast as it goes). At most 64 children in flight, so it is harmless under
# any cap. Prints "spawned failed seconds".
PACED_SRC = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    int do_exec = argv[1][0] == 'e';
    double rate = atof(argv[2]), secs = atof(argv[3]);
    long spawned = 0, failed = 0; int inflight = 0;
    char *targv[] = {"true", NULL};
    double t0 = now(), t;
    while ((t = now()) - t0 < secs) {
        long due = rate > 0 ? (long)((t - t0) * rate) : spawned + 1;
        while (spawned < due) {
            while (inflight >= 64) { if (wait(NULL) > 0) inflight--; else break; }
            pid_t p = do_exec ? vfork() : fork();
            if (p == 0) { if (do_exec) execv("/bin/true", targv); _exit(0); }
            if (p < 0) { failed++; break; }
            spawned++; inflight++;
            while (inflight > 0 && waitpid(-1, NULL, WNOHANG) > 0) inflight--;
        }
        while (inflight > 0 && waitpid(-1, NULL, WNOHANG) > 0) inflight--;
        if (rate > 0) { struct timespec s = {0, 200000}; nanosleep(&s, NULL); }
    }
    while (inflight > 0 && wait(NULL) > 0) inflight--;
    printf("%ld %ld %.3f\n", spawned, failed, now() - t0);
    return 0;
}
"""

# One sleeping process in each of the first N calm cgroups: the parent forks them, each moves
# itself into its cgroup and execs sleep; "ready" once all have moved. Bounded by SECS.
SLEEPERS = r"""
import os, sys, time
base, n, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r, w = os.pipe()
for i in range(n):
    if os.fork() == 0:
        os.close(r)
        with open(f"{base}/c{i:05d}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        os.close(w)
        os.execv("/bin/sleep", ["sleep", secs])
os.close(w)
os.read(r, 1)  # EOF once every child has closed its end: all moved (or failed)
print("ready", flush=True)
for _ in range(n):
    os.wait()
"""

# 8 scraper threads in their own process (so they never share the bench sampler's GIL), each
# fetching /metrics back to back on a kept-alive connection until SECS pass. Prints the count.
SCRAPER = r"""
import http.client, sys, threading, time
port, secs, n = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
end = time.monotonic() + secs
count = [0] * n
def run(i):
    c = None
    while time.monotonic() < end:
        try:
            if c is None:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/metrics")
            c.getresponse().read()
            count[i] += 1
        except Exception:
            c = None
            time.sleep(0.01)
ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join()
print(sum(count))
"""


# -- reading the agent from outside ---------------------------------------------------------
def cpu_s(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def inotify_fdinfos(pid: int) -> list[str]:
    """/proc/<pid>/fdinfo files of the process's inotify descriptors."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                out.append(f"/proc/{pid}/fdinfo/{fd}")
        except OSError:
            continue
    return out


def watches_inode(fdinfos: list[str], ino: int) -> bool:
    """Does one of these inotify descriptors hold a watch on inode ``ino``?"""
    needle = f" ino:{ino:x} ".encode()
    for path in fdinfos:
        try:
            with open(path, "rb") as f:
                if needle in f.read():
                    return True
        except OSError:
            continue
    return False


def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            c.request("GET", path)
            return c.getresponse().status
        finally:
            c.close()
    except OSError:
        return None


class Window:
    """Agent CPU over a span of wall time, and the process events it heard meanwhile (every fork,
    exec and exit on the host: other work beside the bench costs the agent too)."""

    def __init__(self, pid: int, agent: AgentProcess | None = None):
        self.pid = pid
        self.agent = agent
        self.e0 = _pc(agent).get("received") if agent is not None else None
        self.c0, self.t0 = cpu_s(pid), time.monotonic()
        self.c1 = self.t1 = None
        self.heard_per_s: int | None = None

    def stop(self) -> Window:
        self.c1, self.t1 = cpu_s(self.pid), time.monotonic()
        if self.agent is not None and self.e0 is not None:
            e1 = _pc(self.agent).get("received")
            if e1 is not None:
                self.heard_per_s = round((e1 - self.e0) / max(self.t1 - self.t0, 1e-3))
        return self

    @property
    def secs(self) -> float:
        return (self.t1 or time.monotonic()) - self.t0

    @property
    def pct(self) -> float:
        return round(100 * ((self.c1 or cpu_s(self.pid)) - self.c0) / max(self.secs, 1e-3), 2)


def _pc(agent: AgentProcess) -> dict[str, Any]:
    try:
        return agent.status().get("connector") or {}
    except (OSError, ValueError):
        return {}


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(statistics.median(vals), 1) if vals else None


# -- pieces ---------------------------------------------------------------------------------
class Cost:
    """One run of the cost scenarios: a sandbox for watched work, one for unwatched work."""

    def __init__(self, fs: CgroupFS, quick: bool, log: Callable[[str], None] = print, cap: int = 1024):
        self.fs = fs
        self.quick = quick
        self.log = log
        self.cap = cap
        self.sb = Sandbox.create(fs, prefix="cgguard-bench-cost", cap=cap)
        self.bg = Sandbox.create(fs, prefix="cgguard-bench-bg", cap=cap)
        self.b = Bench(fs, self.sb, cap=cap, log=log)
        self.paced = compile_c(PACED_SRC, "paced", self.b.tmp) if shutil.which("gcc") else None
        self.env: dict[str, str] = {}
        self.out: dict[str, Any] = {"figures": {}, "runs": {}, "notes": []}

    def close(self) -> list[str]:
        left = self.sb.close() + self.bg.close()
        self.b.close()
        return left

    def fig(self, key: str, value: Any, **extra: Any) -> None:
        self.out["figures"][key] = value
        if extra:
            self.out["runs"][key] = extra

    def agent(self, label: str, watch: list[str], *flags: str, timeout: float = 60) -> AgentProcess:
        a = AgentProcess(os.path.join(self.b.tmp, f"agent-{label}"), watch, *flags, env=self.env)
        try:
            a.wait_ready(timeout=timeout)
        except Exception:
            a.stop()
            raise
        return a

    def tenants(self) -> list[str]:
        """Watch globs that make each cgroup directly under the sandbox a tenant of its own (as
        pods are): one agent then removes more bombs in a minute than one tenant's kill budget
        (5 per 60 s) allows, and none is frozen instead."""
        return [f"{self.sb.name}/*/**"]

    def stop(self, a: AgentProcess, label: str) -> None:
        rc = a.stop()
        if rc not in (0, None):
            self.out["notes"].append(f"agent ({label}) exited {rc}: {a.output(300)}")

    # -- fork load ------------------------------------------------------------------------
    def load(self, agent: AgentProcess, key: str, argv: list[str], cg: str, cwd: str | None = None,
             timeout: float = 120) -> dict[str, Any]:
        time.sleep(0.5)  # the agent back to calm after whatever ran before
        if cwd:
            argv = ["sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]
        pc0 = _pc(agent)
        win = Window(agent.proc.pid)
        w = self.sb.spawn(argv, cg, deadline_s=timeout, name=key, stdout=subprocess.PIPE)
        try:
            out = w.proc.communicate(timeout=timeout)[0].decode(errors="replace")
            rc = w.proc.returncode
        except subprocess.TimeoutExpired:
            out, rc = "", None
        win.stop()
        pc1 = _pc(agent)
        self.sb.kill(w)
        incs = related(agent.incidents(), cg)
        # The agent hears every process event on the host: other work running beside the bench
        # shows here, and its cost is in the CPU figure too.
        heard = pc1.get("received", 0) - pc0.get("received", 0)
        r = {"cpu_pct": win.pct, "secs": round(win.secs, 2), "exit": rc, "incidents": len(incs), "stdout": out.strip(),
             "events_heard_per_s": round(heard / max(win.secs, 1e-3))}
        self.fig(key, r["cpu_pct"], **r)
        self.log(f"  {key}: agent {r['cpu_pct']} % of a core over {r['secs']} s, {r['events_heard_per_s']} process "
                 f"events/s heard (exit {rc}, incidents {len(incs)})")
        return r

    def fork_loads(self) -> None:
        w_root = self.sb.cgroup("w")
        a = self.agent("load", [f"{w_root}/**"])
        try:
            # The processes stay out of the agent's sight until they run: the sandbox's
            # wrapper enters the cgroup, then execs the workload.
            xargs = WORKLOADS["xargs"].make(60)
            self.load(a, "xargs_watched_cpu_pct", xargs, self.sb.cgroup("w/xargs"))
            self.load(a, "xargs_unwatched_cpu_pct", xargs, self.bg.cgroup("u/xargs"))
            # nested and make finish in well under a second here: run each REPEAT times back to
            # back, one window, so that the 10 ms tick of /proc/<pid>/stat does not decide.
            nested = " ".join(WORKLOADS["nested"].make(60)[2:])
            self.load(a, "nested_cpu_pct", ["bash", "-c", f"for i in $(seq {REPEAT}); do {nested}; done"],
                      self.sb.cgroup("w/nested"))
            self.load(a, "sequential_cpu_pct", WORKLOADS["sequential"].make(60), self.sb.cgroup("w/sequential"))
            if self.paced:
                secs = 3 if self.quick else 5
                r = self.load(a, "forkloop_3k_cpu_pct", [self.paced, "fork", "3000", str(secs)], self.sb.cgroup("w/forkloop"))
                r["forks_per_s"] = _rate(r["stdout"])
            else:
                self.out["notes"].append("gcc is not installed: no paced fork loop")
            mk = WORKLOADS["make"]
            if mk.missing() is None:
                cwd = os.path.join(self.b.tmp, "make")
                assert mk.setup is not None
                for i in range(REPEAT):
                    mk.setup(os.path.join(cwd, f"p{i}"))
                cmd = " ".join(mk.make(60))
                self.load(a, "make_cpu_pct", ["bash", "-c", f"for d in p*; do (cd $d && {cmd}) || exit 1; done"],
                          self.sb.cgroup("w/make"), cwd=cwd)
            else:
                self.out["notes"].append(f"make: {mk.missing()}")
        finally:
            self.stop(a, "load")

    # -- idle -----------------------------------------------------------------------------
    def idle(self) -> None:
        cg = self.sb.cgroup("idle")
        a = self.agent("idle", [f"{cg}/**"])
        try:
            time.sleep(3.0)
            win = Window(a.proc.pid, a)
            time.sleep(3.0 if self.quick else 5.0)
            win.stop()
            self.fig("idle_rss_mib", rss_mib(a.proc.pid), cpu_pct=win.pct, fds=open_fds(a.proc.pid),
                     events_heard_per_s=win.heard_per_s)
            self.log(f"  idle: RSS {self.out['figures']['idle_rss_mib']} MiB, {win.pct} % of a core, "
                     f"{win.heard_per_s} process events/s heard")
        finally:
            self.stop(a, "idle")

    # -- the classic bomb -----------------------------------------------------------------
    def classic(self, agent: AgentProcess, label: str) -> dict[str, Any]:
        """One classic bomb in a fresh watched cgroup under a running agent."""
        wl = WORKLOADS["classic"]
        cg = self.b.trial_cgroup(label)
        w = smp = None
        r: dict[str, Any] = {"label": label}
        try:
            with realtime():
                w, smp, _, t0_wall = self.b.start_sampled(wl.make(CLASSIC_SECS), cg, CLASSIC_SECS + 3, "classic")
                smp.unpopulated.wait(CLASSIC_SECS + 1)
            inc = None
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                mine = related(agent.incidents(), cg)
                if mine and mine[0].get("result") != "detected":
                    inc = mine[0]
                    break
                time.sleep(0.02)
            s = smp.series
            r["peak"] = self.b.peak(w)
            r["start_to_populated0_ms"] = None if s.t_unpopulated is None else round(s.t_unpopulated * 1000, 1)
            if inc is None:
                r["result"] = "no incident"
            elif s.t_populated is None:
                # The sampler never ran while the bomb lived (other realtime work on the host):
                # nothing to time.
                r["result"] = f"{inc.get('detector')} -> {inc.get('action')}: {inc.get('result')} (not observed: the bench's sampler never saw it populated)"
                r["start_to_verdict_ms"] = round((inc["time"] - t0_wall) * 1000, 1)
            else:
                r["result"] = f"{inc.get('detector')} -> {inc.get('action')}: {inc.get('result')}"
                verdict_ms = (inc["time"] - t0_wall) * 1000
                r["start_to_verdict_ms"] = round(verdict_ms, 1)
                if r["start_to_populated0_ms"] is not None and not by_itself(wl, s.t_unpopulated):
                    r["verdict_to_populated0_ms"] = round(r["start_to_populated0_ms"] - verdict_ms, 1)
                else:
                    r["start_to_populated0_ms"] = None
                    r["result"] += " (ended at its own deadline)"
        finally:
            if w is not None:
                self.b.finish(w, smp, None)
            self.b.remove(cg)
        return r

    def classics(self, agent: AgentProcess, label: str, n: int) -> dict[str, Any]:
        runs = [self.classic(agent, f"{label}{i}") for i in range(1, n + 1)]
        summary = {
            "runs": runs,
            "start_to_populated0_ms": _median([r.get("start_to_populated0_ms") for r in runs]),
            "verdict_to_populated0_ms": _median([r.get("verdict_to_populated0_ms") for r in runs]),
            "peak": _median([r.get("peak") for r in runs]),
            "removed": sum(1 for r in runs if r.get("start_to_populated0_ms") is not None),
            "not_observed": sum(1 for r in runs if "not observed" in r.get("result", "")),
        }
        self.log(f"  classic/{label} x{n}: start->populated 0 {summary['start_to_populated0_ms']} ms, verdict->populated 0 "
                 f"{summary['verdict_to_populated0_ms']} ms, peak {summary['peak']}, removed {summary['removed']}/{n}")
        return summary

    def quiet_classic(self) -> None:
        a = self.agent("classic", self.tenants())
        try:
            q = self.classics(a, "quiet", 3 if self.quick else 5)
        finally:
            self.stop(a, "classic")
        self.out["quiet_classic"] = q
        self.fig("classic_verdict_to_populated0_ms", q["verdict_to_populated0_ms"])

    # -- busy node ------------------------------------------------------------------------
    def busy_node(self) -> None:
        if not self.paced:
            self.out["notes"].append("gcc is not installed: no busy-node scenario")
            return
        quiet = self.out.get("quiet_classic") or {}
        a = self.agent("busy", self.tenants())
        rows = []
        try:
            for rate in ("1000", "3000", "0"):
                rows.append(self._busy_rate(a, rate, quiet))
        finally:
            self.stop(a, "busy")
        self.out["busy_node"] = rows

    def _busy_rate(self, a: AgentProcess, rate: str, quiet: dict[str, Any]) -> dict[str, Any]:
        n_bombs = 2 if self.quick else 3
        pre_s = 2.0
        secs = pre_s + 0.5 + n_bombs * (CLASSIC_SECS + 2.5) + 1.0
        cg = self.bg.cgroup(f"u/exec{rate}")
        pc0 = _pc(a)
        w = self.bg.spawn([self.paced, "exec", rate, str(secs)], cg, deadline_s=secs + 30, name=f"exec{rate}",
                          stdout=subprocess.PIPE)
        time.sleep(0.3)
        # Background alone first: forks received against forks generated needs no bomb in it.
        win = Window(a.proc.pid, a)
        f0, t0 = _pc(a).get("forks", 0), time.monotonic()
        time.sleep(pre_s)
        f1, t1 = _pc(a).get("forks", 0), time.monotonic()
        win.stop()
        bombs = self.classics(a, f"busy{rate or 'max'}-", n_bombs)
        try:
            out = w.proc.communicate(timeout=secs + 30)[0].decode()
        except subprocess.TimeoutExpired:
            self.bg.kill(w)
            out = ""
        pc1 = _pc(a)
        self.bg.kill(w)
        spawned, failed, dt = _parse_paced(out)
        row: dict[str, Any] = {
            "rate": "max" if rate == "0" else int(rate),
            "achieved_per_s": round(spawned / dt) if dt else None,
            "failed_spawns": failed,
            "agent_cpu_pct_background": win.pct,
            "forks_received_per_s_background": round((f1 - f0) / (t1 - t0)),
            # Every spawn is a fork, an exec and an exit: what the load alone made the kernel send.
            "events_generated": 3 * spawned,
            "events_received": pc1.get("received", 0) - pc0.get("received", 0),
            "enobufs": pc1.get("overflows", 0) - pc0.get("overflows", 0),
            "seq_gaps": pc1.get("seq_gaps", 0) - pc0.get("seq_gaps", 0),
            "classic": bombs,
        }
        qs, qp = quiet.get("start_to_populated0_ms"), quiet.get("peak")
        row["removal_vs_quiet"] = round(bombs["start_to_populated0_ms"] / qs, 2) if qs and bombs["start_to_populated0_ms"] else None
        row["peak_vs_quiet"] = round(bombs["peak"] / qp, 2) if qp and bombs["peak"] else None
        self.log(f"  exec load {row['rate']}/s (achieved {row['achieved_per_s']}/s): agent {row['agent_cpu_pct_background']} %, "
                 f"events {row['events_received']} received / {row['events_generated']} generated by the load, "
                 f"ENOBUFS {row['enobufs']}, removal x{row['removal_vs_quiet']} peak x{row['peak_vs_quiet']} of quiet")
        return row

    # -- many calm cgroups ----------------------------------------------------------------
    def make_calm(self, sub: str, n: int) -> str:
        base = self.sb.cgroup(sub)
        for i in range(n):
            self.fs.mkdir(f"{base}/c{i:05d}")
        return base

    def drop_calm(self, base: str) -> None:
        for name in os.listdir(self.fs.abspath(base)):
            p = os.path.join(self.fs.abspath(base), name)
            if os.path.isdir(p):
                try:
                    os.rmdir(p)
                except OSError:
                    pass

    def calm_10k(self, n: int = 10_000, populated: int = 500) -> None:
        base = self.make_calm("calm10k", n)
        # 500 of them hold a sleeping process, as calm pods do; the rest are empty. Their cap
        # group (the v1 pids limit they are all charged to on a hybrid host) stays at a quarter
        # of its limit: at half of it every cgroup charged to it is sampled fast (pressure).
        holder = self.sb.spawn([sys.executable, "-c", SLEEPERS, self.fs.abspath(base), str(populated), "120"],
                               self.sb.cgroup("holder"), deadline_s=150, cap=2048, name="sleepers",
                               stdout=subprocess.PIPE)
        if holder.proc.stdout is None or holder.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the sleepers did not start")
        t_start = time.monotonic()
        a = AgentProcess(os.path.join(self.b.tmp, "agent-calm10k"), [f"{base}/**"], env=self.env)
        try:
            ready_s = None
            while time.monotonic() - t_start < 60 and a.proc.poll() is None:
                if http_status(a.port, "/readyz", 1.0) == 200:
                    ready_s = round(time.monotonic() - t_start, 2)
                    break
                time.sleep(0.02)
            if ready_s is None:
                raise RuntimeError(f"not ready within 60 s: {a.output(500)}")
            self.fig("calm10k_readyz_s", ready_s)
            st = a.wait_ready(timeout=30)
            watched = st.get("watched") or len(st.get("cgroups", []))
            # Calm cgroups back off from 1 s to the backoff maximum (16 s by default: 1+2+4+8 s to
            # get there); the steady state is measured after that.
            time.sleep(18.0)
            win = Window(a.proc.pid, a)
            time.sleep(5.0 if self.quick else 10.0)
            win.stop()
            self.fig("calm10k_cpu_pct", win.pct, watched=watched, secs=round(win.secs, 1),
                     events_heard_per_s=win.heard_per_s)
            self.fig("calm10k_rss_mib", rss_mib(a.proc.pid))
            fds = open_fds(a.proc.pid)
            self.fig("calm10k_fds", fds)
            self.log(f"  {watched} calm cgroups: ready in {ready_s} s, {win.pct} % of a core ({win.heard_per_s} process "
                     f"events/s heard), RSS {self.out['figures']['calm10k_rss_mib']} MiB, {fds} fds")
            self.fig("calm10k_new_cgroup_s", self._new_cgroup_s(a, f"{base}/new1"))
            # An inotify overflow from churn: the agent stopped while one process moves through
            # 9,000 of the calm cgroups (each move: populated 0 in one, populated 1 in the next),
            # more events than its queue holds; then a new cgroup appears.
            mover = self.sb.spawn(["sleep", "60"], f"{base}/c{n - 1:05d}", deadline_s=90, cap=8, name="mover")
            time.sleep(0.3)
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                for i in range(9_000):
                    self.fs.write(f"{base}/c{i:05d}", "cgroup.procs", str(mover.proc.pid))
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            self.fig("calm10k_new_cgroup_churn_overflow_s", self._new_cgroup_s(a, f"{base}/new3", timeout=30))
            self.sb.kill(mover)
            # The worst case: more new cgroups appear during the stop than the queue holds.
            burst = self.sb.cgroup("calm10k/burst")
            time.sleep(0.5)
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                for i in range(16_400):
                    self.fs.mkdir(f"{burst}/b{i:05d}")
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            self.fig("calm10k_new_cgroup_overflow_s", self._new_cgroup_s(a, f"{base}/new2", timeout=30))
            try:
                self.out["runs"]["calm10k_new_cgroup_overflow_s"] = {"inotify_overflows": a.status(timeout=30).get("inotify_overflows")}
            except (OSError, ValueError):
                pass
            figs = self.out["figures"]
            self.log(f"  new cgroup watched in {figs['calm10k_new_cgroup_s']} s; after an inotify overflow from churn in "
                     f"{figs['calm10k_new_cgroup_churn_overflow_s']} s, from 16,400 new cgroups in "
                     f"{figs['calm10k_new_cgroup_overflow_s']} s")
            self.drop_calm(burst)
        finally:
            self.stop(a, "calm10k")
            self.sb.kill(holder)
            self.drop_calm(base)

    def _new_cgroup_s(self, a: AgentProcess, rel: str, timeout: float = 10) -> float | None:
        """mkdir -> the agent holds an inotify watch on the new cgroup's cgroup.events (what it
        needs to follow it; its first sample comes with populated 1)."""
        infos = inotify_fdinfos(a.proc.pid)
        t0 = time.monotonic()
        self.fs.mkdir(rel)
        ino = os.stat(os.path.join(self.fs.abspath(rel), "cgroup.events")).st_ino
        while time.monotonic() - t0 < timeout:
            if watches_inode(infos, ino):
                return round(time.monotonic() - t0, 3)
            time.sleep(0.002)
        return None

    # -- scrape load ----------------------------------------------------------------------
    def scrape(self, n: int = 5000, clients: int = 8) -> None:
        base = self.make_calm("scrape", n)
        a = self.agent("scrape", self.tenants(), timeout=120)
        runs = 2 if self.quick else 3
        try:
            time.sleep(3.0)
            quiet = self.classics(a, "scrape-quiet", runs)
            secs = runs * (CLASSIC_SECS + 3.0) + 3.0
            sc = subprocess.Popen([sys.executable, "-c", SCRAPER, str(a.port), str(secs), str(clients)],
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            try:
                time.sleep(1.0)
                win = Window(a.proc.pid, a)
                loaded = self.classics(a, "scraped", runs)
                win.stop()
            finally:
                try:
                    scrapes = int(sc.communicate(timeout=secs + 30)[0] or 0)
                except (subprocess.TimeoutExpired, ValueError):
                    sc.kill()
                    scrapes = None
        finally:
            self.stop(a, "scrape")
            self.drop_calm(base)
        qs, ls = quiet["start_to_populated0_ms"], loaded["start_to_populated0_ms"]
        self.out["scrape"] = {"cgroups": n, "clients": clients, "quiet": quiet, "scraped": loaded, "scrapes": scrapes,
                              "scrapes_per_s": round(scrapes / secs, 1) if scrapes else None, "agent_cpu_pct": win.pct,
                              "ratio": round(ls / qs, 2) if qs and ls else None}
        self.fig("scrape_5000_removal_s", f"{_s(qs)} -> {_s(ls)}")
        self.log(f"  scrape load: removal {_s(qs)} s quiet -> {_s(ls)} s with {clients} scrapers "
                 f"({self.out['scrape']['scrapes_per_s']} scrapes/s, agent {win.pct} %)")


_MET = {True: "yes", False: "**NO**", None: "–"}


def _s(ms: float | None) -> str:
    return "–" if ms is None else f"{ms / 1000:.2f}"


def _parse_paced(out: str) -> tuple[int, int, float]:
    try:
        a, b, c = out.split()[:3]
        return int(a), int(b), float(c)
    except ValueError:
        return 0, 0, 0.0


def _rate(out: str) -> int | None:
    n, _, dt = _parse_paced(out)
    return round(n / dt) if dt else None


SCENARIOS = ("idle", "loads", "classic", "busy", "calm10k", "scrape")


# Wall time of a full run of every scenario (quick: about two thirds), for the bench's budget.
FULL_RUN_S = 300


def run(fs: CgroupFS, quick: bool = False, log: Callable[[str], None] = print, only: tuple[str, ...] = SCENARIOS,
        env: dict[str, str] | None = None) -> dict[str, Any]:
    """Every cost scenario, one after the other; a failed one is noted and the rest still run."""
    c = Cost(fs, quick, log)
    c.env = dict(env or {})
    c.out["sandbox_mode"] = c.sb.mode
    steps = {"idle": c.idle, "loads": c.fork_loads, "classic": c.quiet_classic, "busy": c.busy_node,
             "calm10k": c.calm_10k, "scrape": c.scrape}
    try:
        for name in only:
            try:
                steps[name]()
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one broken scenario must not leave the others unmeasured
                c.out["notes"].append(f"{name}: {type(e).__name__}: {e}")
                log(f"  {name}: ERROR {type(e).__name__}: {e}")
    finally:
        left = c.close()
        if left:
            c.out["notes"].append(f"left behind: {left}")
    c.out["targets"] = targets(c.out)
    return c.out


def targets(out: dict[str, Any]) -> dict[str, Any]:
    figs = out.get("figures", {})
    res: dict[str, Any] = {}
    for key, label in LABELS.items():
        v = figs.get(key)
        bound, unit = TARGETS.get(key, (None, ""))
        goal = "–" if bound is None else f"<= {bound:g} {unit}"
        met = None
        if key == "calm10k_fds" and v is not None:
            goal, met = "<= max_open_files (1024) + 64", v <= 1024 + 64
        elif key == "scrape_5000_removal_s":
            ratio = (out.get("scrape") or {}).get("ratio")
            goal, met = "within 10 % of quiet", None if ratio is None else ratio <= 1.1
        elif bound is not None and isinstance(v, (int, float)):
            met = v <= bound
        res[key] = {"label": label, "before": BEFORE.get(key), "goal": goal, "value": v, "met": met}
    for row in out.get("busy_node") or []:
        k = f"busy_{row['rate']}"
        ok = row["enobufs"] == 0 and (row["removal_vs_quiet"] or 99) <= 1.5 and (row["peak_vs_quiet"] or 99) <= 1.5
        res[k] = {"label": f"busy node, exec load {row['rate']}/s: 0 lost, removal and peak within 1.5x quiet",
                  "before": None, "goal": "0 lost, <= 1.5x", "met": ok,
                  "value": f"lost {row['enobufs']}, removal x{row['removal_vs_quiet']}, peak x{row['peak_vs_quiet']}"}
    return res


def markdown(out: dict[str, Any], machine_line: str = "") -> str:
    """The cost tables (appended to bench.md, and printed by ``cgguard bench --cost``)."""
    L = ["## Agent cost on busy nodes", ""]
    if machine_line:
        L += [f"Machine: {machine_line}.", ""]
    L += ["| figure | before (issue) | target | measured | met |", "| --- | --- | --- | --- | --- |"]
    for t in (out.get("targets") or {}).values():
        v = t["value"]
        L.append(f"| {t['label']} | {'–' if t['before'] is None else t['before']} | {t['goal']} | "
                 f"{'–' if v is None else v} | {_MET[t['met']]} |")
    L.append("")
    rows = out.get("busy_node") or []
    if rows:
        L += ["Busy node: exec load (fork + exec /bin/true) in a cgroup nothing watches, classic bombs in watched ones.", "",
              ("| load | achieved /s | agent CPU % (load alone) | forks heard /s | events received / generated by the load | "
               "ENOBUFS | classic start→populated 0 ms | verdict→populated 0 ms | peak | vs quiet (removal, peak) |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            c = r["classic"]
            L.append(f"| {r['rate']}/s | {r['achieved_per_s']} | {r['agent_cpu_pct_background']} | "
                     f"{r['forks_received_per_s_background']} | {r['events_received']} / {r['events_generated']} | {r['enobufs']} | "
                     f"{c['start_to_populated0_ms']} | {c['verdict_to_populated0_ms']} | {c['peak']} | "
                     f"{r['removal_vs_quiet']}×, {r['peak_vs_quiet']}× |")
        q = out.get("quiet_classic") or {}
        L += ["", (f"Quiet node: classic start→populated 0 {q.get('start_to_populated0_ms')} ms, verdict→populated 0 "
                   f"{q.get('verdict_to_populated0_ms')} ms, peak {q.get('peak')} (medians)."), ""]
    for n in out.get("notes") or []:
        L.append(f"- {n}")
    return "\n".join(L) + "\n"


def main(args: Any) -> int:
    """``cgguard bench --cost``: the cost scenarios alone; ``<out>/cost.md`` and ``cost.json``.

    Exit 0 when every scenario ran (missed targets are reported, not failed on), 1 when one
    broke, 2 when this host cannot run them.
    """
    import json

    from cgguard.kernel.cgroupfs import NoCgroup2, find_cgroup2_root

    from . import report

    if os.geteuid() != 0:
        print("cgguard: bench: needs root (it creates cgroups and runs contained bombs)", file=sys.stderr)
        return 2
    try:
        fs = CgroupFS(find_cgroup2_root())
    except NoCgroup2 as e:
        print(f"cgguard: bench: {e}", file=sys.stderr)
        return 2
    quick = bool(getattr(args, "quick", False))
    out_dir = getattr(args, "out", None) or "results"
    t0 = time.monotonic()
    out = run(fs, quick, log=lambda m: print(f"[bench] {m}", flush=True))
    out["machine"] = report.machine(fs, out.get("sandbox_mode", ""), 1024)
    out["duration_s"] = round(time.monotonic() - t0, 1)
    md = markdown(out, report.machine_line(out["machine"]))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "cost.json"), "w") as f:
        json.dump(out, f, indent=2, default=str)
        f.write("\n")
    with open(os.path.join(out_dir, "cost.md"), "w") as f:
        f.write(md)
    print()
    print(md)
    print(f"Took {out['duration_s']:.0f} s. Wrote {out_dir}/cost.md, {out_dir}/cost.json")
    broken = [n for n in out["notes"] if ": " in n and n.split(":", 1)[0] in SCENARIOS]
    return 1 if broken else 0
