"""Hostile or careless config files: each must end in one line naming the key, exit 2.

Before the fix, non-finite and absurd numbers were accepted (``detect.trajectory.min_usage: .inf``
silently turned that detector off), duplicate YAML keys were merged silently (last wins)
and a deeply nested file crashed the loader with an internal error.
"""

import pytest
from conftest import run_cli


def _one_line_exit_2(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


NON_FINITE_OR_HUGE = [
    ("detect:\n  trajectory:\n    min_rise: .inf\n", "detect.trajectory.min_rise"),
    ("detect:\n  fill_hold:\n    min_births_per_s: .inf\n", "detect.fill_hold.min_births_per_s"),
    ("detect:\n  trajectory:\n    min_usage: .nan\n", "detect.trajectory.min_usage"),
    ("kill_budget:\n  per_seconds: .inf\n", "kill_budget.per_seconds"),
    ("kill_budget:\n  per_seconds: 1e26\n", "kill_budget.per_seconds"),
    ("kill_budget:\n  max_actions: 99999999999999\n", "kill_budget.max_actions"),
    ("remove_timeout_ms: 99999999999999\n", "remove_timeout_ms"),
    ("sampling:\n  calm_after_ms: 99999999999999\n", "sampling.calm_after_ms"),
    ("detect:\n  lineage:\n    window_ms: 99999999999999\n", "detect.lineage.window_ms"),
    ("detect:\n  lineage:\n    min_family: 99999999999999\n", "detect.lineage.min_family"),
    ("detect:\n  pinned:\n    hold_ms: 99999999999999\n", "detect.pinned.hold_ms"),
    ("detect:\n  pinned:\n    min_refused: 99999999999999\n", "detect.pinned.min_refused"),
]


@pytest.mark.parametrize("text,key", NON_FINITE_OR_HUGE)
def test_check_config_rejects_non_finite_and_out_of_range(tmp_path, text, key):
    f = tmp_path / "c.yaml"
    f.write_text("watch: ['a/**']\n" + text)
    _one_line_exit_2(run_cli("check-config", str(f)), key)


@pytest.mark.parametrize("text,key", NON_FINITE_OR_HUGE[:3] + NON_FINITE_OR_HUGE[6:7])
def test_run_rejects_non_finite_and_out_of_range_before_starting(tmp_path, text, key):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    r = run_cli("run", "--config", str(f), "--watch", "nothing-here/**", "--state-dir", str(tmp_path / "s"),
                "--listen", "", "--control-socket", "")
    _one_line_exit_2(r, key)
    assert not (tmp_path / "s").exists()  # refused before it touched anything


def test_toml_non_finite_is_rejected(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('watch = ["a/**"]\n[detect.trajectory]\nmin_rise = inf\n')
    _one_line_exit_2(run_cli("check-config", str(f)), "detect.trajectory.min_rise")
    f.write_text('watch = ["a/**"]\n[kill_budget]\nper_seconds = nan\n')
    _one_line_exit_2(run_cli("check-config", str(f)), "kill_budget.per_seconds")


@pytest.mark.parametrize(
    "text,key,line",
    [
        ("watch: ['a/**']\nwatch: ['b/**']\n", "watch", 2),
        ("watch: ['a/**']\ndetect:\n  trajectory:\n    min_rise: 0.1\n    min_rise: 0.2\n", "min_rise", 5),
        ("detect:\n  pinned: {min_refused: 6}\nwatch: ['a/**']\ndetect: {}\n", "detect", 4),
        ("watch: ['a/**']\nrules:\n  - match: 'x/*'\n    action: report\n    action: freeze\n", "action", 5),
    ],
)
def test_yaml_duplicate_key_is_an_error(tmp_path, text, key, line):
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    msg = _one_line_exit_2(run_cli("check-config", str(f)), "duplicate key", repr(key), f"line {line}")
    assert str(f) in msg
    r = run_cli("run", "--config", str(f), "--watch", "nothing-here/**", "--listen", "", "--control-socket", "",
                "--state-dir", str(tmp_path / "s"))
    _one_line_exit_2(r, "duplicate key", repr(key))


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    # '<<' merges a mapping and a key next to it overrides on purpose; that is not a duplicate.
    f = tmp_path / "merge.yaml"
    f.write_text(
        "watch: ['a/**']\n"
        "detect:\n"
        "  trajectory:\n"
        "    <<: {min_rise: 0.2, window_ms: 800}\n"
        "    min_rise: 0.3\n"
        "rules:\n"
        "  - &r {match: 'x/*', action: report}\n"
        "  - <<: *r\n"
        "    action: freeze\n"
    )
    r = run_cli("check-config", str(f))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "text,needle",
    [
        ('watch = ["a/**"]\nwatch = ["b/**"]\n', "line 2"),
        ('watch = ["a/**"]\n[detect.pinned]\nmin_refused = 6\nmin_refused = 7\n', "line 4"),
        ('watch = ["a/**"]\n[kill_budget]\nmax_actions = 2\n[kill_budget]\nper_seconds = 9\n', "line 4"),
    ],
)
def test_toml_duplicate_key_is_an_error(tmp_path, text, needle):
    f = tmp_path / "dup.toml"
    f.write_text(text)
    _one_line_exit_2(run_cli("check-config", str(f)), "not valid TOML", needle)


@pytest.mark.parametrize("suffix,text", [
    ("yaml", "watch: " + "[" * 5000 + "]" * 5000 + "\n"),
    ("toml", "watch = " + "[" * 5000 + "]" * 5000 + "\n"),
    ("yaml", "watch: ['a/**']\nx: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"),
])
def test_deeply_nested_file_is_a_clean_error(tmp_path, suffix, text):
    f = tmp_path / f"deep.{suffix}"
    f.write_text(text)
    _one_line_exit_2(run_cli("check-config", str(f)), "nested")
