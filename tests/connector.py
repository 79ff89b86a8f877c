"""Helpers for tests that read the real proc connector."""

from __future__ import annotations

import sys
import time

import pytest

from cgguard.testkit.sandbox import Sandbox


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
