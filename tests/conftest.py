"""Shared fixtures: the real cgroup2 tree, a per-test sandbox that is always cleaned up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from cgguard.kernel.cgroupfs import CgroupFS, NoCgroup2, find_cgroup2_root
from cgguard.testkit.sandbox import Sandbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fs_or_reason() -> tuple[CgroupFS | None, str | None]:
    if os.geteuid() != 0:
        return None, "needs root to create cgroups"
    try:
        fs = CgroupFS(find_cgroup2_root())
    except NoCgroup2 as e:
        return None, str(e)
    if not os.access(fs.root, os.W_OK):
        return None, f"{fs.root} is not writable"
    return fs, None


@pytest.fixture(scope="session")
def cgfs() -> CgroupFS:
    fs, why = _fs_or_reason()
    if fs is None:
        print(f"SKIP reason: {why}", file=sys.stderr)
        pytest.skip(why)
    return fs


@pytest.fixture
def sandbox(cgfs):
    sb = Sandbox.create(cgfs, prefix="cgguard-test", cap=1024)
    try:
        yield sb
    finally:
        left = sb.close()
        assert not left, f"cgroups left behind: {left}"


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    return str(d)


def run_cli(*args: str, timeout: float = 30, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "cgguard", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        input=input,
        cwd=REPO,
    )


def wait_until(pred, timeout: float = 30.0, interval: float = 0.02):
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` passes (None).
    Timeouts are generous on purpose: a slow machine must only make a test slower."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
