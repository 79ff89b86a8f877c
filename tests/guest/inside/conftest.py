"""Tests that run only inside the throwaway cgroup-v2 guest (booted by tests/guest/test_guest.py).

Outside the guest every test here is skipped: they start real fork bombs and take over the
cgroup2 root, which only the throwaway VM may have done to it. The guest's /init sets
CGGUARD_IN_GUEST=1. Adding a test is adding a ``test_*.py`` file here; tests/guest/test_guest.py
reports each guest test as a host test. Run them alone with ``python -m cgguard.testkit.guest``.

Timing under emulation varies 2-5x with the host's load: the deadlines below only stop a hung
test, no test may assert on how long something took.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cgguard.kernel.cgroupfs import CgroupFS, find_cgroup2_root

IN_GUEST = os.environ.get("CGGUARD_IN_GUEST") == "1"
HANG_GUARD = 60.0  # seconds; a hang guard, not a timing expectation


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="guest-only (runs in the test VM, reported by tests/guest/test_guest.py)")
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.guest)
            if not IN_GUEST:
                item.add_marker(skip)


def wait_until(predicate: Callable[[], object], what: str, timeout: float = HANG_GUARD, interval: float = 0.05):
    """Poll until ``predicate()`` is truthy and return its value; fail naming ``what`` on a hang."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {timeout:.0f} s for {what}", pytrace=False)
        time.sleep(interval)


@pytest.fixture(name="wait_until", scope="session")
def wait_until_fixture() -> Callable[..., object]:
    return wait_until


@pytest.fixture(scope="session")
def cgfs() -> CgroupFS:
    """The guest's cgroup2 tree (the pure-v2 root, every controller handed down)."""
    return CgroupFS(find_cgroup2_root())


def remove_cgroup(fs: CgroupFS, rel: str) -> None:
    """Kill everything in a test cgroup, wait for it to empty, remove it."""
    if not fs.exists(rel):
        return
    fs.kill(rel)
    wait_until(lambda: not fs.populated(rel), f"{rel} to empty after cgroup.kill")
    assert fs.remove_tree(rel), f"could not remove {rel}"


def _cgroup_factory(fs: CgroupFS) -> Iterator[Callable[[str], str]]:
    made: list[str] = []

    def make(name: str = "t") -> str:
        rel = f"guest-{name}-{uuid.uuid4().hex[:6]}"
        fs.mkdir(rel)
        made.append(rel)
        return rel

    yield make
    for rel in reversed(made):
        remove_cgroup(fs, rel)


@pytest.fixture
def make_cgroup(cgfs: CgroupFS) -> Iterator[Callable[[str], str]]:
    """Factory of fresh children of the cgroup2 root (every controller enabled), removed after the test."""
    yield from _cgroup_factory(cgfs)


@pytest.fixture(scope="module")
def make_module_cgroup(cgfs: CgroupFS) -> Iterator[Callable[[str], str]]:
    """Like make_cgroup, for module-scoped fixtures: removed after the module."""
    yield from _cgroup_factory(cgfs)
