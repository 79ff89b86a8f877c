"""Helpers for tests that read the real proc connector."""

from __future__ import annotations

import sys
import time

import pytest

from cgguard.testkit.sandbox import Sandbox


class ListSink:
    """Every decoded event as a tuple, in order, and every loss reported."""

    def __init__(self):
        self.events: list[tuple] = []
        self.losses: list[str] = []

    def on_fork(self, ts_ns, parent_pid, parent_tgid, child_pid, child_tgid):
        self.events.append(("fork", ts_ns, parent_pid, parent_tgid, child_pid, child_tgid))

    def on_exec(self, ts_ns, pid, tgid):
        self.events.append(("exec", ts_ns, pid, tgid))

    def on_exit(self, ts_ns, pid, tgid, exit_code, exit_signal):
        self.events.append(("exit", ts_ns, pid, tgid, exit_code, exit_signal))

    def on_loss(self, reason):
        self.losses.append(reason)

    def of(self, pid: int) -> list[tuple]:
        """The events about process ``pid``: its fork (as parent or child), exec and exit."""
        out = []
        for e in self.events:
            if e[0] == "fork" and pid in (e[3], e[5]):
                out.append(e)
            elif e[0] in ("exec", "exit") and e[3] == pid:
                out.append(e)
        return out


def connector(**kw):
    from cgguard.kernel.procconn import ProcConnector, ProcConnectorUnavailable

    try:
        return ProcConnector(**kw)
    except ProcConnectorUnavailable as e:
        print(f"SKIP reason: proc connector unavailable: {e}", file=sys.stderr)
        pytest.skip(f"proc connector unavailable: {e}")


def in_sandbox(sb: Sandbox):
    return lambda cg: cg is not None and (cg == sb.name or cg.startswith(sb.name + "/"))


def pump(conn, tree, until, timeout=5.0, batch=65536):
    """Feed events into ``tree`` until ``until()`` holds; ``batch=1`` checks after every event,
    for states that the next events undo."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.wait(0.02)
        while conn.read(tree, batch):
            if until():
                return True
        if until():
            return True
    return False
