"""Shared by the fault-injection tests: real agents (started, stopped, SIGSTOPped, SIGKILLed),
conditions to wait on, and the bombs these tests start.

Nothing here sleeps to synchronize: :func:`wait_until` polls a condition with a generous timeout
(the 2-core machine may be 2-3x slower under other tests) and fails with what it last saw.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
from agentproc import AgentProc

from cgguard.testkit.corpus import WORKLOADS

# A one-parent fork loop: the parent never exits, its children are not abandoned copies of it,
# so lineage never convicts it; the budget rules must.
FORK_LOOP = "D=$((EPOCHSECONDS+SECS)); while (( EPOCHSECONDS < D )); do sleep 30 & done"


def classic(secs: int = 6) -> list[str]:
    return WORKLOADS["classic"].make(secs)


def fork_loop(secs: int = 6) -> list[str]:
    return ["bash", "-c", FORK_LOOP.replace("SECS", str(secs))]


def wait_until(cond: Callable[[], Any], timeout: float, what: str, seen: Callable[[], Any] | None = None) -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` (and ``seen()``)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            extra = f"; last seen: {seen()}" if seen is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(0.05)


class Agent(AgentProc):
    """``AgentProc`` that may run under a command prefix (``prlimit ...``), which execs the agent
    in place, so the pid, the control socket and the log are the agent's own."""

    def __init__(self, tmp: str, watch: list[str], *extra: str, prefix: list[str] | None = None, env: dict | None = None):
        if not prefix:
            super().__init__(tmp, watch, *extra, env=env)
            return
        # The bench's AgentProcess builds its argv and starts it in one step; the prefix goes in
        # front of that argv for this one construction (nothing else starts processes meanwhile).
        real = subprocess.Popen

        def popen(args, **kw):
            return real([*prefix, *args], **kw)

        with mock.patch.object(subprocess, "Popen", popen):
            super().__init__(tmp, watch, *extra, env=env)

    def sigstop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def sigcont(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def sigkill(self) -> None:
        self.sigcont()
        self.proc.kill()
        self.proc.wait(10)

    def incidents_of(self, cgroup: str) -> list[dict[str, Any]]:
        return [i for i in self.incidents() if i["cgroup"] == cgroup]

    def others(self, *cgroups: str) -> list[dict[str, Any]]:
        return [i for i in self.incidents() if i["cgroup"] not in cgroups]

    def wait_status(self, pred: Callable[[dict[str, Any]], Any], timeout: float, what: str) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def check():
            nonlocal last
            try:
                last = self.status()
            except (OSError, ValueError):
                return None
            return last if pred(last) else None

        return wait_until(check, timeout, what, seen=lambda: _brief(last))


def _brief(st: dict[str, Any]) -> dict[str, Any]:
    return {k: st.get(k) for k in ("ready", "watched", "inotify_overflows", "connector", "notes")}


@pytest.fixture(name="agents")
def agents_fixture(tmp_path):
    """Start agents with ``agents(watch, *flags, prefix=, workdir=)`` (the same ``workdir`` again:
    the same state dir and control socket, as a restart); all are ended after the test (SIGCONT first, so a stopped one can take its SIGTERM)."""
    started: list[Agent] = []

    def start(
        watch: list[str], *extra: str, prefix: list[str] | None = None, ready: bool = True, timeout: float = 60,
        workdir: str | None = None,
    ) -> Agent:
        a = Agent(workdir or str(tmp_path / f"a{len(started)}"), watch, *extra, prefix=prefix)
        started.append(a)
        if ready:
            a.wait_ready(timeout)
        return a

    yield start
    for a in started:
        a.sigcont()
        a.stop()


def final_incident(agent: Agent, cgroup: str, timeout: float = 60, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The first incident of ``cgroup`` with its outcome, ids in ``skip`` left out."""
    return wait_until(
        lambda: next((i for i in agent.incidents_of(cgroup) if i["id"] not in skip and i["result"] != "detected"), None),
        timeout, f"an incident with its outcome for {cgroup}", seen=lambda: agent.incidents()[-3:],
    )


def assert_removed_whole(agent: Agent, sandbox, cgroup: str, workload, timeout: float = 60, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """An incident for ``cgroup``: the whole cgroup killed, removed, nobody left; and the
    workload has no process left anywhere (its v1 cap group counts every one of them)."""
    inc = final_incident(agent, cgroup, timeout, skip)
    assert inc["action"] == "kill-cgroup" and inc["result"] == "removed" and inc["survivors"] == 0, inc
    assert not any("innocent" in n for n in inc["notes"]), inc["notes"]
    wait_until(lambda: not sandbox.live_pids(workload), 15, f"no process of the bomb in {cgroup}",
               seen=lambda: len(sandbox.live_pids(workload)))
    return inc

