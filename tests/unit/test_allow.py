"""Allow rules: the config an operator writes (``allow:``), what ``check-config`` says about it,
and how the agent matches a verdict's origin against it (``ContextBuilder._allow``), including a tool
whose first copy exited before its image was read (simulated tree, tests/lineage_sim.py).
End to end with real processes: tests/integration/test_operating.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from conftest import run_cli
from lineage_sim import MS, Sim

from cgguard.agent.context import ContextBuilder
from cgguard.config import AllowRule, Config, ConfigError, LineageDetect
from cgguard.configfile import load
from cgguard.detect import Origin, Verdict
from cgguard.detect.lineage import detect_lineage


# -- the config ------------------------------------------------------------------------------------
def test_rule_fields_and_description():
    r = AllowRule(comm="fd", cmdline=r"fanout\.sh ", match="build.slice/**", mode="exempt")
    assert r.describe() == "allow rule (exempt: comm~'fd', cmdline~'fanout\\\\.sh ' in build.slice/**)"
    assert AllowRule(comm="make").mode == "relax" and AllowRule(comm="make").match == "**"


@pytest.mark.parametrize(
    "rule,args,want",
    [
        ({"comm": "fd"}, ("a/b", None, "fd", "fd -e c"), True),
        ({"comm": "fd"}, ("a/b", None, "fdfind", "fdfind"), False),  # comm: the whole name
        ({"cmdline": r"fanout\.sh "}, ("a", None, "bash", "/bin/bash /x/fanout.sh 6"), True),  # searched
        ({"cmdline": r"fanout\.sh "}, ("a", None, "bash", None), False),  # unknown never matches
        ({"exe": "/usr/bin/make"}, ("a", "/usr/bin/make", "make", "make -j8"), True),
        ({"exe": "/usr/bin/make"}, ("a", "/usr/bin/make.real", "make", "make"), False),  # exe: the whole path
        ({"exe": "/usr/bin/make"}, ("a", None, "make", "make"), False),
        ({"comm": "make", "cmdline": "-j"}, ("a", None, "make", "make all"), False),  # every field given must match
        ({"comm": "make", "match": "build/*"}, ("build/x", None, "make", "make"), True),
        ({"comm": "make", "match": "build/*"}, ("build/x/y", None, "make", "make"), False),
        ({"comm": "make", "match": "build/**"}, ("build/x/y", None, "make", "make"), True),
    ],
)
def test_rule_matching(rule, args, want):
    assert AllowRule(**rule).matches(*args) is want


def write(tmp_path, text: str) -> str:
    f = tmp_path / "cgguard.yaml"
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize(
    "rule,needle",
    [
        ("{comm: 'fd(', mode: relax}", "allow[0].comm: 'fd(' is not a valid regular expression"),
        ("{cmdline: '[a-', mode: relax}", "allow[0].cmdline: '[a-' is not a valid regular expression"),
        ("{exe: '*make'}", "allow[0].exe: '*make' is not a valid regular expression"),
        ("{mode: exempt}", "allow[0]: an allow rule needs exe, comm or cmdline"),
        ("{comm: make, mode: strict}", "allow[0].mode"),
        ("{comm: make, match: '../x'}", "allow[0].match"),
    ],
)
def test_check_config_rejects_a_bad_rule_in_one_line(tmp_path, rule, needle):
    path = write(tmp_path, f"watch: ['x/*']\nallow:\n  - {rule}\n")
    r = run_cli("check-config", path)
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr and path in r.stderr
    with pytest.raises(ConfigError):
        load(path)


def test_check_config_prints_the_allow_rules_it_read(tmp_path):
    path = write(tmp_path, r"""watch: ['x/*']
allow:
  - {comm: fd}
  - {cmdline: 'fanout\.sh ', match: 'ci.slice/**', mode: relax}
  - {exe: "/usr/bin/make", cmdline: "(^| )-j\\d", mode: exempt}
""")
    r = run_cli("check-config", path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == [
        "allow: relax comm~'fd' in '**'",
        r"allow: relax cmdline~'fanout\.sh ' in 'ci.slice/**'",  # the regex as parsed, not repr'd
        r"allow: exempt exe~'/usr/bin/make' cmdline~'(^| )-j\d' in '**'",
    ]
    r = run_cli("check-config", write(tmp_path, "watch: ['x/*']\n"))
    assert r.returncode == 0 and "allow:" not in r.stdout


# -- the agent's match ---------------------------------------------------------------------------
class _Agent:
    """Just what ``ContextBuilder._allow`` reads: the config and the lineage tree."""

    _allow = ContextBuilder._allow
    _copy_image = ContextBuilder._copy_image

    def __init__(self, sim: Sim | None, *rules: dict[str, Any]):
        self.cfg = Config(allow=[AllowRule(**r) for r in rules])
        self.tracking = None if sim is None else SimpleNamespace(tree=sim.tree, origin_exe=lambda ref: None)


def fire_and_forget(sim: Sim, depth: int, tool: str = "fanout.sh") -> tuple[int, Verdict]:
    """A build's shell runs ``tool``, which starts two copies of itself one level down and exits
    (fork + exec per copy); the tree hears the whole burst before it flushes, as the agent does
    when the first copy lives only milliseconds. Returns (the shell's pid, the verdict)."""
    shell = sim.start("bash", "bash -c build")
    sim.tree.flush()

    def run(pid: int, d: int) -> None:
        if d == 0:
            return
        kids = [sim.spawn(pid, tool, f"/bin/bash /opt/{tool} {d - 1}") for _ in range(2)]
        sim.exit(pid)
        for k in kids:
            run(k, d - 1)

    top = sim.spawn(shell, tool, f"/bin/bash /opt/{tool} {depth}")
    run(top, depth)
    sim.tick(MS)
    sim.tree.flush()
    v = detect_lineage(sim.tree, "sim", sim.t, LineageDetect())
    assert v is not None and v.origin is not None
    return shell, v


RELAX_FANOUT = {"cmdline": r"/fanout\.sh ", "mode": "relax"}


def test_known_origin_matches_relax_or_exempt():
    v = Verdict("sim", "lineage", (), 40, 0, 1, "lineage", origin=Origin(7, 1, "fanout.sh", "/bin/bash /opt/fanout.sh 6", False))
    assert _Agent(None, RELAX_FANOUT)._allow("sim", v) == (None, "allow rule (relax: cmdline~'/fanout\\\\.sh ' in **)")
    exempt = {**RELAX_FANOUT, "mode": "exempt"}
    assert _Agent(None, {"comm": "make"}, exempt)._allow("sim", v) == ("allow rule (exempt: cmdline~'/fanout\\\\.sh ' in **)", None)
    assert _Agent(None, {**RELAX_FANOUT, "match": "other/**"})._allow("sim", v) == (None, None)
    assert _Agent(None)._allow("sim", v) == (None, None)


@pytest.mark.parametrize("depth", [5, 8])  # 8: the first live copies sit below 254 gone ones
def test_origin_gone_before_its_image_was_read_matches_on_a_live_copy(depth):
    sim = Sim()
    _, v = fire_and_forget(sim, depth)
    # The defect this guards against: what the origin ran is unknown at verdict time.
    assert v.origin is not None and (v.origin.comm, v.origin.cmdline) == (None, None) and not v.origin.alive
    exempt, relaxed = _Agent(sim, RELAX_FANOUT)._allow("sim", v)
    assert exempt is None and relaxed is not None
    assert relaxed.startswith("allow rule (relax: cmdline~'/fanout\\\\.sh ' in **) (matched on its copy ")
    pid = int(relaxed.split("matched on its copy ")[1].split(":")[0])
    assert sim.procs[pid].cmdline == "/bin/bash /opt/fanout.sh 0"  # a live leaf of the tool


def test_a_copy_running_another_program_does_not_speak_for_the_origin():
    sim = Sim()
    _, v = fire_and_forget(sim, 5, tool="bomb.sh")
    assert _Agent(sim, RELAX_FANOUT)._allow("sim", v) == (None, None)
    # An origin whose comm is known (read from a zombie) is not described by a different copy.
    named = Verdict("sim", "lineage", (), 40, 0, 1, "lineage", origin=Origin(7, 1, "bomb", None, False), origin_ref=v.origin_ref)
    assert _Agent(sim, {"cmdline": r"bomb\.sh", "mode": "relax"})._allow("sim", named) == (None, None)


def test_copy_search_is_bounded():
    sim = Sim()
    _, v = fire_and_forget(sim, 8)
    agent = _Agent(sim, RELAX_FANOUT)
    assert agent._copy_image(v.origin_ref, visits=200) is None  # the live leaves are records 255 on
    assert agent._copy_image(v.origin_ref, visits=600) is not None

    sim = Sim()
    _, v = fire_and_forget(sim, 8)
    for leaf in [p for p in sim.procs.values() if p.comm == "fanout.sh"]:
        del sim.procs[leaf.pid]  # gone from /proc, exits not yet heard: every read fails
    before = sim.proc.reads
    assert _Agent(sim, RELAX_FANOUT)._copy_image(v.origin_ref) is None
    assert sim.proc.reads - before == 8  # not one per member of a large family
