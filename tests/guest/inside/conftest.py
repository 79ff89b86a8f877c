"""Tests that run only inside the throwaway cgroup-v2 guest (booted by tests/guest/test_guest.py).

Outside the guest every test here is skipped: they start real fork bombs and take over the
cgroup2 root, which only the throwaway VM may have done to it. The guest's /init sets
CGGUARD_IN_GUEST=1. Adding a test is adding a ``test_*.py`` file here; tests/guest/test_guest.py
reports each guest test as a host test. Run them alone with ``python -m cgguard.testkit.guest``.

Timing under emulation varies 2-5x with the host's load (more on a busy host): every wait is on
a condition (guestkit.wait_until), its deadline only stops a hung test, and no test may assert
on how long something took. A test that asserts an absence ("no incident") first waits for a
positive sign that the agent looked (its status shows a sample taken after the fact).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cgguard.kernel.cgroupfs import CgroupFS, find_cgroup2_root
from guest.inside.guestkit import GuestAgent, wait_until, write_config

IN_GUEST = os.environ.get("CGGUARD_IN_GUEST") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="guest-only (runs in the test VM, reported by tests/guest/test_guest.py)")
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.guest)
            if not IN_GUEST:
                item.add_marker(skip)


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


@pytest.fixture
def agent(tmp_path) -> Iterator[Callable[..., GuestAgent]]:
    """Factory of real ``cgguard run`` agents watching ``watch``: ``agent(watch, *flags,
    config="yaml lines")``; each is stopped after the test and must exit 0."""
    started: list[GuestAgent] = []

    def start(watch: str, *extra: str, config: str = "") -> GuestAgent:
        work = tmp_path / f"agent{len(started)}"
        work.mkdir()
        cfg = write_config(str(work / "config.yaml"), config)
        a = GuestAgent(str(work), [watch], "--config", cfg, *extra)
        started.append(a)
        a.wait_ready(timeout=120)
        return a

    yield start
    for a in started:
        assert a.stop() == 0, a.output()
