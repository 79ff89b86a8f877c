"""The corpus: fork bombs and heavy-but-legitimate forkers, shared by tests, demo and bench.

Every bomb here is bounded by construction: it stops forking at a deadline (``secs``) it reads
from a builtin clock (bash ``EPOCHSECONDS``, Python ``time``), so even with no guard and no cap
it ends. Run them only through :class:`cgguard.testkit.sandbox.Sandbox`, which adds the kernel cap.
Benign workloads are bounded by their own work and finish by themselves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

PY = sys.executable


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "bomb" or "benign"
    make: Callable[[int], list[str]]  # secs -> argv
    about: str
    needs: tuple[str, ...] = ()
    setup: Callable[[str], None] | None = None  # prepares files in a work dir
    threads: bool = False  # grows threads rather than processes
    zombies: bool = False  # only pids.current (pure v2) can see it
    extra: dict = field(default_factory=dict)

    def missing(self) -> str | None:
        for tool in self.needs:
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        return None


def _bash(script: str) -> Callable[[int], list[str]]:
    return lambda secs: ["bash", "-c", script.replace("SECS", str(secs))]


def _py(code: str) -> Callable[[int], list[str]]:
    return lambda secs: [PY, "-c", code.replace("SECS", str(secs))]


# -- bombs ---------------------------------------------------------------------------------------
CLASSIC = "D=$((EPOCHSECONDS+SECS)); :(){ (( EPOCHSECONDS < D )) && { :|:& }; };:"
SEED = "D=$((EPOCHSECONDS+SECS)); forkbomb(){ (( EPOCHSECONDS < D )) && { forkbomb|forkbomb & }; }; forkbomb"
SLOW = "D=$((EPOCHSECONDS+SECS)); f(){ sleep 0.3; (( EPOCHSECONDS < D )) && { f & f & }; wait; }; f"
PY_FORK = """
import os, time
d = time.time() + SECS
while time.time() < d:
    try:
        os.fork()
    except OSError:
        time.sleep(0.05)
"""
THREAD_BOMB = """
import threading, time
d = time.time() + SECS
def f():
    while time.time() < d:
        try:
            threading.Thread(target=f, daemon=True).start()
            threading.Thread(target=f, daemon=True).start()
            break
        except RuntimeError:
            time.sleep(0.05)
    time.sleep(max(0.0, d - time.time()))
f()
"""
SETSID = """
import os, time
d = time.time() + SECS
def member():
    # Each member keeps starting members through a double fork with setsid(): the intermediate
    # exits at once, so every member is orphaned and leads a session of its own.
    while time.time() < d:
        try:
            pid = os.fork()
        except OSError:
            time.sleep(0.05)
            continue
        if pid == 0:
            os.setsid()
            try:
                if os.fork() == 0:
                    member()
                    os._exit(0)
            except OSError:
                pass
            os._exit(0)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
member()
"""
ZOMBIES = """
import os, time
d = time.time() + SECS
n = 0
while time.time() < d:
    try:
        if os.fork() == 0:
            os._exit(0)  # never reaped: a zombie pile
        n += 1
    except OSError:
        time.sleep(0.05)
time.sleep(max(0.0, d - time.time()))
"""

C_FORK_SRC = r"""
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    time_t d = time(NULL) + (argc > 1 ? atoi(argv[1]) : 5);
    while (time(NULL) < d) fork();
    return 0;
}
"""


C_THREADS_SRC = r"""
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
/* A native thread bomb: every thread keeps starting threads until the deadline (small stacks, so
   memory is not what stops it). Threads never exit early: nothing for lineage to see. */
static time_t d;
static pthread_attr_t attr;
static void *grow(void *arg) {
    pthread_t t;
    while (time(NULL) < d)
        if (pthread_create(&t, &attr, grow, NULL) != 0) usleep(5000);
    return arg;
}
int main(int argc, char **argv) {
    d = time(NULL) + (argc > 1 ? atoi(argv[1]) : 5);
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    grow(NULL);
    return 0;
}
"""

MERGESORT_SRC = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
/* Fork-based parallel merge sort: each level forks a child for one half, sorts the other half
   itself, waits for the child and merges (the array is shared memory). Bounded: 2^depth leaves. */
static int *a, *tmp;
static void merge(int lo, int mid, int hi) {
    int i = lo, j = mid, k = lo;
    while (i < mid && j < hi) tmp[k++] = a[i] <= a[j] ? a[i++] : a[j++];
    while (i < mid) tmp[k++] = a[i++];
    while (j < hi) tmp[k++] = a[j++];
    memcpy(a + lo, tmp + lo, (hi - lo) * sizeof *a);
}
static void sort(int lo, int hi, int depth) {
    if (hi - lo < 2) return;
    int mid = lo + (hi - lo) / 2;
    if (depth > 0) {
        pid_t p = fork();
        if (p < 0) { perror("fork"); exit(3); }
        if (p == 0) { sort(lo, mid, depth - 1); usleep(200000); _exit(0); }
        sort(mid, hi, depth - 1);
        int st;
        if (waitpid(p, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) exit(3);
    } else {
        sort(lo, mid, 0);
        sort(mid, hi, 0);
    }
    merge(lo, mid, hi);
}
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1 << 18, depth = argc > 2 ? atoi(argv[2]) : 6;
    a = mmap(NULL, n * sizeof *a, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    tmp = mmap(NULL, n * sizeof *a, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    srand(42);
    for (int i = 0; i < n; i++) a[i] = rand();
    sort(0, n, depth);
    for (int i = 1; i < n; i++) if (a[i - 1] > a[i]) { fprintf(stderr, "not sorted at %d\n", i); return 1; }
    return 0;
}
"""


def compile_c(source: str, name: str, workdir: str | None = None) -> str:
    """Compile a one-file C program once into ``workdir`` (or a temp dir); returns its path."""
    workdir = workdir or tempfile.mkdtemp(prefix=f"cgguard-{name}-")
    src, out = os.path.join(workdir, f"{name}.c"), os.path.join(workdir, name)
    if not os.path.exists(out):
        with open(src, "w") as f:
            f.write(source)
        subprocess.run(["gcc", "-O2", "-o", out, src], check=True, capture_output=True)
    return out


LEADERLESS_SRC = r"""
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
/* leaderless N SECS [grow]: N threads that sleep out SECS seconds, then the main thread exits
   alone (pthread_exit): the thread group lives on behind a zombie leader, which /proc and
   cgroup.kill treat apart. With "grow", a spawner thread keeps adding threads (retrying when the
   kernel refuses) until the deadline: a thread bomb without a main thread. Bounded: everything
   ends at the deadline, and a kernel limit holds the count. */
static time_t deadline;
static void *sleeper(void *a) { (void)a; while (time(0) < deadline) sleep(1); return 0; }
static void *spawner(void *a) {
    (void)a;
    while (time(0) < deadline) { pthread_t t; if (pthread_create(&t, 0, sleeper, 0)) usleep(2000); }
    return 0;
}
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 8;
    deadline = time(0) + (argc > 2 ? atoi(argv[2]) : 30);
    pthread_attr_t attr; pthread_attr_init(&attr); pthread_attr_setstacksize(&attr, 65536);
    for (int i = 0; i < n; i++) { pthread_t t; if (pthread_create(&t, &attr, sleeper, 0)) break; }
    if (argc > 3) { pthread_t t; pthread_create(&t, &attr, spawner, 0); }
    pthread_exit(0);
}
"""


def leaderless_binary(workdir: str | None = None) -> str:
    """A thread group whose main thread has exited, compiled (see LEADERLESS_SRC)."""
    return compile_c(LEADERLESS_SRC, "leaderless", workdir)


def c_fork_binary(workdir: str | None = None) -> str:
    """The C fork-loop bomb, compiled."""
    return compile_c(C_FORK_SRC, "cbomb", workdir)


def c_threads_binary(workdir: str | None = None) -> str:
    """The native pthread bomb, compiled."""
    return compile_c(C_THREADS_SRC, "cthreads", workdir)


def mergesort_binary(workdir: str | None = None) -> str:
    """The fork-based merge sort, compiled."""
    return compile_c(MERGESORT_SRC, "mergesort", workdir)


# A one-parent fork loop: the parent never exits and its children sleep on, so there is no
# abandonment for lineage to see; only the budget rules can tell it from a job starter.
FORK_LOOP = "D=$((EPOCHSECONDS+SECS)); while (( EPOCHSECONDS < D )); do sleep 30 & done"
# A script that starts itself twice with a new command line each generation (the generation is
# its argument, so no two generations look alike) and exits at once.
EXEC_CHAIN = (
    "export D=$((EPOCHSECONDS+SECS)) S='(( EPOCHSECONDS < D )) || exit 0; n=$(( $1 + 1 )); "
    "bash -c \"$S\" \"chain-$n\" $n & bash -c \"$S\" \"chain-$n\" $n & exit 0'; bash -c \"$S\" chain-0 0"
)


# -- benign --------------------------------------------------------------------------------------
def make_project(workdir: str, files: int = 24) -> None:
    """A generated C project for 'make -j' (compile + link: make -> sh -> gcc -> cc1/as/ld)."""
    os.makedirs(workdir, exist_ok=True)
    objs = []
    for i in range(files):
        with open(os.path.join(workdir, f"f{i}.c"), "w") as f:
            f.write(f"int f{i}(int x) {{ int s = 0; for (int k = 0; k < x; k++) s += k * {i}; return s; }}\n")
        objs.append(f"f{i}.o")
    with open(os.path.join(workdir, "main.c"), "w") as f:
        f.write("int f0(int);\nint main(void) { return f0(3) > 100; }\n")
    with open(os.path.join(workdir, "Makefile"), "w") as f:
        f.write(f"OBJS = {' '.join(objs)} main.o\nprog: $(OBJS)\n\tgcc -o $@ $(OBJS)\n%.o: %.c\n\tgcc -O1 -c $< -o $@\n")


POOL = """
import multiprocessing as mp
def work(i):
    return sum(range(2000 + i))
if __name__ == "__main__":
    with mp.get_context("fork").Pool(8, maxtasksperchild=2) as p:
        p.map(work, range(400), chunksize=1)
"""
PREFORK = """
import os, socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(64)
kids = []
for _ in range(32):
    pid = os.fork()
    if pid == 0:
        s.settimeout(0.2)
        end = time.time() + 2.5
        while time.time() < end:
            try:
                c, _ = s.accept(); c.close()
            except OSError:
                pass
        os._exit(0)
    kids.append(pid)
for _ in range(50):
    c = socket.create_connection(s.getsockname()); c.close()
for pid in kids:
    os.waitpid(pid, 0)
"""
TEST_RUNNER = """
import subprocess, sys
from concurrent.futures import ThreadPoolExecutor
def test(i):
    return subprocess.run([sys.executable, "-c", "import os; os.system('true')"]).returncode
with ThreadPoolExecutor(8) as ex:
    assert all(rc == 0 for rc in ex.map(test, range(48)))
"""
BOUNDED_TREE = (
    "t(){ local d=$1; if (( d > 0 )); then for i in 1 2 3 4 5; do t $((d-1)) & done; fi; sleep 2; wait; }; t 3"
)
# A bounded binary worker tree, depth 6: 127 workers (and their sleeps), every parent waits.
BINARY_TREE = "t(){ local d=$1; if (( d > 0 )); then t $((d-1)) & t $((d-1)) & fi; sleep 1; wait; }; t 6"
# A recursive directory walk with a subshell per directory (in parallel; each waits for its own).
DIRWALK = 'shopt -s nullglob; walk(){ local d; for d in "$1"/*/; do ( : > "$d.seen"; walk "${d%/}" ) & done; wait; }; walk .'


def make_dirtree(workdir: str, fanout: int = 4, depth: int = 3) -> None:
    """A directory tree for the walk: fan-out 4, depth 3 (84 directories below the top)."""
    def mk(path: str, d: int) -> None:
        os.makedirs(path, exist_ok=True)
        if d > 0:
            for i in range(fanout):
                mk(os.path.join(path, f"d{i}"), d - 1)

    mk(workdir, depth)

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("classic", "bomb", _bash(CLASSIC), "classic bash bomb :(){ :|:& };:"),
        Workload("seed", "bomb", _bash(SEED), "the seed's forkbomb(){ forkbomb|forkbomb & }"),
        Workload("python-fork", "bomb", _py(PY_FORK), "Python os.fork() loop"),
        Workload("c-fork", "bomb", lambda secs: [c_fork_binary(), str(secs)], "C fork() loop", needs=("gcc",)),
        Workload("slow", "bomb", _bash(SLOW), "slow bomb doubling every ~300 ms"),
        Workload("threads", "bomb", _py(THREAD_BOMB), "thread bomb (threads spawning threads)", threads=True),
        Workload("setsid", "bomb", _py(SETSID), "setsid + double fork: parents die at once"),
        Workload("zombies", "bomb", _py(ZOMBIES), "zombie pile-up: children never reaped", zombies=True),
        Workload("fork-loop", "bomb", _bash(FORK_LOOP), "one-parent fork loop: while :; do sleep 30 & done"),
        Workload("exec-chain", "bomb", _bash(EXEC_CHAIN),
                 "exec chain: a script starting itself twice with a new command line every generation"),
        Workload("c-threads", "bomb", lambda secs: [c_threads_binary(), str(secs)], "native C pthread thread bomb",
                 needs=("gcc",), threads=True),
        Workload("make", "benign", lambda secs: ["make", "-s", "-j8"], "make -j8 on a generated C project",
                 needs=("make", "gcc"), setup=make_project),
        Workload("xargs", "benign", _bash("seq 3000 | xargs -P 16 -n 1 true"), "seq 3000 | xargs -P 16 -n 1 true"),
        Workload("pool", "benign", _py(POOL), "multiprocessing.Pool(8) with task churn"),
        Workload("prefork", "benign", _py(PREFORK), "prefork server: 32 workers from one master"),
        Workload("sleepers", "benign", _bash("for i in $(seq 300); do sleep 3 & done; wait"),
                 "one parent starting 300 sleeping children"),
        Workload("nested", "benign", _bash("seq 8 | xargs -P 4 -I{} sh -c 'seq 60 | xargs -P 4 -n 1 true'"),
                 "nested parallel loops (xargs -P4 in xargs -P4)"),
        Workload("sequential", "benign", _bash("for i in $(seq 2000); do /bin/true; done"),
                 "tight sequential loop of short commands"),
        Workload("test-runner", "benign", _py(TEST_RUNNER), "parallel test runner: 8 workers, 48 test processes"),
        Workload("tree", "benign", _bash(BOUNDED_TREE), "bounded process tree: fan-out 5, depth 3 (156 processes)"),
        Workload("binary-tree", "benign", _bash(BINARY_TREE),
                 "bounded binary worker tree, depth 6 (127 workers, parents wait)"),
        Workload("dirwalk", "benign", _bash(DIRWALK), "recursive directory walk, a subshell per directory (85 dirs)",
                 setup=make_dirtree),
        Workload("mergesort", "benign", lambda secs: [mergesort_binary(), str(1 << 18), "6"],
                 "fork-based merge sort, 6 levels (64 processes, parents wait)", needs=("gcc",)),
        # The classic bomb again, started next to innocent processes in the same cgroup (the runner
        # starts extra["innocents"] 'sleep 60'): only a lineage kill removes it and spares them.
        Workload("shared", "bomb", _bash(CLASSIC), "classic bomb in a cgroup shared with 3 innocent 'sleep 60'",
                 extra={"innocents": 3}),
    ]
}

BOMBS = [w for w in WORKLOADS.values() if w.kind == "bomb"]
BENIGN = [w for w in WORKLOADS.values() if w.kind == "benign"]
