"""Helpers of the guest tests: condition waits, starting workloads in a cgroup, the agent.

Nothing here waits on time. Timeouts are hang guards sized for an emulated guest that runs 2-5x
slower than where the tests were written (and slower still on a loaded host): a passing test
never reaches them, so they can be generous.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from agentproc import AgentProc

from cgguard.kernel.cgroupfs import CgroupFS

# One condition (a verdict, a cgroup emptying, the agent's next sample): a hang guard only, well
# below the guest's per-test timeout (600 s) so that a hang fails with this wait's own message.
HANG_GUARD = 180.0
# Deadline of the deadline-bounded workloads: beyond any wait of a test, so they never end by
# themselves while a test still expects them, and short enough to end if a test leaks one.
WORKLOAD_DEADLINE = 900

# The agents in the guest run with the defaults, except for how long a kill-cgroup may take to
# reach "populated 0": killing a thousand tasks takes ~10 s of emulation on a loaded host (the
# default 5 s would report "timeout" for a kill that the kernel is still completing).
AGENT_CONFIG = "remove_timeout_ms: 120000\n"


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = HANG_GUARD, interval: float = 0.05,
               context: Callable[[], str] | None = None) -> Any:
    """Poll until ``predicate()`` is truthy and return its value; fail naming ``what`` on a hang
    (with ``context()``, e.g. the agent's log, in the message)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{context()}" if context is not None else ""
            pytest.fail(f"still waiting after {timeout:.0f} s for {what}{extra}", pytrace=False)
        time.sleep(interval)


def start_in(fs: CgroupFS, cgroup: str, argv: list[str], **kw: Any) -> subprocess.Popen:
    """Start ``argv`` inside ``cgroup`` (the shell moves itself there before exec), so every task
    of the workload is charged to that cgroup from its first fork on."""
    procs = os.path.join(fs.abspath(cgroup), "cgroup.procs")
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(
        ["sh", "-c", 'echo 0 > "$1" && shift && exec "$@"', "sh", procs, *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kw,
    )


def enable(fs: CgroupFS, cgroup: str, *controllers: str) -> None:
    fs.write(cgroup, "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))


def pids_events(fs: CgroupFS, cgroup: str) -> int:
    """Forks refused as counted in this cgroup's pids.events (``max``)."""
    return (fs.pids_events(cgroup) or {}).get("max", 0)


def no_limit_above(fs: CgroupFS, cgroup: str) -> list[str]:
    """The cgroup and its ancestors that have a finite pids.max (none: the default budget)."""
    limited, cur = [], cgroup
    while cur:
        if fs.pids_max(cur) is not None:
            limited.append(cur)
        cur = cur.rsplit("/", 1)[0] if "/" in cur else ""
    return limited


class GuestAgent(AgentProc):
    """A real ``cgguard run`` in the guest, with the views the tests wait on."""

    def cgroup(self, rel: str) -> dict[str, Any] | None:
        """The agent's status of one watched cgroup (built by its loop on request: its last sample)."""
        for c in self.status(timeout=30)["cgroups"]:
            if c["path"] == rel:
                return c
        return None

    def wait_cgroup(self, rel: str, pred: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Wait until the agent's status of ``rel`` satisfies ``pred``: the agent has sampled it
        in that state (a positive sign that it looked, before a test asserts an absence)."""
        def check() -> dict[str, Any] | None:
            c = self.cgroup(rel)
            return c if c is not None and pred(c) else None

        return wait_until(check, f"the agent's status to show {rel} {what}",
                          context=lambda: f"status: {self.cgroup(rel)}\nagent log:\n{self.output()}")

    def incident(self, rel: str, fs: CgroupFS | None = None, ceiling: int | None = None) -> dict[str, Any]:
        """The first incident of ``rel``, with its outcome (a hang guard, not a latency bound).
        With ``fs``, a hang is reported with the kernel's view of the cgroup and its parent.
        ``ceiling``: tasks at which an unbounded bomb is killed by the test (and the test failed)
        before it takes the guest down."""
        def final() -> dict[str, Any] | None:
            if ceiling is not None and fs is not None and int(fs.read(rel, "pids.current")) >= ceiling:
                fs.kill(rel)
                pytest.fail(f"{rel} reached {ceiling} tasks without a verdict; the test killed it\n{context()}",
                            pytrace=False)
            return next((i for i in self.incidents_of(rel) if i.get("result") != "detected"), None)

        def context() -> str:
            lines = [f"incidents: {self.incidents()}", f"agent status of {rel}: {self.cgroup(rel)}"]
            if fs is not None:
                parent = rel.rsplit("/", 1)[0]
                for cg in (rel, parent):
                    lines.append(f"kernel: {cg}: " + ", ".join(
                        f"{name} {(fs.read_optional(cg, name) or '-').strip()!r}"
                        for name in ("pids.current", "pids.max", "pids.events", "pids.peak")))
            lines.append(f"agent log:\n{self.output(20000)}")
            return "\n".join(lines)

        return wait_until(final, f"an incident with an outcome for {rel}", context=context)

    def explain(self, inc: Any) -> str:
        """An assertion message: the incident in full (pytest would shorten a dict), what the
        agent's process tracking lost, and its log."""
        try:
            st = self.status(timeout=30)
            tracking = f"connector: {st['connector']}\ntracking: {st['tracking']}"
        except (OSError, ValueError) as e:
            tracking = f"status unavailable: {e}"
        return f"incident: {json.dumps(inc, indent=1, default=str)}\n{tracking}\nagent log:\n{self.output(20000)}"

    def incidents_of(self, rel: str) -> list[dict[str, Any]]:
        return [i for i in self.incidents() if i["cgroup"] == rel]


def write_config(path: str, extra: str = "") -> str:
    with open(path, "w") as f:
        f.write(AGENT_CONFIG + extra)
    return path
