"""The control socket path and a second agent started by mistake, with real agents.

Nothing a second ``cgguard run`` does may cost the first one its control socket, and no path
that is not a stale socket is ever replaced: a regular file, a symlink or a directory at the
control socket path makes the agent refuse, in one line, with exit 2.
"""

import os
import signal
import socket
import stat
import urllib.request

import pytest
from agentproc import AgentProc, free_port
from conftest import run_cli, wait_until


@pytest.fixture
def agent_factory(tmp_path):
    started = []

    def start(watch, *extra):
        a = AgentProc(str(tmp_path / f"a{len(started)}"), watch, *extra)
        started.append(a)
        a.wait_ready()
        return a

    yield start
    for a in started:
        killed = a.proc.poll() is not None and a.proc.returncode < 0
        rc = a.stop()
        # Whatever a second agent tried, the first one still shuts down cleanly.
        assert killed or rc == 0, f"agent exit code {rc}: {a.output()}"


def _run(tmp_path, sandbox, *args, name="second"):
    """A 'cgguard run' that is expected to refuse; if it does not, the timeout ends it."""
    state = tmp_path / f"{name}-state"
    return run_cli("run", "--watch", f"{sandbox.name}/*", "--state-dir", str(state), "--log-level", "warning",
                   "--no-lineage", *args, timeout=30)


def _refusal(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("cgguard: ") and "Traceback" not in r.stderr
    return lines[0]


def _inode(path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_ino, stat.S_IFMT(st.st_mode)


def _status_works(sock: str, sandbox) -> None:
    r = run_cli("status", "--json", "--control-socket", sock)
    assert r.returncode == 0, r.stderr
    assert f"{sandbox.name}/calm" in r.stdout


def _ready(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
        return r.status == 200


def test_control_socket_path_that_is_a_regular_file_is_refused(tmp_path, sandbox):
    sandbox.cgroup("calm")
    f = tmp_path / "control.sock"
    f.write_bytes(b"not a socket: someone's data\n")
    os.chmod(f, 0o644)
    before = (f.read_bytes(), _inode(f), stat.S_IMODE(os.lstat(f).st_mode))
    port = free_port()
    line = _refusal(_run(tmp_path, sandbox, "--listen", f"127.0.0.1:{port}", "--control-socket", str(f)))
    assert str(f) in line and "not a socket" in line
    assert (f.read_bytes(), _inode(f), stat.S_IMODE(os.lstat(f).st_mode)) == before
    with socket.socket() as s:  # the refused agent let its port go again
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("kind", ["symlink-to-file", "symlink-to-live-socket", "directory"])
def test_control_socket_path_that_is_a_link_or_dir_is_refused(tmp_path, sandbox, agent_factory, kind):
    sandbox.cgroup("calm")
    path = tmp_path / "control.sock"
    if kind == "symlink-to-file":
        target = tmp_path / "precious"
        target.write_bytes(b"data")
        os.symlink(target, path)
    elif kind == "symlink-to-live-socket":
        first = agent_factory([f"{sandbox.name}/*"])
        target = first.sock
        os.symlink(target, path)
    else:
        path.mkdir()
        (path / "keep").write_text("x")
        target = None
    tbefore = _inode(target) if target else None
    before = _inode(path)
    _refusal(_run(tmp_path, sandbox, "--listen", "", "--control-socket", str(path)))
    assert _inode(path) == before
    if target:
        assert _inode(target) == tbefore
    if kind == "symlink-to-live-socket":
        _status_works(str(target), sandbox)
    if kind == "directory":
        assert os.listdir(path) == ["keep"]


def test_second_agent_on_the_same_port_fails_and_the_first_keeps_working(tmp_path, sandbox, agent_factory):
    sandbox.cgroup("calm")
    first = agent_factory([f"{sandbox.name}/*"])
    sock_before = _inode(first.sock)
    # Same port and same control socket: the port is taken first, so the socket is never touched.
    line = _refusal(_run(tmp_path, sandbox, "--listen", f"127.0.0.1:{first.port}", "--control-socket", first.sock))
    assert "cannot listen" in line and "in use" in line
    assert _inode(first.sock) == sock_before
    _status_works(first.sock, sandbox)
    assert _ready(first.port)
    # Same port, another control socket: refused before that socket is even created.
    other = tmp_path / "other.sock"
    line = _refusal(_run(tmp_path, sandbox, "--listen", f"127.0.0.1:{first.port}", "--control-socket", str(other),
                         name="third"))
    assert "in use" in line and not os.path.lexists(other)
    _status_works(first.sock, sandbox)
    assert first.proc.poll() is None


def test_second_agent_with_a_free_port_and_the_same_socket_refuses(tmp_path, sandbox, agent_factory):
    sandbox.cgroup("calm")
    first = agent_factory([f"{sandbox.name}/*"])
    sock_before = _inode(first.sock)
    port = free_port()
    line = _refusal(_run(tmp_path, sandbox, "--listen", f"127.0.0.1:{port}", "--control-socket", first.sock))
    assert "another cgguard agent is running" in line
    assert _inode(first.sock) == sock_before  # not unlinked by the loser on its way out
    _status_works(first.sock, sandbox)
    assert _ready(first.port)
    with socket.socket() as s:  # the loser released the port it had bound
        s.bind(("127.0.0.1", port))
    # Again without HTTP: the control socket is then the only thing that can collide.
    _refusal(_run(tmp_path, sandbox, "--listen", "", "--control-socket", first.sock, name="third"))
    assert _inode(first.sock) == sock_before
    _status_works(first.sock, sandbox)


def test_stale_socket_of_a_killed_agent_is_replaced(tmp_path, sandbox, agent_factory):
    sandbox.cgroup("calm")
    first = agent_factory([f"{sandbox.name}/*"])
    os.kill(first.proc.pid, signal.SIGKILL)  # no clean-up: the socket file stays behind
    first.proc.wait(10)
    assert stat.S_ISSOCK(os.lstat(first.sock).st_mode)
    agent_factory([f"{sandbox.name}/*"], "--control-socket", first.sock)
    _status_works(first.sock, sandbox)  # the first is dead: the answer is the second's


def _all_stopped(pid: int) -> bool:
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            continue
    return bool(states) and all(s in "tT" for s in states)


def test_second_agent_refuses_while_the_first_is_stopped(tmp_path, sandbox, agent_factory):
    """A live agent that does not answer (stopped, or too busy to accept) still owns its socket."""
    sandbox.cgroup("calm")
    first = agent_factory([f"{sandbox.name}/*"])
    sock_before = _inode(first.sock)
    os.kill(first.proc.pid, signal.SIGSTOP)
    # The stop reaches each thread on its way back to user space: until then its control thread
    # may still accept one connection, freeing the slot the probe below would then take.
    assert wait_until(lambda: _all_stopped(first.proc.pid)), "SIGSTOP did not stop every thread"
    clients = []
    try:
        # Fill its accept queue: then a connect neither succeeds nor is refused.
        while True:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            clients.append(c)
            try:
                c.connect(first.sock)
            except BlockingIOError:
                break
        line = _refusal(_run(tmp_path, sandbox, "--listen", "", "--control-socket", first.sock))
        assert "another cgguard agent" in line and "not replacing" in line
        assert _inode(first.sock) == sock_before
    finally:
        for c in clients:
            c.close()
        os.kill(first.proc.pid, signal.SIGCONT)
    _status_works(first.sock, sandbox)


def test_bind_does_not_chmod_through_a_symlink_swapped_in(tmp_path, monkeypatch):
    """Between bind() and a chmod by path, someone who can write the socket's directory can
    swap the new socket for a symlink; a chmod then lands on the link's target."""
    from cgguard.agent.control import ControlError, bind_control

    precious = tmp_path / "suid-binary"
    precious.write_bytes(b"#!/bin/true\n")
    os.chmod(precious, 0o4755)
    parent = tmp_path / "run"
    parent.mkdir(mode=0o700)
    path = parent / "control.sock"
    real_bind = socket.socket.bind

    def racing_bind(self, addr):
        real_bind(self, addr)
        if addr == str(path):
            os.rename(path, parent / "moved.sock")
            os.symlink(precious, path)

    monkeypatch.setattr(socket.socket, "bind", racing_bind)
    try:
        bind_control(str(path)).close()
    except ControlError:
        pass  # refusing is fine too; changing the target is not
    assert stat.S_IMODE(os.stat(precious).st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(parent / "moved.sock").st_mode) == 0o600  # created private, no chmod needed
