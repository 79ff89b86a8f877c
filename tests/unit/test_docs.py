"""The README's configuration reference is generated from the models; fail when they drift."""

import os
import re
import subprocess
import sys

from cgguard.configfile import reference_markdown
from conftest import REPO

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def readme() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def test_config_reference_matches_models():
    text = readme()
    body = text[text.index(START) + len(START) : text.index(END)].strip()
    assert body == reference_markdown().strip(), (
        "README configuration reference is stale: run "
        "'python -m cgguard config-reference' and paste it between the markers"
    )


def test_readme_commands_and_ci_agree():
    # The two set-up commands live in "## Set up": one runs the demo, one the whole suite.
    text = readme()
    setup = text[text.index("## Set up") : text.index("\n## ", text.index("## Set up") + 5)]
    blocks = re.findall(r"```sh\n(.*?)```", setup, re.S)
    test_cmd = [line for b in blocks for line in b.splitlines() if "pytest" in line and not line.startswith("#")]
    assert len(test_cmd) == 1
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = f.read()
    assert test_cmd[0].strip() in ci
    demo = [line for b in blocks for line in b.splitlines() if "cgguard demo" in line and not line.startswith("#")]
    assert len(demo) == 1


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "cgguard", "--help"], capture_output=True, text=True, cwd=REPO).stdout
    for cmd in ("run", "status", "tree", "incidents", "check-config", "ctl", "demo", "bench"):
        assert cmd in out
