"""Run the real ``cgguard run`` as a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from cgguard import incidents


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProc:
    def __init__(self, tmp: str, watch: list[str], *extra: str, env: dict | None = None):
        os.makedirs(tmp, exist_ok=True)
        self.state_dir = os.path.join(tmp, "state")
        self.sock = os.path.join(tmp, "control.sock")
        self.port = free_port()
        self.log = open(os.path.join(tmp, "agent.log"), "w+")
        args = [sys.executable, "-m", "cgguard", "run", "--state-dir", self.state_dir,
                "--listen", f"127.0.0.1:{self.port}", "--control-socket", self.sock, *extra]
        for w in watch:
            args += ["--watch", w]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent not ready after {timeout}s: {self.output()}")

    def control(self, req: dict) -> dict:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(self.sock)
        with s:
            s.sendall(json.dumps(req).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    def incidents(self) -> list[dict]:
        return incidents.read(self.state_dir).incidents

    def wait_incident(self, cgroup: str | None = None, final: bool = True, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for inc in self.incidents():
                if cgroup is not None and inc["cgroup"] != cgroup:
                    continue
                if not final or inc.get("result") != "detected":
                    return inc
            time.sleep(0.05)
        raise AssertionError(f"no incident for {cgroup} within {timeout}s; have {self.incidents()}; log: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode
