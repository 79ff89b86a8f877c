"""Run the real ``cgguard run`` as a subprocess for end-to-end tests (the bench's harness)."""

from __future__ import annotations

import time
import urllib.request

from cgguard.bench.agentproc import AgentProcess, free_port  # noqa: F401


class AgentProc(AgentProcess):
    """The bench's agent process, ready only once its HTTP endpoint says so (tests /readyz too)."""

    def __init__(self, tmp: str, watch: list[str], *extra: str, env: dict | None = None):
        super().__init__(tmp, watch, "--log-level", "info", *extra, env=env)

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

    def caught_up(self, timeout: float = 30.0) -> None:
        """Make the agent prove it has processed every event up to now: start a marker process
        (fork, exec, exit) and wait until its connector count moves past it. The connector's
        socket is FIFO, so every event before the marker has been handled too -- the positive
        sign a test needs before asserting that something did not happen."""
        import subprocess

        before = self.status()["connector"]["received"]
        subprocess.run(["/bin/true"], check=True)
        deadline = time.monotonic() + timeout
        while self.status()["connector"]["received"] < before + 3:
            if time.monotonic() > deadline:
                raise AssertionError(f"the agent did not process events within {timeout}s: {self.output()}")
            time.sleep(0.02)
