import math
import types
import typing
from typing import Annotated

import annotated_types as at
import pytest
from conftest import run_cli
from pydantic import BaseModel, Field, ValidationError
from pydantic.fields import FieldInfo

from cgguard import config, configfile
from cgguard.config import Action, ConfigError, build
from cgguard.globs import glob_match, glob_may_match_below


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
    ref = configfile.reference_markdown()
    for key in ("watch", "detect.lineage.min_family", "tracking.reset_interval_ms", "kill_budget.max_actions"):
        assert f"`{key}`" in ref


# -- every numeric field is bounded and finite --------------------------------------------------
# Generic on purpose: a field added later (any section, any depth, optional or in a list) is
# walked too, so it cannot slip in unbounded.


class _Leaf(typing.NamedTuple):
    key: str  # dotted, as in the config file
    model: type[BaseModel]
    name: str
    base: type  # int or float
    metadata: list
    in_container: bool  # reached through a list/dict: the file key has an index in it
    wrap: typing.Callable  # the field's value holding one such number: v, [v] or {"k": v}


def _strip(ann):
    return typing.get_args(ann)[0] if typing.get_origin(ann) is typing.Annotated else ann


def _leaves(ann):
    """Every type an annotation can hold, through unions, Optional, list/dict/tuple elements."""
    origin = typing.get_origin(ann)
    if origin is None or origin is typing.Annotated:
        return [ann]
    return [leaf for a in typing.get_args(ann) if a is not Ellipsis for leaf in _leaves(a)]


def _bounds(metadata) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in metadata:
        if isinstance(m, FieldInfo):  # Annotated[int, Field(ge=..., le=...)] on an element
            mlo, mhi = _bounds(m.metadata)
            lo, hi = lo if mlo is None else mlo, hi if mhi is None else mhi
        if isinstance(m, at.GroupedMetadata):  # Interval(ge=..., le=...)
            mlo, mhi = _bounds(list(m))
            lo, hi = lo if mlo is None else mlo, hi if mhi is None else mhi
        if isinstance(m, (at.Ge, at.Gt)):
            lo = m.ge if isinstance(m, at.Ge) else m.gt
        if isinstance(m, (at.Le, at.Lt)):
            hi = m.le if isinstance(m, at.Le) else m.lt
    return lo, hi


def _wrapper(ann) -> typing.Callable:
    """How to put one number where the field expects it (through Optional, into a list or dict)."""
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(ann) if a is not type(None)]
        return _wrapper(inner[0]) if len(inner) == 1 else (lambda v: v)
    if origin in (list, tuple, set, frozenset):
        return lambda v: [v]
    if origin is dict:
        return lambda v: {"k": v}
    return lambda v: v


def _numeric_fields(model: type[BaseModel], prefix: str = "", in_container: bool = False, seen=None):
    seen = set() if seen is None else seen
    for name, f in model.model_fields.items():
        origin = typing.get_origin(f.annotation)
        container = origin is not None and origin not in (typing.Union, types.UnionType)
        for leaf in _leaves(f.annotation):
            base = _strip(leaf)
            if isinstance(base, type) and issubclass(base, BaseModel):
                if base not in seen:
                    seen.add(base)
                    yield from _numeric_fields(base, f"{prefix}{name}.", in_container or container, seen)
            elif isinstance(base, type) and issubclass(base, (int, float)) and not issubclass(base, bool):
                inner = list(typing.get_args(leaf)[1:]) if leaf is not base else []
                # A list element's bounds live on the element type, a scalar's on the field.
                meta = inner if container else list(f.metadata) + inner
                yield _Leaf(f"{prefix}{name}", model, name, base, meta, in_container or container, _wrapper(f.annotation))


NUMERIC = list(_numeric_fields(config.Config))


def test_the_walk_finds_the_numeric_fields():
    keys = {leaf.key for leaf in NUMERIC}
    assert {"kill_budget.per_seconds", "detect.trajectory.min_rise", "tracking.reset_interval_ms",
            "remove_timeout_ms", "detect.lineage.min_abandoners", "budget.default_tasks"} <= keys
    assert not {"dry_run", "realtime", "detect.pinned.enabled"} & keys  # bools are not numbers


def test_the_walk_catches_what_a_new_section_could_get_wrong():
    # The walk itself must not be blind: a made-up section with the usual shapes.
    class Hook(config._Model):
        timeout_ms: int = Field(1000, ge=1, le=60_000)
        retries: int = 3  # unbounded

    class Journal(config._Model):
        rate: float | None = Field(None, gt=0)  # no maximum
        levels: list[Annotated[int, Field(ge=0, le=7)]] = Field(default_factory=list)
        weights: dict[str, float] = Field(default_factory=dict)  # elements unbounded

    class Extra(config._Model):
        hooks: list[Hook] = Field(default_factory=list)
        journal: Journal | None = None
        enabled: bool = True

    found = {leaf.key: _bounds(leaf.metadata) for leaf in _numeric_fields(Extra)}
    assert found == {
        "hooks.timeout_ms": (1, 60_000),
        "hooks.retries": (None, None),
        "journal.rate": (0, None),
        "journal.levels": (0, 7),
        "journal.weights": (None, None),
    }
    levels = next(leaf for leaf in _numeric_fields(Extra) if leaf.key == "journal.levels")
    assert levels.wrap(8) == [8] and levels.in_container


@pytest.mark.parametrize("leaf", NUMERIC, ids=[leaf.key for leaf in NUMERIC])
def test_every_numeric_field_has_both_bounds_and_rejects_non_finite(leaf):
    lo, hi = _bounds(leaf.metadata)
    assert lo is not None and hi is not None, f"{leaf.key}: give it Field(ge=..., le=...)"
    assert math.isfinite(lo) and math.isfinite(hi) and lo < hi, leaf.key

    def rejected(value) -> bool:
        try:
            leaf.model.model_validate({leaf.name: leaf.wrap(value)})
        except ValidationError as e:
            return any(err["loc"][:1] == (leaf.name,) for err in e.errors())
        return False

    for bad in (math.inf, -math.inf, math.nan, "inf", "-inf", "nan", "1e400"):
        assert rejected(bad), f"{leaf.key} accepts {bad!r}"
    assert rejected(hi + 1), f"{leaf.key} accepts more than its maximum {hi}"
    assert rejected(lo - 1), f"{leaf.key} accepts less than its minimum {lo}"
    assert not rejected(hi) and not rejected(lo + (0 if isinstance(lo, int) and leaf.base is int else 1e-3)), leaf.key


def test_bounds_errors_name_the_full_key():
    for leaf in NUMERIC:
        if leaf.in_container:
            continue  # the file key has an index; the per-model test above covers it
        data: dict = {}
        cur = data
        parts = leaf.key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = math.inf
        with pytest.raises(ConfigError) as e:
            build(data)
        assert leaf.key in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_protect_covers_the_subtree_and_aggregates_only_the_level():
    cfg = build({"watch": ["user.slice/**"], "protect": ["user.slice/user-0.slice"], "aggregates": ["user.slice/user-*.slice"]})
    assert cfg.refusal("user.slice/user-0.slice").startswith("protected")
    assert cfg.refusal("user.slice/user-0.slice/session-1.scope").startswith("below a protected cgroup")
    assert cfg.refusal("user.slice/user-1000.slice").startswith("an aggregation level")
    assert cfg.refusal("user.slice/user-1000.slice/session-3.scope") is None
    assert cfg.refusal("system.slice/x.service") == "outside the watch globs"
