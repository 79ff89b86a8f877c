"""The agent under test, run as the real ``cgguard run`` in a child process.

A subprocess rather than an in-process ``Agent``: its CPU time and RSS are then its own (psutil
on its pid), it sets its own realtime priority exactly as in production, and the bench's threads
cannot steal its GIL. Everything it reports comes through its public surfaces: the control socket
(status) and ``<state-dir>/incidents.jsonl``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

import psutil

from cgguard.sinks import incidents


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentStartError(Exception):
    pass


class AgentProcess:
    """``python -m cgguard run --watch GLOB ...`` with a private state dir and control socket."""

    def __init__(self, workdir: str, watch: list[str], *extra: str, env: dict[str, str] | None = None,
                 config: dict[str, Any] | None = None, nice: int | None = None):
        os.makedirs(workdir, exist_ok=True)
        self.config_path: str | None = None
        if config:
            # JSON is YAML: the agent's loader reads it as such, and the bench needs no YAML writer.
            self.config_path = os.path.join(workdir, "cgguard.yaml")
            with open(self.config_path, "w") as f:
                json.dump(config, f, indent=2)
                f.write("\n")
            extra = ("--config", self.config_path, *extra)
        self.state_dir = os.path.join(workdir, "state")
        self.sock = os.path.join(workdir, "control.sock")
        self.log_path = os.path.join(workdir, "agent.log")
        self.port = free_port()
        args = [
            sys.executable, "-m", "cgguard", "run",
            "--state-dir", self.state_dir,
            "--listen", f"127.0.0.1:{self.port}",
            "--control-socket", self.sock,
            "--log-level", "warning",
            *extra,
        ]
        for w in watch:
            args += ["--watch", w]
        self._log = open(self.log_path, "w+")
        # Default settings unless ``config`` is given: CGGUARD_CONFIG must not change them.
        env = {**{k: v for k, v in os.environ.items() if k != "CGGUARD_CONFIG"}, **(env or {})}
        # ``nice``: start it as deploy/systemd/cgguard.service does (Nice=-10), for trials where a
        # bomb already competes for the CPU while the agent starts.
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self._ps = psutil.Process(self.proc.pid)

    # -- life cycle ------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AgentStartError(f"agent exited with {self.proc.returncode}: {self.output(800)}")
            try:
                st = self.status(timeout=1.0)
                if st.get("ready"):
                    return st
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise AgentStartError(f"agent not ready after {timeout:.0f}s: {self.output(800)}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def ready_http(self, timeout: float = 0.5) -> bool:
        """Does /readyz answer 200 now? (False while the agent is starting or has no listener.)"""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=timeout) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- observation -----------------------------------------------------------------------
    def control(self, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """One request on the control socket (JSON line protocol, as ``cgguard status``)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        with s:
            s.connect(self.sock)
            s.sendall(json.dumps(req).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        reply = self.control({"cmd": "status"}, timeout)
        if not reply.get("ok"):
            raise ValueError(str(reply.get("error")))
        return reply["status"]

    def wait_incident(self, cgroup: str | None = None, final: bool = True, timeout: float = 15) -> dict[str, Any]:
        """The first incident of ``cgroup`` (with its outcome, unless ``final`` is False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for inc in self.incidents():
                if cgroup is not None and inc["cgroup"] != cgroup:
                    continue
                if not final or inc.get("result") != "detected":
                    return inc
            time.sleep(0.05)
        raise AssertionError(f"no incident for {cgroup} within {timeout}s; have {self.incidents()}; log: {self.output()}")

    def incidents(self) -> list[dict[str, Any]]:
        return incidents.read(self.state_dir).incidents

    def cpu_seconds(self) -> float:
        """User + system CPU of the whole agent process (all its threads)."""
        t = self._ps.cpu_times()
        return t.user + t.system

    def rss_bytes(self) -> int:
        return self._ps.memory_info().rss

    def output(self, last: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-last:]
        except OSError:
            return ""
