"""Incident hooks and the webhook with real processes and real local HTTP servers.

Hooks coordinate with the test through files: a counter kept under flock(1), and a "gate" file
the test holds an exclusive flock on; a hook that takes a shared lock on it waits until the test
lets go. So "every worker is stuck" and "at most N ran at once" are facts the hooks record, not
guesses from timing.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cgguard.sinks import incident_snapshot
from cgguard.sinks.hooks import HookRunner
from cgguard.sinks.incidents import Incident
from cgguard.sinks.webhook import Webhook, backoff_delay

pytestmark = pytest.mark.skipif(shutil.which("flock") is None, reason="flock(1) missing")


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def incident(**kw: Any) -> Incident:
    base: dict[str, Any] = dict(
        cgroup="system.slice/web.service",
        action="kill-cgroup",
        reasons=[{"detector": "growth"}],
        tasks_at_detection=700,
        detector="growth",
        workload={"kind": "service", "name": "web.service", "unit": "web.service"},
        origin={"pid": 1234, "start_ns": 1, "comm": "bash", "cmdline": "bash bomb.sh", "alive": True},
    )
    base.update(kw)
    return Incident(**base)


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (field 3 is index 0)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st and st[0] != "Z" and int(st[2]) == pgid:
                out.append(int(d))
    return out


class Gate:
    """Hooks run ``flock -s <gate> true`` and wait while the test holds the exclusive lock."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def open(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


class Board:
    """A counter the hooks keep under flock: how many run now, the most at once, how many ended."""

    SCRIPT = r"""
exec 9>>"$D/lock"
flock 9
n=$(( $(cat "$D/count") + 1 )); echo $n > "$D/count"
if [ $n -gt $(cat "$D/max") ]; then echo $n > "$D/max"; fi
echo $$ >> "$D/pids"
flock -u 9
flock -s "$D/gate" true
flock 9
echo $(( $(cat "$D/count") - 1 )) > "$D/count"
flock -u 9
"""

    def __init__(self, d: Path):
        self.d = d
        (d / "count").write_text("0\n")
        (d / "max").write_text("0\n")
        (d / "pids").write_text("")
        (d / "hook.sh").write_text(self.SCRIPT)
        self.gate = Gate(d / "gate")
        self.command = f"D={d} exec /bin/sh {d / 'hook.sh'}"

    def _read(self, name: str) -> int:
        with open(self.d / "lock", "a") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            return int((self.d / name).read_text().strip() or 0)

    def running(self) -> int:
        return self._read("count")

    def most(self) -> int:
        return self._read("max")

    def pids(self) -> list[int]:
        return [int(x) for x in (self.d / "pids").read_text().split()]


@pytest.fixture
def board(tmp_path) -> Iterator[Board]:
    b = Board(tmp_path)
    yield b
    b.gate.open()


@pytest.fixture
def closing() -> Iterator[list]:
    """Sinks to close after the test even when it fails (their hooks hang on purpose)."""
    sinks: list = []
    yield sinks
    for s in sinks:
        s.close()


# -- HookRunner ------------------------------------------------------------------------------
def test_hook_gets_json_on_stdin_and_env(tmp_path, closing):
    out = tmp_path / "out"
    out.mkdir()
    # One shell string, one argv list: both forms run.
    shell = f'cat > {out}/sh.$CGGUARD_PHASE.json; env | grep ^CGGUARD_ | sort > {out}/sh.$CGGUARD_PHASE.env'
    script = tmp_path / "hook.py"
    script.write_text(
        "import json, os, sys\n"
        "rec = json.load(sys.stdin)\n"
        f"open(os.path.join({str(out)!r}, 'py.' + os.environ['CGGUARD_PHASE'] + '.json'), 'w').write(json.dumps(rec))\n"
    )
    runner = HookRunner([shell, [sys.executable, str(script)]], timeout_s=30)
    closing.append(runner)
    inc = incident()
    detected = incident_snapshot(inc)
    runner.incident(inc)
    inc.result, inc.remove_ms, inc.survivors = "removed", 12.5, 0
    inc.notes.append("removed after one try")  # the agent mutates the same object
    final = incident_snapshot(inc)
    runner.incident(inc)
    wait_for(lambda: runner.stats()["ok"] == 4, "four hook runs")
    assert runner.stats() == {"ok": 4, "failed": 0, "timeout": 0, "dropped": 0}
    for form in ("sh", "py"):
        assert json.loads((out / f"{form}.detected.json").read_text()) == json.loads(json.dumps(detected))
        assert json.loads((out / f"{form}.final.json").read_text()) == json.loads(json.dumps(final))
    assert json.loads((out / "sh.detected.json").read_text())["notes"] == []
    env = dict(line.split("=", 1) for line in (out / "sh.final.env").read_text().splitlines())
    assert env["CGGUARD_INCIDENT_ID"] == inc.id
    assert env["CGGUARD_PHASE"] == "final"
    assert env["CGGUARD_CGROUP"] == "system.slice/web.service"
    assert env["CGGUARD_ACTION"] == "kill-cgroup"
    assert env["CGGUARD_RESULT"] == "removed"
    assert env["CGGUARD_DETECTOR"] == "growth"
    assert env["CGGUARD_WORKLOAD"] == "web.service"
    denv = dict(line.split("=", 1) for line in (out / "sh.detected.env").read_text().splitlines())
    assert denv["CGGUARD_PHASE"] == "detected" and denv["CGGUARD_RESULT"] == "detected"


def test_exit_status_and_missing_command_count_failed(tmp_path, closing):
    runner = HookRunner(["exit 3", ["/nonexistent/hook"], "true"], timeout_s=30)
    closing.append(runner)
    runner.incident(incident(result="removed"))
    wait_for(lambda: sum(runner.stats().values()) == 3, "three runs")
    assert runner.stats() == {"ok": 1, "failed": 2, "timeout": 0, "dropped": 0}


def test_hook_that_ignores_a_large_stdin(tmp_path, closing):
    # 1 MiB of JSON into a hook that never reads it: the pipe fills, the hook exits, no hang.
    runner = HookRunner([f"echo started > {tmp_path}/ran"], timeout_s=60)
    closing.append(runner)
    runner.incident(incident(result="removed", notes=["x" * (1 << 20)]))
    wait_for(lambda: sum(runner.stats().values()) == 1, "the run")
    assert runner.stats()["ok"] == 1 and (tmp_path / "ran").read_text() == "started\n"


def test_hanging_hook_is_killed_with_its_process_group(tmp_path, closing):
    cmd = f"echo $$ > {tmp_path}/leader; sleep 1000 & echo $! > {tmp_path}/child; wait"
    runner = HookRunner([cmd], timeout_s=1.0)
    closing.append(runner)
    runner.incident(incident(result="removed"))
    leader = int(wait_for(lambda: (tmp_path / "leader").exists() and (tmp_path / "leader").read_text().strip(), "the hook"))
    child = int(wait_for(lambda: (tmp_path / "child").exists() and (tmp_path / "child").read_text().strip(), "its child"))
    # A new session: the hook leads its own process group, and the background child is in it.
    assert os.getpgid(leader) == leader and os.getsid(leader) == leader
    wait_for(lambda: runner.stats()["timeout"] == 1, "the timeout to be counted")
    assert runner.stats() == {"ok": 0, "failed": 0, "timeout": 1, "dropped": 0}
    assert group_members(leader) == []
    st = proc_stat(child)
    assert st is None or st[0] == "Z" or int(st[2]) != leader


def test_leftovers_of_a_finished_hook_are_killed(tmp_path, closing):
    # The hook exits 0 at once but leaves a child holding its output pipe: counted ok, and the
    # child does not outlive the run.
    cmd = f"sleep 1000 & echo $! > {tmp_path}/child; echo $$ > {tmp_path}/leader; exit 0"
    runner = HookRunner([cmd], timeout_s=60)
    closing.append(runner)
    runner.incident(incident(result="removed"))
    wait_for(lambda: sum(runner.stats().values()) == 1, "the run")
    assert runner.stats()["ok"] == 1
    assert group_members(int((tmp_path / "leader").read_text())) == []


def test_without_pidfd(tmp_path, closing, monkeypatch):
    """Kernels before 5.3 have no pidfd_open: exits are seen with waitid(WNOWAIT) instead."""

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    runner = HookRunner(["cat > /dev/null", "exit 4", f"echo $$ > {tmp_path}/leader; sleep 1000"], timeout_s=1.0)
    closing.append(runner)
    runner.incident(incident(result="removed"))
    wait_for(lambda: sum(runner.stats().values()) == 3, "three runs")
    assert runner.stats() == {"ok": 1, "failed": 1, "timeout": 1, "dropped": 0}
    assert group_members(int((tmp_path / "leader").read_text())) == []


def test_concurrency_limit_holds(board, closing):
    runner = HookRunner([board.command], max_concurrent=3, queue=64, timeout_s=120)
    closing.append(runner)
    for _ in range(10):
        runner.incident(incident(result="removed"))
    # Three hooks hold the gate's queue; the other seven wait in ours, not as processes.
    wait_for(lambda: board.running() == 3 and runner.pending() == 7, "three running, seven queued")
    assert len(board.pids()) == 3
    board.gate.open()
    wait_for(lambda: runner.stats()["ok"] == 10, "all ten runs")
    assert board.most() == 3 and board.running() == 0 and len(board.pids()) == 10
    assert runner.stats() == {"ok": 10, "failed": 0, "timeout": 0, "dropped": 0}


def test_queue_overflow_drops_and_incident_never_waits(board, closing):
    runner = HookRunner([board.command], max_concurrent=2, queue=4, timeout_s=120)
    closing.append(runner)
    runner.incident(incident(result="removed"))
    runner.incident(incident(result="removed"))
    wait_for(lambda: board.running() == 2 and runner.pending() == 0, "both workers stuck in a hook")
    # Every worker is stuck: these calls can only complete because incident() never waits.
    for _ in range(500):
        runner.incident(incident(result="removed"))
    assert board.running() == 2  # the workers were stuck throughout
    assert runner.pending() == 4
    assert runner.stats() == {"ok": 0, "failed": 0, "timeout": 0, "dropped": 496}
    board.gate.open()
    wait_for(lambda: runner.stats()["ok"] == 6, "the two running and four queued runs")
    assert runner.stats() == {"ok": 6, "failed": 0, "timeout": 0, "dropped": 496}


def test_close_is_bounded_while_every_hook_hangs(board):
    runner = HookRunner([board.command], max_concurrent=2, queue=8, timeout_s=3600)
    for _ in range(6):
        runner.incident(incident(result="removed"))
    wait_for(lambda: board.running() == 2 and runner.pending() == 4, "two hung hooks, four queued")
    leaders = board.pids()
    t = threading.Thread(target=runner.close, kwargs={"timeout_s": 1.0})
    t.start()
    t.join(60)  # a bound, not a measurement: close() must return while every hook still hangs
    assert not t.is_alive()
    assert runner.stats() == {"ok": 0, "failed": 0, "timeout": 2, "dropped": 4}
    for leader in leaders:
        assert group_members(leader) == []
    runner.incident(incident(result="removed"))  # after close: dropped, no exception
    assert runner.stats()["dropped"] == 5


def test_hooks_run_at_normal_priority_from_an_rt_thread(tmp_path):
    """The agent's threads run SCHED_RR at nice -15. A thread that creates the runner passes
    that on to its workers (and they to their children) unless the workers reset it."""
    seen: dict[str, Any] = {}

    def rt_thread() -> None:
        try:
            # Without SCHED_RESET_ON_FORK: the worst case, everything inherits.
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
            os.setpriority(os.PRIO_PROCESS, 0, -15)
        except OSError as e:
            seen["skip"] = f"cannot set SCHED_RR/nice here: {e.strerror}"
            return
        st = subprocess.run(["cat", "/proc/self/stat"], capture_output=True, text=True, check=True).stdout
        seen["plain"] = st.rpartition(")")[2].split()
        runner = HookRunner([f"cat /proc/self/stat > {tmp_path}/stat"], timeout_s=30)
        try:
            runner.incident(incident(result="removed"))
            wait_for(lambda: sum(runner.stats().values()) == 1, "the hook")
        finally:
            runner.close()
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))

    t = threading.Thread(target=rt_thread)
    t.start()
    t.join()
    if "skip" in seen:
        print(seen["skip"])
        pytest.skip(seen["skip"])
    # stat fields: nice is field 19, policy field 41 (index = field - 3 here).
    plain = seen["plain"]
    assert (int(plain[16]), int(plain[38])) == (-15, os.SCHED_RR), "precondition: children inherit RT here"
    hook = (tmp_path / "stat").read_text().rpartition(")")[2].split()
    assert (int(hook[16]), int(hook[38])) == (0, os.SCHED_OTHER)


# -- Webhook ---------------------------------------------------------------------------------
class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, statuses: list[int] | None = None, context: ssl.SSLContext | None = None):
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.statuses = list(statuses or [])
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                srv: Recorder = self.server  # type: ignore[assignment]
                with srv.lock:
                    srv.got.append((dict(self.headers), body))
                    status = srv.statuses.pop(0) if srv.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook?x=1"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Silent:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/"

    def stop(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def server() -> Iterator[Recorder]:
    s = Recorder()
    yield s
    s.stop()


@pytest.fixture
def silent() -> Iterator[Silent]:
    s = Silent()
    yield s
    s.stop()


def test_webhook_delivers_to_a_live_server(server, closing):
    hook = Webhook(server.url, timeout_s=10)
    closing.append(hook)
    inc = incident()
    detected = incident_snapshot(inc)
    hook.incident(inc)
    inc.result = "removed"
    hook.incident(inc)
    wait_for(lambda: hook.stats()["delivered"] == 2, "two deliveries")
    assert hook.stats() == {"delivered": 2, "failed": 0, "dropped": 0, "retries": 0}
    (h1, b1), (h2, b2) = server.got
    assert h1["Content-Type"] == "application/json" and h1["X-Cgguard-Phase"] == "detected"
    assert h2["X-Cgguard-Phase"] == "final" and h2["X-Cgguard-Incident-Id"] == inc.id
    assert json.loads(b1) == json.loads(json.dumps(detected))
    assert json.loads(b2) == json.loads(json.dumps(incident_snapshot(inc)))


def test_webhook_retries_server_errors_then_delivers(closing):
    srv = Recorder(statuses=[503, 500])
    try:
        hook = Webhook(srv.url, retries=5, backoff_s=0.01, max_backoff_s=0.05)
        closing.append(hook)
        hook.incident(incident(result="removed"))
        wait_for(lambda: hook.stats()["delivered"] == 1, "the delivery")
        assert hook.stats() == {"delivered": 1, "failed": 0, "dropped": 0, "retries": 2}
        assert len(srv.got) == 3 and srv.got[0][1] == srv.got[2][1]
    finally:
        srv.stop()


def test_webhook_client_errors_are_not_retried(closing):
    srv = Recorder(statuses=[400])
    try:
        hook = Webhook(srv.url, retries=5, backoff_s=0.01)
        closing.append(hook)
        hook.incident(incident(result="removed"))
        wait_for(lambda: hook.stats()["failed"] == 1, "the failure")
        assert hook.stats() == {"delivered": 0, "failed": 1, "dropped": 0, "retries": 0}
        assert len(srv.got) == 1
    finally:
        srv.stop()


def test_webhook_dead_endpoint_retried_then_failed(closing, caplog):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    hook = Webhook(f"http://127.0.0.1:{port}/", retries=3, backoff_s=0.01, max_backoff_s=0.02)
    closing.append(hook)
    with caplog.at_level("DEBUG", logger="cgguard.sinks.webhook"):
        hook.incident(incident(result="removed"))
        wait_for(lambda: hook.stats()["failed"] == 1, "the failure")
    assert hook.stats() == {"delivered": 0, "failed": 1, "dropped": 0, "retries": 3}
    assert "ConnectionRefusedError" in caplog.text
    assert [r.getMessage().split("; retry ")[1].split(" ")[0] for r in caplog.records if "; retry " in r.getMessage()] == ["1", "2", "3"]


def test_webhook_silent_server_hits_the_timeout(silent, closing, caplog):
    hook = Webhook(silent.url, timeout_s=0.3, retries=1, backoff_s=0.01)
    closing.append(hook)
    with caplog.at_level("WARNING", logger="cgguard.sinks.webhook"):
        hook.incident(incident(result="removed"))
        wait_for(lambda: hook.stats()["failed"] == 1, "the failure")
    assert hook.stats() == {"delivered": 0, "failed": 1, "dropped": 0, "retries": 1}
    assert len(silent.conns) == 2  # both attempts connected, neither was answered
    assert "timed out" in caplog.text


def test_webhook_queue_full_drops_and_close_is_bounded(silent):
    hook = Webhook(silent.url, timeout_s=3600, queue=2, retries=5)
    hook.incident(incident(result="removed"))
    wait_for(lambda: len(silent.conns) == 1, "the first delivery to hang in flight")
    for _ in range(10):
        hook.incident(incident(result="removed"))
    assert hook.stats() == {"delivered": 0, "failed": 0, "dropped": 8, "retries": 0}
    t = threading.Thread(target=hook.close, kwargs={"timeout_s": 1.0})
    t.start()
    t.join(60)  # a bound, not a measurement: close() returns although the server never answers
    assert not t.is_alive()
    # The attempt in flight was aborted (failed, no retry while stopping); the queued two dropped.
    assert hook.stats() == {"delivered": 0, "failed": 1, "dropped": 10, "retries": 0}


def test_webhook_over_https(tmp_path, closing):
    if shutil.which("openssl") is None:
        print("openssl missing")
        pytest.skip("openssl missing")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    srv = Recorder(context=sctx)
    try:
        url = srv.url.replace("http://", "https://")
        untrusted = Webhook(url, retries=0)
        closing.append(untrusted)
        untrusted.incident(incident(result="removed"))
        wait_for(lambda: untrusted.stats()["failed"] == 1, "verification to fail")
        cctx = ssl.create_default_context(cafile=str(cert))
        hook = Webhook(url, ssl_context=cctx)
        closing.append(hook)
        inc = incident(result="removed")
        hook.incident(inc)
        wait_for(lambda: hook.stats()["delivered"] == 1, "the delivery")
        assert json.loads(srv.got[-1][1])["id"] == inc.id
    finally:
        srv.stop()


def test_backoff_is_exponential_capped_and_jittered():
    rng = random.Random(7)
    for attempt in range(1, 12):
        nominal = min(30.0, 0.5 * 2 ** (attempt - 1))
        for _ in range(50):
            d = backoff_delay(attempt, 0.5, 30.0, rng)
            assert nominal / 2 <= d <= nominal
    draws = {round(backoff_delay(3, 0.5, 30.0, rng), 6) for _ in range(20)}
    assert len(draws) > 1  # jittered


def test_webhook_rejects_non_http_urls():
    with pytest.raises(ValueError):
        Webhook("ftp://example.com/x")
    with pytest.raises(ValueError):
        Webhook("http:///nohost")
