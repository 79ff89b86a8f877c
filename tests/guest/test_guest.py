"""Boot the pure cgroup-v2 test guest once per session and report its tests as host tests.

``test_in_guest[<file>::<test>]`` stands for one test of tests/guest/inside (the host collects
them to parametrize), and passes, fails or skips as that test did in the guest. ``test_guest_run``
judges the run as a whole: a hang, a kernel panic, a guest without a result, a pytest that did
not finish or guest tests the host did not know (collection errors) fail it with the console tail.

When the guest cannot be had (no qemu and no root to install it, no Debian packages...), every
test here is skipped with the reason, also printed; CGGUARD_REQUIRE_GUEST=1 makes that a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from cgguard.testkit.guest import (
    DEFAULT_TIMEOUT,
    GUEST_PYTEST_ARGS,
    GuestResult,
    guest_pytest_argv,
    guest_unavailable_reason,
    run_in_guest,
)

REPO = Path(__file__).resolve().parents[1]
GUEST_TESTS = "tests/guest/inside"

# The first test to need the guest pays for installing qemu and fetching the kernel on a fresh
# machine, then for the guest run (run_in_guest kills qemu at DEFAULT_TIMEOUT, well before this).
GUEST_TIMEOUT = pytest.mark.timeout(DEFAULT_TIMEOUT + 900)


@dataclass(frozen=True)
class Case:
    outcome: str  # passed, failed, error, skipped
    message: str
    details: str


@dataclass(frozen=True)
class GuestRun:
    result: GuestResult
    cases: dict[tuple[str, str], Case]  # by junit (classname, name)
    junit_problem: str | None


def junit_key(nodeid: str) -> tuple[str, str]:
    """The (classname, name) that pytest's junit XML gives a node id (as its mangle_test_address)."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def parse_junit(path: Path) -> dict[tuple[str, str], Case]:
    cases = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message, details = "passed", "", ""
        # A test can fail and then error in teardown: report the worst.
        for kind in ("skipped", "failure", "error"):
            el = tc.find(kind)
            if el is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message, details = el.get("message", ""), (el.text or "").strip()
        cases[(tc.get("classname", ""), tc.get("name", ""))] = Case(outcome, message, details)
    return cases


@cache
def collect_guest_tests() -> tuple[tuple[str, ...], str | None]:
    """Node ids of the guest tests as collected on the host, and collection trouble if any."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         GUEST_TESTS],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    ids = tuple(line.strip() for line in r.stdout.splitlines() if "::" in line and not line.startswith(" "))
    if r.returncode != 0 or not ids:
        errors = "\n".join(line for line in r.stdout.splitlines() if line not in ids)
        return ids, f"collecting {GUEST_TESTS} on the host exited {r.returncode}:\n{errors[-3000:]}{r.stderr[-2000:]}"
    return ids, None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "guest_nodeid" in metafunc.fixturenames:
        ids, problem = collect_guest_tests()
        params = [pytest.param(i, id=i.removeprefix(GUEST_TESTS + "/")) for i in ids]
        if problem:
            params.append(pytest.param(None, id="collection-error"))
        metafunc.parametrize("guest_nodeid", params)


def _announce(config: pytest.Config, message: str) -> None:
    """Print now, past output capture: a skipped or slow guest must not go unnoticed."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line(f"[guest] {message}", yellow=True, bold=True)
        else:
            print(f"[guest] {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def guest_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    def say(msg: str) -> None:
        _announce(request.config, msg)

    reason = guest_unavailable_reason(say)
    if reason:
        say(f"NOT RUNNING the guest tests: {reason}")
        if os.environ.get("CGGUARD_REQUIRE_GUEST") == "1":
            pytest.fail(f"the test guest is required (CGGUARD_REQUIRE_GUEST=1) but unavailable: {reason}",
                        pytrace=False)
        pytest.skip(f"test guest unavailable: {reason}")
    results = tmp_path_factory.mktemp("guest-results")
    say(f"booting the test guest for {GUEST_TESTS} (results in {results})")
    argv = guest_pytest_argv(GUEST_TESTS, *GUEST_PYTEST_ARGS)
    res = run_in_guest(argv, cwd=REPO, results_dir=results)
    boot = f"{res.boot_seconds:.1f} s" if res.boot_seconds is not None else "-"
    say(f"guest {res.status}: pytest exit code {res.exit_code}, boot {boot}, total {res.elapsed_seconds:.1f} s")
    junit = results / "junit.xml"
    cases, problem = {}, None
    if res.status == "ok":
        try:
            cases = parse_junit(junit)
        except FileNotFoundError:
            problem = "pytest in the guest wrote no junit XML"
        except ET.ParseError as e:
            problem = f"unreadable junit XML from the guest: {e}"
    return GuestRun(res, cases, problem)


@pytest.mark.guest
@GUEST_TIMEOUT
def test_guest_run(guest_run: GuestRun):
    res = guest_run.result
    if res.status != "ok":
        pytest.fail(f"the guest run failed: {res.status}\n{res.describe()}", pytrace=False)
    problems = [guest_run.junit_problem] if guest_run.junit_problem else []
    known = {junit_key(i) for i in collect_guest_tests()[0]}
    unknown = sorted(f"{cls + '::' if cls else ''}{name}: {c.outcome} {c.message}"
                     for (cls, name), c in guest_run.cases.items() if (cls, name) not in known)
    if unknown:
        problems.append("guest results the host did not collect (collection errors?):\n  " + "\n  ".join(unknown))
    failed = [c for c in guest_run.cases.values() if c.outcome in ("failed", "error")]
    if res.exit_code not in (0, 1) or (res.exit_code == 1 and not failed):
        # 2 interrupted, 3 internal error, 4 usage error, 5 no tests: never a normal guest run.
        problems.append(f"pytest in the guest exited {res.exit_code}")
    if problems:
        pytest.fail("\n".join(problems) + "\n" + res.describe(), pytrace=False)


@pytest.mark.guest
@GUEST_TIMEOUT
def test_in_guest(guest_run: GuestRun, guest_nodeid: str | None):
    if guest_nodeid is None:
        pytest.fail(collect_guest_tests()[1], pytrace=False)
    res = guest_run.result
    if res.status != "ok":
        pytest.fail(f"not run: the guest run failed ({res.status}), see test_guest_run", pytrace=False)
    case = guest_run.cases.get(junit_key(guest_nodeid))
    if case is None:
        pytest.fail(f"the guest reported no result for {guest_nodeid}, see test_guest_run", pytrace=False)
    if case.outcome == "skipped":
        pytest.skip(f"skipped in the guest: {case.message}")
    if case.outcome != "passed":
        pytest.fail(f"{case.outcome} in the guest: {case.message}\n\n{case.details}", pytrace=False)


def test_junit_key_matches_pytest():
    """junit_key mirrors pytest's private mangle_test_address; catch a drift on upgrades."""
    from _pytest.junitxml import mangle_test_address

    for nodeid in ("tests/guest/inside/test_a.py::test_b", "tests/guest/inside/test_a.py::TestC::test_d[x::y/z]"):
        names = mangle_test_address(nodeid)
        assert junit_key(nodeid) == (".".join(names[:-1]), names[-1])
