"""Boot the pure cgroup-v2 test guest once per session and report its tests as host tests.

``test_in_guest[<file>::<test>]`` stands for one test of tests/guest/inside (the host collects
them to parametrize), and passes, fails or skips as that test did in the guest. ``test_guest_run``
judges the run as a whole: a hang, a kernel panic, a guest without a result, a pytest that did
not finish or guest tests the host did not know (collection errors) fail it with the console tail.

Results come from the report the guest's pytest writes test by test (cgguard.testkit.guest), so a
guest stopped on a hang still reports every test that finished, and the test that was running
fails with the console tail. The guest's time budget is derived from the number of tests
(cgguard.testkit.guest.guest_budget).

When the guest cannot be had (no qemu and no root to install it, no Debian packages...), every
test here is skipped with the reason, also printed; CGGUARD_REQUIRE_GUEST=1 makes that a failure.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from cgguard.testkit.guest import (
    GUEST_PYTEST_ARGS,
    Case,
    GuestResult,
    guest_budget,
    guest_pytest_argv,
    guest_unavailable_reason,
    run_in_guest,
)

REPO = Path(__file__).resolve().parents[2]
GUEST_TESTS = "tests/guest/inside"
# Installing qemu and fetching the kernel on a fresh machine (apt's own timeouts bound it).
PREPARE_ALLOWANCE_S = 900


@dataclass(frozen=True)
class GuestRun:
    result: GuestResult
    cases: dict[str, Case]  # by node id
    problem: str | None  # what is wrong with the run's report as a whole


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


def _host_timeout() -> float:
    """pytest-timeout for the first guest test, which pays for preparing and running the guest
    (run_in_guest kills qemu at its own budget, before this)."""
    return PREPARE_ALLOWANCE_S + guest_budget(len(collect_guest_tests()[0]))


GUEST_TIMEOUT = pytest.mark.timeout(_host_timeout())


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
    n = len(collect_guest_tests()[0])
    say(f"booting the test guest for {GUEST_TESTS}: {n} tests, budget {guest_budget(n):.0f} s (results in {results})")
    argv = guest_pytest_argv(GUEST_TESTS, *GUEST_PYTEST_ARGS)
    res = run_in_guest(argv, cwd=REPO, results_dir=results)
    boot = f"{res.boot_seconds:.1f} s" if res.boot_seconds is not None else "-"
    rep = res.report
    slowest = ""
    if rep is not None and rep.cases:
        nodeid, case = max(rep.cases.items(), key=lambda kv: kv[1].duration)
        slowest = f", slowest test {case.duration:.1f} s ({nodeid.removeprefix(GUEST_TESTS + '/')})"
    say(f"guest {res.status}: pytest exit code {res.exit_code}, boot {boot}, "
        f"total {res.elapsed_seconds:.1f} s of {res.budget_seconds:.0f} s{slowest}")
    problem = None
    if rep is None:
        problem = "pytest in the guest wrote no report"
    elif rep.unreadable and res.status == "ok":
        problem = f"{rep.unreadable} unreadable lines in the guest's report"
    return GuestRun(res, dict(rep.cases) if rep else {}, problem)


@pytest.mark.guest
@GUEST_TIMEOUT
def test_guest_run(guest_run: GuestRun):
    res = guest_run.result
    if res.status != "ok":
        pytest.fail(f"the guest run failed: {res.status}\n{res.describe()}", pytrace=False)
    problems = [guest_run.problem] if guest_run.problem else []
    rep = res.report
    if rep is not None:
        for nodeid, details in rep.collect_errors.items():
            problems.append(f"collection error in the guest: {nodeid}\n{details[-3000:]}")
        if rep.exitstatus is None:
            problems.append("pytest in the guest did not finish")
    known = set(collect_guest_tests()[0])
    unknown = sorted(f"{i}: {c.outcome} {c.message}" for i, c in guest_run.cases.items() if i not in known)
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
    case = guest_run.cases.get(guest_nodeid)
    if case is None:
        if res.report is not None and res.report.running == guest_nodeid:
            # The console tail shows where it hung: -v printed its name, the agent's warnings follow.
            pytest.fail(f"running when the guest run ended ({res.status}): it hung\n{res.describe()}", pytrace=False)
        if res.status != "ok":
            pytest.fail(f"not run: the guest run ended ({res.status}) before it, see test_guest_run", pytrace=False)
        pytest.fail(f"the guest reported no result for {guest_nodeid}, see test_guest_run", pytrace=False)
    if case.outcome == "skipped":
        pytest.skip(f"skipped in the guest: {case.message}")
    if case.outcome != "passed":
        details = "" if case.details.strip() in case.message else f"\n\n{case.details}"
        pytest.fail(f"{case.outcome} in the guest: {case.message}{details}", pytrace=False)


REPORT_PROBE = """
import pytest

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown broke")

def test_passes():
    pass

def test_fails():
    print("said before failing")
    assert 1 == 2, "one is not two"

def test_skips():
    pytest.skip("not here")

def test_errors_in_teardown(broken_teardown):
    pass
"""


def test_report_plugin_reports_each_outcome(tmp_path: Path):
    """The guest's per-test report, as the host reads it, for each kind of outcome (it relies on
    pytest's report objects, which may drift on upgrades)."""
    from cgguard.testkit.guest import REPORT_ENV, read_report

    (tmp_path / "test_probe.py").write_text(REPORT_PROBE)
    report = tmp_path / "report.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "cgguard.testkit.guest", "-q",
         "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, REPORT_ENV: str(report), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    rep = read_report(report)
    assert rep is not None, r.stdout + r.stderr
    assert rep.planned == 4 and rep.exitstatus == 1 and rep.running is None and not rep.collect_errors
    outcomes = {nodeid.split("::")[-1]: c for nodeid, c in rep.cases.items()}
    assert {k: c.outcome for k, c in outcomes.items()} == {
        "test_passes": "passed", "test_fails": "failed", "test_skips": "skipped", "test_errors_in_teardown": "error",
    }
    assert "one is not two" in outcomes["test_fails"].message
    assert "said before failing" in outcomes["test_fails"].details  # captured output comes along
    assert outcomes["test_skips"].message.endswith("not here")
    assert "teardown broke" in outcomes["test_errors_in_teardown"].message
