"""The package's layout holds: the import contract in pyproject.toml (data flows one way, kernel
edges -> state -> detectors -> actions -> sinks -> agent -> CLI, and the runtime never imports the
test kit or the benchmark), and what the agent's command really loads when it starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _lint_imports() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    if not os.path.exists(exe):
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    return exe


def test_import_contract_is_kept():
    r = subprocess.run([_lint_imports(), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout, r.stdout[-2000:]


def test_import_contract_catches_a_layer_violation(tmp_path):
    """The contract is not vacuous: a detector that imports the agent breaks it."""
    exe = _lint_imports()
    pkg = tmp_path / "cgguard"
    # A copy of the package with one forbidden import added (the real tree is never touched).
    subprocess.run(["cp", "-r", os.path.join(REPO, "cgguard"), str(pkg)], check=True)
    with open(pkg / "detect" / "cgroup.py", "a") as f:
        f.write("\nimport cgguard.agent.core  # noqa: E402,F401\n")
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        (tmp_path / "pyproject.toml").write_text(f.read())
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([exe, "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout[-2000:]
    assert "cgguard.detect.cgroup -> cgguard.agent.core" in r.stdout, r.stdout[-3000:]


def test_the_agent_command_loads_no_harness():
    """`cgguard run` and the other runtime commands import neither the test kit, the benchmark nor
    their heavy dependencies (matplotlib, prometheus_client): idle memory is what the agent needs."""
    code = (
        "import sys, cgguard.cli, cgguard.cli.commands, cgguard.agent, cgguard.sinks.metrics\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('cgguard.testkit', 'cgguard.bench', 'matplotlib', "
        "'prometheus_client', 'pytest')))\n"
        "print(' '.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"the runtime loaded: {r.stdout.strip()}"
