"""Configuration: pydantic models, file loading (YAML or TOML), and flag overrides.

Every bad value becomes one line naming the key (``ConfigError``), never a traceback. The models
are also the source of the configuration reference in the README (``cgguard config-reference``).
"""

from __future__ import annotations

import fnmatch
import os
import re
from enum import Enum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(Exception):
    """A configuration problem, worded for the operator, one line."""


class Action(str, Enum):
    auto = "auto"  # kill-cgroup when the bomb owns the cgroup, else kill-lineage
    kill_cgroup = "kill-cgroup"
    kill_lineage = "kill-lineage"
    freeze = "freeze"  # keep it frozen for forensics
    report = "report"


_GLOB_OK = re.compile(r"^[A-Za-z0-9_.:@*?\[\]!\-/\\=+,%]+$")


def check_glob(glob: str) -> str:
    g = glob.strip()
    if not g:
        raise ValueError("empty glob")
    if g.startswith("/"):
        raise ValueError(f"{glob!r}: must be relative to the cgroup2 root (no leading '/')")
    if ".." in g.split("/"):
        raise ValueError(f"{glob!r}: '..' is not allowed")
    if not _GLOB_OK.match(g):
        raise ValueError(f"{glob!r}: unexpected characters")
    for part in g.split("/"):
        if "**" in part and part != "**":
            raise ValueError(f"{glob!r}: '**' must be a whole path component")
    return g.strip("/")


Glob = Annotated[str, AfterValidator(check_glob)]


class _Model(BaseModel):
    # allow_inf_nan=False: '.inf' or '.nan' in a threshold would silently switch a detector off
    # (nothing is ever >= inf), so non-finite floats are refused in every section.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False, allow_inf_nan=False)


# Upper bounds: every number has one (tests/unit/test_config.py walks the models to prove it).
HOUR_MS = 3_600_000
PID_LIMIT = 4_194_304  # the kernel's PID_MAX_LIMIT: no count of tasks can exceed it
# The per-cgroup sample history reaches back 5 s (cgguard.state.samples.History), so a growth
# or fork-failure window beyond it would silently be cut to 5 s, and a saturation hold must fit
# inside it with a sample to spare or that detector would never fire.
HISTORY_MS = 5000
MAX_COUNT = 1_000_000


class Rule(_Model):
    """Per-glob action override; the first matching rule wins."""

    match: Glob = Field(description="Glob of cgroups (relative to the cgroup2 root) this rule applies to.")
    action: Action = Field(description="What to do with a bomb found in a matching cgroup.")


class KillBudget(_Model):
    """Stops a detector gone wrong from emptying a node: at most N actions per window."""

    max_actions: int = Field(5, ge=1, le=10_000, description="Actions allowed per window; further verdicts are only reported.")
    per_seconds: float = Field(60.0, gt=0, le=86_400, description="Length of the budget window in seconds.")


class Sampling(_Model):
    """How often task counts are sampled (pids.current cannot be watched with inotify)."""

    fast_interval_ms: int = Field(20, ge=5, le=1000, description="Interval while a cgroup grows.")
    slow_interval_ms: int = Field(1000, ge=100, le=60000, description="Interval while a cgroup is calm.")
    calm_after_ms: int = Field(2000, ge=100, le=HOUR_MS, description="Stay fast this long after the last growth.")
    calm_backoff_max_ms: int = Field(
        4000,
        ge=100,
        le=60000,
        description="With the proc connector on, an unchanged calm cgroup is sampled ever more rarely, up to this; "
        "a fork in it wakes it at once.",
    )

    @model_validator(mode="after")
    def _order(self) -> "Sampling":
        if self.fast_interval_ms > self.slow_interval_ms:
            raise ValueError("fast_interval_ms must not exceed slow_interval_ms")
        if self.calm_backoff_max_ms < self.slow_interval_ms:
            raise ValueError("calm_backoff_max_ms must not be below slow_interval_ms")
        return self


class GrowthParams(_Model):
    """Cgroup-level growth: many tasks, multiplied quickly and still rising (not churn or a burst)."""

    min_tasks: int = Field(512, ge=8, le=PID_LIMIT, description="Never flag a cgroup with fewer tasks than this.")
    window_ms: int = Field(1000, ge=50, le=HISTORY_MS, description="Window over which growth is measured.")
    min_factor: float = Field(4.0, gt=1.0, le=1000.0, description="Tasks must multiply by at least this within the window.")
    min_rate_per_s: float = Field(500.0, gt=0, le=float(PID_LIMIT), description="Net growth in tasks per second.")
    rising_samples: int = Field(3, ge=1, le=100, description="The count must have risen in each of the last N samples.")


class SaturationParams(_Model):
    """pids.max saturation: a cgroup sitting at its limit (only where pids.max exists)."""

    enabled: bool = Field(True, description="Use this detector.")
    ratio: float = Field(0.95, gt=0, le=1.0, description="Fraction of pids.max that counts as full.")
    hold_ms: int = Field(1000, ge=0, le=HISTORY_MS - 1000, description="How long the cgroup must stay full.")
    min_forks_refused: int = Field(10, ge=0, le=MAX_COUNT, description="Also require this many refused forks (pids.events max).")


class ForkFailureParams(_Model):
    """Forks refused at pids.max (pids.events), a rate of them means something keeps retrying."""

    enabled: bool = Field(True, description="Use this detector.")
    min_failures: int = Field(50, ge=1, le=MAX_COUNT, description="Refused forks within the window that make a verdict.")
    window_ms: int = Field(2000, ge=100, le=HISTORY_MS, description="Window for counting refused forks.")


class LineageDetect(_Model):
    """The seed's rule (worst-scoring record subtree, only with a large enough family) plus replication."""

    enabled: bool = Field(True, description="Use this detector (needs lineage tracking).")
    min_family: int = Field(10, ge=2, le=PID_LIMIT, description="The seed's floor: smaller families are left to the OOM killer.")
    min_generations: int = Field(
        5, ge=2, le=PID_LIMIT, description="Clone generations in which every member forked (a bomb reaches 5 at ~32 members)."
    )
    min_forkers: int = Field(12, ge=2, le=PID_LIMIT, description="Distinct forking members in the replicating chain.")
    window_ms: int = Field(5000, ge=50, le=HOUR_MS, description="Forks older than this (before the newest fork) do not count.")
    wide_min_generations: int = Field(3, ge=2, le=PID_LIMIT, description="Wide replication: clone generations (fork-loop bombs at a cap).")
    wide_min_forkers: int = Field(64, ge=2, le=PID_LIMIT, description="Wide replication: distinct forking members.")
    wide_min_family: int = Field(512, ge=10, le=PID_LIMIT, description="Wide replication: live descendants.")


class Detect(_Model):
    """Detector thresholds. Defaults catch a classic bash bomb and spare builds, pools and churn."""

    growth: GrowthParams = GrowthParams()
    saturation: SaturationParams = SaturationParams()
    fork_failures: ForkFailureParams = ForkFailureParams()
    lineage: LineageDetect = LineageDetect()


class Tracking(_Model):
    """Process tracking through the proc connector (the lineage records), with the seed's aging knobs."""

    connector: bool = Field(True, description="Listen to the proc connector at all; false: sampling only (--no-lineage).")
    enabled: bool = Field(
        True, description="Make lineage records (the seed's mm_tracker_enable); 'cgguard ctl tracking' flips it at run time."
    )
    reset_interval_ms: int = Field(
        30000, ge=100, le=2**32 - 1, description="Aging interval (the seed's mm_tracker_reset_interval_msecs)."
    )
    rcvbuf_mib: int = Field(32, ge=1, le=1024, description="Proc connector receive buffer.")


class Config(_Model):
    """cgguard configuration. Paths and globs are relative to the cgroup2 root."""

    watch: list[Glob] = Field(default_factory=list, description="Globs of cgroups to guard: '*' one level, '**' any depth.")
    protect: list[Glob] = Field(default_factory=list, description="Globs never acted on (still watched and reported).")
    cgroup_root: str | None = Field(None, description="cgroup2 mount point; found from /proc/self/mountinfo if unset.")
    state_dir: str = Field("/var/lib/cgguard", description="Directory of incidents.jsonl.")
    listen: str = Field("127.0.0.1:9750", description="HOST:PORT for /healthz, /readyz and /metrics; '' disables.")
    control_socket: str = Field("/run/cgguard/control.sock", description="Root-only socket for 'cgguard ctl'.")
    dry_run: bool = Field(False, description="Detect and record, never act.")
    action: Action = Field(Action.auto, description="Default action on a verdict.")
    rules: list[Rule] = Field(default_factory=list, description="Per-glob action overrides, first match wins.")
    kill_budget: KillBudget = KillBudget()
    surgical_fallback: Action = Field(
        Action.kill_cgroup,
        description="When a surgical kill cannot freeze or move the lineage: kill-cgroup or report.",
    )
    remove_timeout_ms: int = Field(5000, ge=100, le=600_000, description="How long to wait for 'populated 0' before retrying.")
    sampling: Sampling = Sampling()
    detect: Detect = Detect()
    tracking: Tracking = Tracking()
    realtime: bool = Field(True, description="Run the agent at SCHED_RR priority 1 so a bomb cannot starve it.")
    log_level: str = Field("info", description="debug, info, warning or error.")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v == "":
            return v
        parse_listen(v)
        return v

    @field_validator("surgical_fallback")
    @classmethod
    def _fallback(cls, v: Action) -> Action:
        if v not in (Action.kill_cgroup, Action.report):
            raise ValueError("must be kill-cgroup or report")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("must be debug, info, warning or error")
        return v.lower()

    def action_for(self, cgroup: str) -> Action:
        for rule in self.rules:
            if glob_match(rule.match, cgroup):
                return rule.action
        return self.action


def parse_listen(v: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"{v!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


# -- globs -----------------------------------------------------------------------------------
def _glob_regex(glob: str) -> re.Pattern[str]:
    rx = ""
    parts = glob.strip("/").split("/")
    if parts == ["**"]:
        return re.compile(".*")
    for part in parts:
        if part == "**":
            # '**' spans zero or more whole levels: 'a/**' matches 'a' itself and all below it,
            # '**/x' matches 'x' at any depth.
            rx = f"{rx}(?:/.*)?" if rx else "(?:.*/)?"
            continue
        piece = fnmatch.translate(part)
        piece = piece[len("(?s:") : -len(")\\Z")] if piece.startswith("(?s:") else piece
        # fnmatch's '*' crosses '/'; here it stays within one level.
        piece = piece.replace(".*", "[^/]*")
        rx += ("/" if rx and not rx.endswith("/)?") else "") + piece
    return re.compile(rx)


_cache: dict[str, re.Pattern[str]] = {}


def glob_match(glob: str, path: str) -> bool:
    rx = _cache.get(glob)
    if rx is None:
        rx = _cache[glob] = _glob_regex(glob)
    return rx.fullmatch(path.strip("/")) is not None


def glob_static_prefix(glob: str) -> str:
    """The longest leading part of a glob without wildcards: where watching has to start."""
    out = []
    for part in glob.strip("/").split("/"):
        if any(c in part for c in "*?["):
            break
        out.append(part)
    return "/".join(out)


def glob_may_match_below(glob: str, path: str) -> bool:
    """Could a descendant of ``path`` (or path itself) match ``glob``? Prunes directory watches."""
    gparts = glob.strip("/").split("/")
    pparts = [p for p in path.strip("/").split("/") if p]
    for i, pp in enumerate(pparts):
        if i >= len(gparts):
            return False
        g = gparts[i]
        if g == "**":
            return True
        if not glob_match(g, pp):
            return False
    return True


# -- loading ---------------------------------------------------------------------------------
def _format_error(e: ValidationError) -> str:
    err = e.errors()[0]
    # A key is whatever the file says: quote any that would break the one-line message.
    loc = "".join(
        f"[{x}]" if isinstance(x, int) else f".{x}" if str(x).isprintable() else f".{str(x)!r}" for x in err["loc"]
    ).lstrip(".") or "config"
    msg = " ".join(err["msg"].removeprefix("Value error, ").split())
    extra = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{loc}: {msg}{extra}"


def _yaml_loader():
    """A SafeLoader that refuses duplicate keys: PyYAML keeps the last one silently, so a second
    ``watch:`` or ``min_factor:`` further down would quietly replace the first."""
    import yaml
    from yaml.constructor import ConstructorError

    class DuplicateKey(ConstructorError):
        def __init__(self, key: Any, first: Any, again: Any):
            super().__init__(None, None, f"duplicate key {key!r}", again)
            self.key, self.first_line, self.line = key, first.line + 1, again.line + 1

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    # '<<' merges are flattened by SafeLoader; keys next to a merge override it.
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node.start_mark)
                    except TypeError:
                        continue  # unhashable: SafeLoader reports it
                    if first is not key_node.start_mark:
                        raise DuplicateKey(key, first, key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return Loader, DuplicateKey


def load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    if path.endswith(".toml"):
        import tomllib

        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    else:
        import yaml

        loader, duplicate_key = _yaml_loader()
        try:
            data = yaml.load(raw.decode("utf-8"), Loader=loader)  # noqa: S506 (a SafeLoader)
        except duplicate_key as e:
            key = repr(e.key)[:80]
            raise ConfigError(f"{path}: duplicate key {key} at line {e.line} (first at line {e.first_line})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {first}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def build(file_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, source: str = "config") -> Config:
    """Merge file data with flag overrides (flags win) and validate."""
    data = dict(file_data or {})
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        cur = data
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = cur.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
            cur[p] = nxt = dict(nxt)
            cur = nxt
        cur[parts[-1]] = value
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_error(e)}") from None


def load(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    data = load_file(path) if path else {}
    return build(data, overrides, source=path or "flags")


def default_config_path() -> str | None:
    for p in (os.environ.get("CGGUARD_CONFIG"), "/etc/cgguard/config.yaml", "/etc/cgguard/config.toml"):
        if p and os.path.exists(p):
            return p
    return None


# -- reference -------------------------------------------------------------------------------
def reference_markdown() -> str:
    """The configuration reference, generated from the models (README embeds it; a test checks drift)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                doc = ((ann.__doc__ or "").strip().splitlines() or [""])[0]
                lines.append(f"| `{key}` | section | | {doc} |")
                walk(ann, key + ".")
                continue
            tname = str(ann).replace("typing.", "").replace(" | ", " \\| ") if type(ann).__name__ == "UnionType" else getattr(ann, "__name__", str(ann))
            if isinstance(ann, type) and issubclass(ann, Enum):
                tname = " \\| ".join(m.value for m in ann)
            if f.default_factory is not None:
                default = f.default_factory()
            else:
                default = f.default
            if isinstance(default, Enum):
                default = default.value
            dtext = "none" if default is None else f"`{default!r}`" if not isinstance(default, str) else f"`{default}`"
            if dtext == "``":
                dtext = "`''`"
            lines.append(f"| `{key}` | {tname} | {dtext} | {f.description or ''} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"
