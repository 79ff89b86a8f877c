"""A generated family of workload shapes, labelled by construction: bounded (benign) or a bomb.

The named corpus (:mod:`cgguard.testkit.corpus`) holds the shapes people thought of. This module
makes many more from a fixed seed, so the benchmark measures the detection model on shapes nobody
tuned it to. Each shape varies:

* **kind**: processes from a bash script (``bash``) or a C program (``c-proc``), threads from C
  pthreads (``c-thread``) or Python threads (``py-thread``);
* **topology**: a ``tree`` (every member starts ``fanout`` copies, ``depth`` generations deep) or
  a ``loop`` (one parent starting ``fanout`` children one after another, as
  ``while :; do sleep 30 & done`` does);
* **exec or not** (processes): a child re-runs the program with the generation counter as its
  argument (a new command line every generation), or is a forked copy;
* **wait or abandon**: parents wait for (join) their children, or exit at once while their
  children run on;
* **rate**: a pause before each generation (or each child of a loop) is started.

The class of a shape is decided by construction, against the task budget of the run (the limit
the agent reads, or its default budget):

* **bounded** (label ``benign``): its peak task count, computed from its parameters
  (:meth:`Shape.peak_bound`: every member it can ever start, alive or a zombie at once), stays
  under HALF the budget. :func:`generate` asserts it for every shape it makes.
* **unbounded** (label ``bomb``): it grows until something stops it. Only a deadline (read from a
  clock by every member) and, outside the test guest, the sandbox's kernel cap bound it. Bombs
  are drawn so that they reach the budget within a few seconds (:meth:`Shape.fill_estimate_s`),
  so a miss is a miss and not a bomb too slow to matter within the trial.

A limit of the detection model, not a tuning to this corpus: a bounded program that forks copies
which fork copies and *exit without waiting*, four or more generations deep
(``detect.lineage.min_generations``), looks exactly like the classic bomb until it stops, and the
model removes it by design (see cgguard/detect/lineage.py and MODEL.md). So bounded shapes that
abandon are generated at most ``MAX_BENIGN_ABANDON_DEPTH`` (3) generations deep -- that is the
model's documented limit, not a choice made to suit the agent. Bounded shapes that wait go as
deep as the budget allows.

Every member of a shape reads the deadline, so even a bomb with no guard and no cap ends by
itself. Run shapes only through :class:`cgguard.testkit.sandbox.Sandbox`. Bounded shapes count
their finished leaves in a file (one byte each), so a run can tell "completed" from "was killed".
"""

from __future__ import annotations

import math
import os
import random
import shutil
import stat
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from cgguard.testkit.corpus import compile_c

DEFAULT_SEED = 20251201
DEFAULT_COUNT = 104  # at least 100; more makes the full bench longer than 15 minutes here
MAX_BENIGN_ABANDON_DEPTH = 3  # the lineage rule's min_generations (4) minus one: see the docstring

KINDS = ("bash", "c-proc", "c-thread", "py-thread")
PROCESS_KINDS = ("bash", "c-proc")
RATES_MS = (0, 0, 10, 50, 150, 300)  # 0 twice: most runaways do not pause
HOLDS_MS = (200, 400, 700, 1000, 1500)

# A rough cost of starting one member, in seconds on a loaded 2-core host: used only to keep
# bombs fast enough to matter within their deadline and bounded shapes short.
SPAWN_S = {("bash", False): 0.002, ("bash", True): 0.005, ("c-proc", False): 0.0005,
           ("c-proc", True): 0.002, ("c-thread", False): 0.0002, ("py-thread", False): 0.0005}
MAX_BOMB_FILL_S = 4.0  # a bomb reaches a budget of 256 within this (estimated; in proportion for others)
MAX_BENIGN_RUN_S = 3.0  # a bounded shape finishes within this (estimated)


class ShapeError(Exception):
    pass


@dataclass(frozen=True)
class Shape:
    index: int
    kind: str  # bash | c-proc | c-thread | py-thread
    topology: str  # tree | loop
    label: str  # benign | bomb
    fanout: int  # tree: copies each member starts; loop: children (0: until stopped)
    depth: int  # tree: generations below the root (0: until stopped); loop: 1
    exec: bool  # processes only: a child re-runs the program with the generation as argument
    wait: bool  # parents wait for / join their children, else they exit at once
    rate_ms: int  # pause before each generation (tree) or each child (loop)
    hold_ms: int  # how long a leaf works before it exits (bombs: until the deadline)
    budget: int  # the task budget the shape was generated against

    @property
    def name(self) -> str:
        how = ("exec" if self.exec else "fork") if self.kind in PROCESS_KINDS else "thr"
        size = (f"f{self.fanout}-d{self.depth}" if self.topology == "tree" else f"n{self.fanout}") \
            if self.label == "benign" else (f"f{self.fanout}-unbounded" if self.topology == "tree" else "unbounded")
        return f"s{self.index:03d}-{self.kind}-{self.topology}-{how}-{'wait' if self.wait else 'abandon'}-{size}-r{self.rate_ms}"

    @property
    def bounded(self) -> bool:
        return self.label == "benign"

    @property
    def threads(self) -> bool:
        return self.kind in ("c-thread", "py-thread")

    def members(self) -> int:
        """Every member a bounded shape ever starts, the root included."""
        if not self.bounded:
            raise ShapeError(f"{self.name}: an unbounded shape has no member count")
        if self.topology == "loop":
            return 1 + self.fanout
        return sum(self.fanout ** k for k in range(self.depth + 1))

    def leaves(self) -> int:
        """Members that do the work and record it in the done file (bounded shapes)."""
        if self.topology == "loop":
            return self.fanout
        return self.fanout ** self.depth

    def peak_bound(self) -> int:
        """The most tasks a bounded shape can hold at once, from its parameters alone.

        Every member is one task (a process, or a thread of one process) and each is started
        once; a member that exited may stay a zombie until reaped, and zombies are charged to
        the pids controller too, so the bound is the total number of members. Nothing else is
        started: the scripts pause and count with shell builtins, not with sleep or cat.
        """
        return self.members()

    def abandoning_generations(self) -> int:
        """Generations of members that exit while their children run on (what lineage counts)."""
        if self.wait:
            return 0
        return self.depth if self.topology == "tree" else 1

    def fill_estimate_s(self) -> float:
        """Bombs: a rough time to reach the budget (generations x pause, or members x spawn cost)."""
        spawn = SPAWN_S[(self.kind, self.exec)]
        serial = self.budget * spawn / 2  # two cores start members in parallel at best
        if self.topology == "loop":
            return self.budget * (self.rate_ms / 1000 + spawn)
        if self.fanout == 1:  # a chain of waiting parents grows by one per generation
            gens = self.budget
        else:  # waiting or abandoning, the live members multiply by the fan-out every generation
            gens = math.ceil(math.log(self.budget) / math.log(self.fanout))
        return max(gens * (self.rate_ms / 1000 + spawn), serial)

    def run_estimate_s(self) -> float:
        """Bounded shapes: a rough run time (pauses along the deepest path, then the leaf's work)."""
        spawn = SPAWN_S[(self.kind, self.exec)]
        if self.topology == "loop":
            return self.fanout * (self.rate_ms / 1000 + spawn) + self.hold_ms / 1000
        return self.depth * (self.rate_ms / 1000 + spawn * self.fanout) + self.hold_ms / 1000

    def deadline_s(self) -> int:
        """Seconds every member of the shape lives at most (its own clock)."""
        if self.bounded:
            return max(10, math.ceil(4 * self.run_estimate_s() + 6))
        return min(30, max(8, math.ceil(3 * self.fill_estimate_s() + 5)))

    def describe(self) -> str:
        how = ("children exec the program again (generation as argument)" if self.exec else "forked copies") \
            if self.kind in PROCESS_KINDS else f"{'pthreads' if self.kind == 'c-thread' else 'Python threads'}"
        if self.topology == "tree":
            size = f"fan-out {self.fanout}, " + (f"depth {self.depth}" if self.bounded else "no depth limit")
        else:
            size = f"{self.fanout} children from one parent" if self.bounded else "one parent starting children forever"
        par = ("parents wait" if self.wait else "parents exit at once") if self.topology == "tree" else \
            ("the parent waits" if self.wait else "the parent exits at once")
        per = "generation" if self.topology == "tree" else "child"
        pause = f", {self.rate_ms} ms pause per {per}" if self.rate_ms else ""
        bound = f"; bounded at {self.peak_bound()} tasks (budget {self.budget})" if self.bounded else ""
        return f"{self.kind} {self.topology}: {size}, {how}, {par}{pause}{bound}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"] = self.name
        if self.bounded:
            d["peak_bound"] = self.peak_bound()
        return d


# -- the generator -------------------------------------------------------------------------------
def cells() -> list[tuple[str, str, bool, bool, str]]:
    """Every (kind, topology, exec, wait, label) combination the family covers, in a fixed order."""
    out = []
    for kind in KINDS:
        topologies = ("tree", "loop") if kind != "c-proc" else ("tree",)
        for topology in topologies:
            for ex in ((False, True) if kind in PROCESS_KINDS else (False,)):
                for wait in (True, False):
                    for label in ("benign", "bomb"):
                        out.append((kind, topology, ex, wait, label))
    return out


def _check(s: Shape) -> str | None:
    """Why a drawn shape is not a member of its class (None: it is)."""
    if s.fanout < 1 and not (s.topology == "loop" and not s.bounded):
        return "no children"
    if s.bounded:
        if s.peak_bound() * 2 >= s.budget:
            return f"peak bound {s.peak_bound()} not under half the budget {s.budget}"
        if not s.wait and s.abandoning_generations() > MAX_BENIGN_ABANDON_DEPTH:
            return "abandons deeper than the model's documented limit"
        if s.run_estimate_s() > MAX_BENIGN_RUN_S:
            return "runs too long"
        if s.depth < 1:
            return "no generations"
    else:
        if s.topology == "tree" and s.fanout < 2 and not s.wait:
            return "a chain that abandons does not grow"
        if s.fill_estimate_s() > MAX_BOMB_FILL_S * max(1.0, s.budget / 256):
            return "grows too slowly to reach its budget within a trial"
    return None


def _draw(rng: random.Random, index: int, cell: tuple[str, str, bool, bool, str], budget: int) -> Shape:
    kind, topology, ex, wait, label = cell
    half = budget // 2
    for _ in range(500):
        rate = rng.choice(RATES_MS)
        hold = rng.choice(HOLDS_MS)
        if label == "benign":
            if topology == "loop":
                fanout, depth = rng.randint(2, max(2, half - 2)), 1
            else:
                fanout = rng.choice((1, 2, 2, 3, 3, 4, 5, 6, 8, 10))
                cap_depth = MAX_BENIGN_ABANDON_DEPTH if not wait else 64
                # The deepest tree of this fan-out that stays under half the budget.
                deepest = 0
                while deepest < cap_depth and sum(fanout ** k for k in range(deepest + 2)) * 2 < budget:
                    deepest += 1
                if deepest < 1:
                    continue
                depth = rng.randint(max(1, deepest // 2), deepest)
        else:
            hold = 0
            depth = 0 if topology == "tree" else 1
            if topology == "loop":
                fanout = 0
                rate = rng.choice((0, 0, 2, 5, 10))
            else:
                fanout = rng.choice((1, 2, 2, 3, 4, 6)) if wait else rng.choice((2, 2, 3, 4, 6))
        s = Shape(index, kind, topology, label, fanout, depth, ex, wait, rate, hold, budget)
        if _check(s) is None:
            return s
    raise ShapeError(f"no valid {label} {kind} {topology} shape for budget {budget} after 500 draws")


def generate(seed: int = DEFAULT_SEED, count: int = DEFAULT_COUNT, budget: int = 256) -> list[Shape]:
    """``count`` shapes from ``seed``, labelled, cycling over every cell of :func:`cells` so that
    each combination is covered about equally. The same seed, count and budget give the same
    family. Raises ShapeError if a shape does not belong to its class (a generator bug)."""
    if budget < 16:
        raise ShapeError(f"budget {budget}: too small for bounded shapes to mean anything")
    rng = random.Random(seed)
    cs = cells()
    shapes = [_draw(rng, i, cs[i % len(cs)], budget) for i in range(count)]
    for s in shapes:
        why = _check(s)
        if why is not None:
            raise ShapeError(f"{s.name}: {why}")
        if s.bounded:
            assert s.peak_bound() < budget / 2, f"{s.name}: bound {s.peak_bound()} >= half of {budget}"
            assert s.wait or s.abandoning_generations() <= MAX_BENIGN_ABANDON_DEPTH
    return shapes


def quick_subset(shapes: list[Shape]) -> list[Shape]:
    """One shape per (kind, wait, label): 16 trials that still cover every kind of behaviour."""
    seen: set[tuple[str, bool, str]] = set()
    out = []
    for s in shapes:
        key = (s.kind, s.wait, s.label)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


# -- the programs --------------------------------------------------------------------------------
# The bash program. Parameters come first (baked in per shape); the pause is `read -t` on a FIFO
# nobody writes (a builtin: no sleep process to count), a leaf's work is a pause and one byte
# appended to the done file (a builtin echo). ``$1`` is the generation, ``$2`` the deadline in
# epoch seconds; a leaf of a loop is started as generation "leaf".
BASH_BODY = r"""
exec 9<>"$FIFO" || exit 90
pause() { read -t "$1" -u 9 _; return 0; }
start() {  # one child: a forked copy running node, or the program again with the new argument
    if (( EXEC )); then bash "$0" "$1" "$D" & else node "$1" & fi
}
leaf() {
    if (( HOLD_MS > 0 )); then pause "$HOLD"; else
        while (( EPOCHSECONDS < D )); do pause 1; done  # a bomb's child lives until the deadline
    fi
    [ -n "$DONE" ] && echo >> "$DONE"
    exit 0
}
node() {
    local g=$1 i=0
    (( EPOCHSECONDS < D )) || exit 0
    [ "$g" = leaf ] && leaf
    if [ "$TOPOLOGY" = loop ]; then
        while (( EPOCHSECONDS < D )) && (( COUNT == 0 || i < COUNT )); do
            start leaf
            i=$((i + 1))
            (( RATE_MS > 0 )) && pause "$RATE"
        done
    else
        (( DEPTH > 0 && g >= DEPTH )) && leaf
        (( RATE_MS > 0 )) && pause "$RATE"
        for ((i = 0; i < FANOUT; i++)); do start $((g + 1)); done
    fi
    (( WAIT )) && wait
    exit 0
}
node "$1"
"""

# The C program: processes (fork, optionally exec'ing itself with the next generation) or
# pthreads. argv: mode(p|t) topology(tree|loop) fanout depth wait exec rate_ms hold_ms
# deadline_ms(epoch) done_path generation. Bounded shapes treat a failed fork as an error (exit 3);
# bombs retry until the deadline, as bombs do.
C_SRC = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char *self_path, *done_path, *topology;
static int threads_mode, fanout, depth, do_wait, do_exec, rate_ms, hold_ms;
static long long deadline_ms;
static pthread_attr_t attr;
static atomic_int failures;

static long long now_ms(void) {
    struct timeval tv; gettimeofday(&tv, NULL);
    return (long long)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}
static void pause_ms(long ms) { struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L}; nanosleep(&ts, NULL); }
static int bounded(void) { return hold_ms > 0; }

static void leaf_work(void) {
    if (bounded()) pause_ms(hold_ms);
    else while (now_ms() < deadline_ms) pause_ms(100);
    if (done_path[0]) { int fd = open(done_path, O_WRONLY | O_APPEND | O_CREAT, 0644); if (fd >= 0) { write(fd, "\n", 1); close(fd); } }
}

static void node(long g);

static void *thread_node(void *arg) { node((long)(intptr_t)arg); return NULL; }

/* Start one child member of generation g (g < 0: a loop's leaf). Returns 0, or -1 if given up. */
static int start(long g, pid_t *pid_out, pthread_t *tid_out) {
    for (;;) {
        if (now_ms() >= deadline_ms) return -1;
        if (threads_mode) {
            if (pthread_create(tid_out, &attr, thread_node, (void *)(intptr_t)g) == 0) return 0;
        } else {
            pid_t p = fork();
            if (p == 0) {
                if (do_exec) {
                    char gen[32], dl[32], fo[16], de[16], wa[4], ex[4], ra[16], ho[16];
                    snprintf(gen, sizeof gen, "%ld", g); snprintf(dl, sizeof dl, "%lld", deadline_ms);
                    snprintf(fo, sizeof fo, "%d", fanout); snprintf(de, sizeof de, "%d", depth);
                    snprintf(wa, sizeof wa, "%d", do_wait); snprintf(ex, sizeof ex, "%d", do_exec);
                    snprintf(ra, sizeof ra, "%d", rate_ms); snprintf(ho, sizeof ho, "%d", hold_ms);
                    char *argv[] = {self_path, "p", topology, fo, de, wa, ex, ra, ho, dl, done_path, gen, NULL};
                    execv(self_path, argv);
                    _exit(4);
                }
                node(g);
                _exit(0);
            }
            if (p > 0) { *pid_out = p; return 0; }
        }
        if (bounded()) { atomic_fetch_add(&failures, 1); return -1; }
        pause_ms(5);  /* a bomb at its limit keeps trying */
    }
}

static void finish(void) {
    /* Abandoning: this member is done; its children run on. */
    if (threads_mode) pthread_exit(NULL);
    _exit(atomic_load(&failures) ? 3 : 0);
}

static void node(long g) {
    if (now_ms() >= deadline_ms) finish();
    if (g < 0) { leaf_work(); if (threads_mode) return; _exit(0); }
    int n = 0, cap = 0;
    pid_t *pids = NULL; pthread_t *tids = NULL;
    int loop = strcmp(topology, "loop") == 0;
    if (!loop && depth > 0 && g >= depth) { leaf_work(); if (threads_mode) return; _exit(0); }
    if (!loop && rate_ms) pause_ms(rate_ms);
    for (int i = 0; loop ? (fanout == 0 || i < fanout) : i < fanout; i++) {
        if (now_ms() >= deadline_ms) break;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            pids = realloc(pids, cap * sizeof *pids); tids = realloc(tids, cap * sizeof *tids);
        }
        if (start(loop ? -1 : g + 1, &pids[n], &tids[n]) == 0) n++;
        if (loop && rate_ms) pause_ms(rate_ms);
    }
    if (do_wait) {
        for (int i = 0; i < n; i++) {
            if (threads_mode) pthread_join(tids[i], NULL);
            else { int st; while (waitpid(pids[i], &st, 0) < 0 && errno == EINTR) {} if (!WIFEXITED(st) || WEXITSTATUS(st)) atomic_fetch_add(&failures, 1); }
        }
    } else if (threads_mode) {
        for (int i = 0; i < n; i++) pthread_detach(tids[i]);
    }
    free(pids); free(tids);
    if (threads_mode && g > 0) return;
    finish();
}

int main(int argc, char **argv) {
    if (argc < 12) { fprintf(stderr, "usage: shape p|t tree|loop fanout depth wait exec rate hold deadline_ms done gen\n"); return 2; }
    self_path = argv[0]; threads_mode = argv[1][0] == 't'; topology = argv[2];
    fanout = atoi(argv[3]); depth = atoi(argv[4]); do_wait = atoi(argv[5]); do_exec = atoi(argv[6]);
    rate_ms = atoi(argv[7]); hold_ms = atoi(argv[8]); deadline_ms = atoll(argv[9]); done_path = argv[10];
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    node(atol(argv[11]));
    return 0;
}
"""

# Python threads. argv: topology fanout depth wait rate_ms hold_ms deadline_s done_path.
PY_SRC = r"""
import sys, threading, time
topology, fanout, depth, wait, rate_ms, hold_ms = sys.argv[1], *map(int, sys.argv[2:7])
deadline, done = float(sys.argv[7]), sys.argv[8]
threading.stack_size(256 * 1024)
bounded = hold_ms > 0
failed = []

def leaf():
    if bounded:
        time.sleep(hold_ms / 1000)
    else:
        while time.time() < deadline:
            time.sleep(0.1)
    if done:
        with open(done, "a") as f:
            f.write("\n")

def start(target, *args):
    while time.time() < deadline:
        t = threading.Thread(target=target, args=args)
        try:
            t.start()
            return t
        except RuntimeError:
            if bounded:
                failed.append(1)
                return None
            time.sleep(0.005)  # a bomb at its limit keeps trying
    return None

def node(g):
    if time.time() >= deadline:
        return
    kids = []
    if topology == "loop":
        i = 0
        while time.time() < deadline and (fanout == 0 or i < fanout):
            kids.append(start(leaf))
            i += 1
            if rate_ms:
                time.sleep(rate_ms / 1000)
    else:
        if depth and g >= depth:
            leaf()
            return
        if rate_ms:
            time.sleep(rate_ms / 1000)
        kids = [start(node, g + 1) for _ in range(fanout)]
    if wait:
        for t in kids:
            if t is not None:
                t.join()

node(0)
if failed:
    sys.exit(3)
"""


class ShapeKit:
    """Builds the programs once into ``workdir`` and gives each shape its command line."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.fifo = os.path.join(workdir, "pause.fifo")
        if not os.path.exists(self.fifo):
            os.mkfifo(self.fifo, 0o600)
        self.py = os.path.join(workdir, "shape_threads.py")
        with open(self.py, "w") as f:
            f.write(PY_SRC)
        self._c: str | None = None

    @staticmethod
    def missing(shape: Shape) -> str | None:
        if shape.kind in ("c-proc", "c-thread") and shutil.which("gcc") is None:
            return "gcc is not installed"
        if shape.kind == "bash" and shutil.which("bash") is None:
            return "bash is not installed"
        return None

    def c_binary(self) -> str:
        if self._c is None:
            # No -pthread needed: glibc >= 2.34 has the thread functions in libc itself.
            self._c = compile_c(C_SRC, "shape", self.workdir)
        return self._c

    def script(self, s: Shape) -> str:
        path = os.path.join(self.workdir, f"{s.name}.sh")
        if not os.path.exists(path):
            params = {
                "FIFO": self.fifo, "TOPOLOGY": s.topology, "FANOUT": s.fanout, "COUNT": s.fanout,
                "DEPTH": s.depth, "EXEC": int(s.exec), "WAIT": int(s.wait), "RATE_MS": s.rate_ms,
                "RATE": f"{s.rate_ms / 1000:.3f}", "HOLD_MS": s.hold_ms, "HOLD": f"{s.hold_ms / 1000:.3f}",
            }
            head = "".join(f"{k}={v}\n" for k, v in params.items())
            with open(path, "w") as f:
                f.write(f"#!/bin/bash\n# cgguard bench shape {s.name}: {s.describe()}\n{head}D=$2\nDONE=$DONE_FILE\n")
                f.write(BASH_BODY)
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        return path

    def argv(self, s: Shape, secs: float, done: str = "") -> list[str]:
        """The command line of one run of ``s`` that ends by itself ``secs`` from now at the latest.
        Bounded shapes append one byte per finished leaf to ``done``."""
        deadline = time.time() + secs
        if s.kind == "bash":
            # DONE_FILE through env would need env plumbing in Sandbox.spawn: pass it with env(1).
            return ["env", f"DONE_FILE={done}", "bash", self.script(s), "0", str(int(deadline))]
        if s.kind in ("c-proc", "c-thread"):
            return [self.c_binary(), "t" if s.kind == "c-thread" else "p", s.topology, str(s.fanout), str(s.depth),
                    str(int(s.wait)), str(int(s.exec)), str(s.rate_ms), str(s.hold_ms), str(int(deadline * 1000)),
                    done, "0"]
        return [sys.executable, self.py, s.topology, str(s.fanout), str(s.depth), str(int(s.wait)),
                str(s.rate_ms), str(s.hold_ms), f"{deadline:.3f}", done]
