import pytest

from cgguard import config
from cgguard.config import Action, ConfigError, build, glob_match, glob_may_match_below
from conftest import run_cli


@pytest.mark.parametrize(
    "glob,path,want",
    [
        ("kubepods.slice/**", "kubepods.slice", True),
        ("kubepods.slice/**", "kubepods.slice/a/b/c", True),
        ("kubepods.slice/**", "kubepods.slicex/a", False),
        ("system.slice/*.service", "system.slice/nginx.service", True),
        ("system.slice/*.service", "system.slice/nginx.service/sub", False),
        ("system.slice/*.service", "system.slice/foo.socket", False),
        ("user.slice/user-*.slice/**", "user.slice/user-1000.slice/session-3.scope", True),
        ("user.slice/user-*.slice/**", "user.slice/other.slice/x", False),
        ("a/*", "a/b/c", False),
        ("a/**/c", "a/c", True),
        ("a/**/c", "a/x/y/c", True),
        ("**", "anything/at/all", True),
        ("**/x.service", "x.service", True),
    ],
)
def test_glob_match(glob, path, want):
    assert glob_match(glob, path) is want


def test_glob_may_match_below_prunes():
    assert glob_may_match_below("system.slice/*.service", "system.slice")
    assert not glob_may_match_below("system.slice/*.service", "user.slice")
    assert not glob_may_match_below("system.slice/*.service", "system.slice/a.service/deeper")
    assert glob_may_match_below("kubepods.slice/**", "kubepods.slice/x/y/z")


def test_defaults_and_overrides():
    cfg = build({"watch": ["a/**"], "detect": {"lineage": {"min_family": 12}}}, {"dry_run": True, "action": "report"})
    assert cfg.dry_run is True
    assert cfg.action == Action.report
    assert cfg.detect.lineage.min_family == 12
    assert cfg.tracking.reset_interval_ms == 30000
    assert cfg.state_dir == "/var/lib/cgguard"


def test_rules_first_match_wins():
    cfg = build({"watch": ["**"], "rules": [{"match": "system.slice/*", "action": "report"},
                                           {"match": "**", "action": "freeze"}]})
    assert cfg.action_for("system.slice/x.service") == Action.report
    assert cfg.action_for("user.slice/u") == Action.freeze


@pytest.mark.parametrize(
    "data,key",
    [
        ({"watch": ["/abs/path"]}, "watch[0]"),
        ({"watch": ["a/../b"]}, "watch[0]"),
        ({"kill_budget": {"max_actions": 0}}, "kill_budget.max_actions"),
        ({"sampling": {"fast_interval_ms": 5000, "slow_interval_ms": 1000}}, "sampling"),
        ({"listen": "nonsense"}, "listen"),
        ({"tracking": {"reset_interval_ms": -1}}, "tracking.reset_interval_ms"),
        ({"action": "explode"}, "action"),
        ({"unknown_key": 1}, "unknown_key"),
        ({"surgical_fallback": "freeze"}, "surgical_fallback"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        build(data)
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_check_config_ok_yaml_and_toml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("watch: ['user.slice/**']\nprotect: ['user.slice/keep']\n")
    r = run_cli("check-config", str(y))
    assert r.returncode == 0 and "ok" in r.stdout
    t = tmp_path / "c.toml"
    t.write_text('watch = ["system.slice/*.service"]\n[tracking]\nreset_interval_ms = 5000\n')
    r = run_cli("check-config", str(t))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "text,needle",
    [
        ("watch: [", "not valid YAML"),
        ("- just\n- a list\n", "mapping"),
        ("watch: ['/x']\n", "watch[0]"),
        ("detect:\n  trajectory:\n    min_usage: 1.5\n", "detect.trajectory.min_usage"),
    ],
)
def test_check_config_bad_file_one_line_exit_2(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    r = run_cli("check-config", str(f))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_missing_config_file(tmp_path):
    r = run_cli("check-config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "No such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run"], "nothing to watch"),
        (["run", "--watch", "/abs"], "watch[0]"),
        (["run", "--watch", "a/**", "--action", "nuke"], "invalid choice"),
        (["run", "--watch", "a/**", "--listen", "nope"], "listen"),
        (["run", "--watch", "a/**", "--cgroup-root", "/tmp"], "not a cgroup2 mount"),
        (["frobnicate"], "invalid choice"),
        (["ctl", "reset-interval", "abc"], "whole number"),
    ],
)
def test_bad_flags_one_line_exit_2(args, needle, tmp_path):
    if args[0] == "ctl":
        args = ["ctl", "--control-socket", str(tmp_path / "none.sock"), *args[1:]]
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_reference_is_generated_from_models():
    ref = config.reference_markdown()
    for key in ("watch", "detect.lineage.min_family", "tracking.reset_interval_ms", "kill_budget.max_actions"):
        assert f"`{key}`" in ref
