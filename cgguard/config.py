"""Configuration: the pydantic models, and building them from data and flag overrides.

Every bad value becomes one line naming the key (``ConfigError``), never a traceback. The models
are also the source of the configuration reference in the README (``cgguard config-reference``);
files are read by :mod:`cgguard.configfile`, globs matched by :mod:`cgguard.globs`.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cgguard.globs import check_glob, glob_match


class ConfigError(Exception):
    """A configuration problem, worded for the operator, one line."""


class Action(str, Enum):
    auto = "auto"  # kill-cgroup when the bomb owns the cgroup, else kill-lineage
    kill_cgroup = "kill-cgroup"
    kill_lineage = "kill-lineage"
    freeze = "freeze"  # keep it frozen for forensics
    report = "report"


Glob = Annotated[str, AfterValidator(check_glob)]


class _Model(BaseModel):
    # allow_inf_nan=False: '.inf' or '.nan' in a threshold would silently switch a detector off
    # (nothing is ever >= inf), so non-finite floats are refused in every section.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False, allow_inf_nan=False)


# Upper bounds: every number has one (tests/unit/test_config.py walks the models to prove it).
HOUR_MS = 3_600_000
PID_LIMIT = 4_194_304  # the kernel's PID_MAX_LIMIT: no count of tasks can exceed it
# The per-cgroup sample history (cgguard.state.samples.History) reaches back this far, so a
# detector window beyond it would silently be cut short, and a hold must fit inside it with a
# sample to spare or its detector would never fire.
HISTORY_MS = 10_000
MAX_COUNT = 1_000_000


class Rule(_Model):
    """Per-glob action override; the first matching rule wins."""

    match: Glob = Field(description="Glob of cgroups (relative to the cgroup2 root) this rule applies to.")
    action: Action = Field(description="What to do with a bomb found in a matching cgroup.")


class AllowRule(_Model):
    """An allow-list entry, answering "will this kill make?": origins that may replicate deeper
    (relax: lineage evidence alone does not decide; budget and trajectory still protect the node)
    or may not be acted on at all (exempt: recorded as allowed, never removed)."""

    match: Glob = Field("**", description="Glob of cgroups where the rule applies.")
    exe: str | None = Field(None, description="Regex the origin's executable path must fully match.")
    comm: str | None = Field(None, description="Regex the origin's comm must fully match.")
    cmdline: str | None = Field(None, description="Regex searched in the origin's command line.")
    mode: Literal["relax", "exempt"] = Field("relax", description="relax: only budget rules can remove it; exempt: nothing does.")

    @field_validator("exe", "comm", "cmdline")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"{v!r} is not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _something(self) -> "AllowRule":
        if self.exe is None and self.comm is None and self.cmdline is None:
            raise ValueError("an allow rule needs exe, comm or cmdline")
        return self

    def describe(self) -> str:
        what = ", ".join(f"{k}~{v!r}" for k, v in (("exe", self.exe), ("comm", self.comm), ("cmdline", self.cmdline)) if v)
        return f"allow rule ({self.mode}: {what} in {self.match})"

    def matches(self, cgroup: str, exe: str | None, comm: str | None, cmdline: str | None) -> bool:
        if not glob_match(self.match, cgroup):
            return False
        if self.exe is not None and (exe is None or not re.fullmatch(self.exe, exe)):
            return False
        if self.comm is not None and (comm is None or not re.fullmatch(self.comm, comm)):
            return False
        if self.cmdline is not None and (cmdline is None or not re.search(self.cmdline, cmdline)):
            return False
        return True


class KillBudget(_Model):
    """Stops a detector gone wrong from emptying a node: at most N kills per tenant (pod, user,
    service) per window, and M for the whole node. A runaway past the budget is frozen, not left
    to grow, and reported; a tenant's bombs never spend another tenant's budget."""

    max_actions: int = Field(5, ge=1, le=10_000, description="Kills allowed per tenant per window; further runaways are frozen and reported.")
    per_seconds: float = Field(60.0, gt=0, le=86_400, allow_inf_nan=False, description="Length of the budget window in seconds.")
    node_max_actions: int = Field(
        50, ge=1, le=100_000, description="Kills allowed on the whole node per window, all tenants together."
    )


class Sampling(_Model):
    """How often task counts are sampled (pids.current cannot be watched with inotify)."""

    fast_interval_ms: int = Field(20, ge=5, le=1000, description="Interval while a cgroup grows.")
    slow_interval_ms: int = Field(1000, ge=100, le=60000, description="Interval while a cgroup is calm.")
    calm_after_ms: int = Field(2000, ge=100, le=HOUR_MS, description="Stay fast this long after the last growth.")
    calm_backoff_max_ms: int = Field(
        16000,
        ge=100,
        le=60000,
        description="With the proc connector on, an unchanged calm cgroup is sampled ever more rarely, up to this; "
        "a fork in it wakes it at once.",
    )
    max_open_files: int = Field(
        1024,
        ge=0,
        le=1_000_000,
        description="cgroupfs files kept open for fast re-reads (the rest are opened per read); bounds the agent's descriptors.",
    )

    @model_validator(mode="after")
    def _order(self) -> "Sampling":
        if self.fast_interval_ms > self.slow_interval_ms:
            raise ValueError("fast_interval_ms must not exceed slow_interval_ms")
        if self.calm_backoff_max_ms < self.slow_interval_ms:
            raise ValueError("calm_backoff_max_ms must not be below slow_interval_ms")
        return self


class BudgetSettings(_Model):
    """The task budget of a watched cgroup: its own or an ancestor's pids.max, the v1 pids limit on
    hybrid hosts, or this default."""

    default_tasks: int = Field(
        4096, ge=16, le=PID_LIMIT, description="Budget of a cgroup that no kernel limit applies to (a scale for growth, not a limit)."
    )
    use_v1: bool = Field(True, description="On hybrid hosts, read the v1 pids limit of each cgroup's processes (Docker --pids-limit, TasksMax=).")


class TrajectoryParams(_Model):
    """Growth that will not stop short of the budget: past a share of it, still rising, and on course
    to exhaust it soon. Bounded work stays well below (see the README's detection model)."""

    enabled: bool = Field(True, description="Use this detector.")
    min_usage: float = Field(0.5, gt=0.0, le=1.0, allow_inf_nan=False, description="Share of the budget the tasks must hold.")
    window_ms: int = Field(1000, ge=100, le=HISTORY_MS // 2, description="Window over which growth is measured.")
    min_rise: float = Field(
        0.1, gt=0.0, le=1.0, allow_inf_nan=False, description="Growth within the window, as a share of the budget, that counts as rising."
    )
    rising_samples: int = Field(3, ge=1, le=100, description="The cgroup's tasks must have risen in each of the last N samples.")
    max_eta_ms: int = Field(
        3000, ge=100, le=3_600_000, description="At the recent rate, the budget would be exhausted within this."
    )
    long_window_ms: int = Field(
        8000, ge=1000, le=HISTORY_MS - 1000, description="Window for slow, steady growth (must exceed window_ms)."
    )
    leap_factor: float = Field(
        2.0, ge=1.2, le=1000.0, allow_inf_nan=False,
        description="Where no kernel limit holds the cgroup (default budget): within long_window_ms it went from "
        "within its budget to this many times it -- faster than the samples could follow.",
    )

    @model_validator(mode="after")
    def _windows(self) -> "TrajectoryParams":
        if self.long_window_ms <= self.window_ms:
            raise ValueError("long_window_ms must exceed window_ms")
        return self


class PinnedParams(_Model):
    """At its kernel limit with forks being refused: contained by the limit, never finishing."""

    enabled: bool = Field(True, description="Use this detector.")
    ratio: float = Field(0.95, gt=0.0, le=1.0, allow_inf_nan=False, description="Share of the limit that counts as at the limit.")
    hold_ms: int = Field(300, ge=50, le=HISTORY_MS - 1000, description="How long it must stay there with forks being refused.")
    min_refused: int = Field(5, ge=1, le=MAX_COUNT, description="Forks refused at the limit within the hold.")
    long_hold_ms: int = Field(
        4000, ge=100, le=HISTORY_MS - 1000,
        description="Slow view: held at the limit this long with forks still refused (bash retries a refused fork after 1, "
                    "then 2 more seconds: two refusals within 4 s).",
    )
    long_min_refused: int = Field(2, ge=1, le=MAX_COUNT, description="Forks refused at the limit within the long hold.")


class FillHoldParams(_Model):
    """Filled most of its budget within seconds and holding it while tasks keep being created
    (fork or thread churn): the shape of a bomb hovering just under its limit."""

    enabled: bool = Field(True, description="Use this detector (needs the proc connector to count task births).")
    min_usage: float = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False, description="Share of the budget held.")
    fill_ms: int = Field(
        5000, ge=100, le=HISTORY_MS - 2000, description="It went from below half the budget to min_usage within this."
    )
    hold_ms: int = Field(1000, ge=100, le=HISTORY_MS - 2000, description="How long it must hold min_usage.")
    min_births_per_s: float = Field(
        50.0, gt=0.0, le=1e7, allow_inf_nan=False, description="Task births per second while holding (and at least 5% of the budget per second)."
    )


class LineageDetect(_Model):
    """Lineage signals: a family whose members fork copies and exit at once, generation after
    generation (the seed's ':(){ :|:& };:'), decided early, well before the budget."""

    enabled: bool = Field(True, description="Use this detector (needs lineage tracking).")
    min_family: int = Field(10, ge=2, le=1_000_000, description="The seed's floor: smaller families are left alone.")
    min_generations: int = Field(
        4, ge=2, le=1000, description="Abandoning generations in a row: members that exited while their copies ran on."
    )
    min_abandoners: int = Field(12, ge=2, le=1_000_000, description="Members that abandoned their children, within the window.")
    window_ms: int = Field(5000, ge=100, le=3_600_000, description="Abandonments older than this do not count.")


class Detect(_Model):
    """Detector thresholds: the detection model of the README. Defaults remove runaways of every shape
    and spare bounded work that stays under half its budget."""

    trajectory: TrajectoryParams = TrajectoryParams()
    pinned: PinnedParams = PinnedParams()
    fill_hold: FillHoldParams = FillHoldParams()
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


class Journal(_Model):
    """The systemd journal: one structured entry per finished incident (native protocol)."""

    enabled: bool | str = Field(
        "auto", description="auto: on when the journal socket exists at start; true: always (failures are counted); false: off."
    )
    socket: str = Field("/run/systemd/journal/socket", description="journald's native socket.")

    @field_validator("enabled", mode="before")
    @classmethod
    def _enabled(cls, v: Any) -> bool | str:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in ("auto", "true", "false", "yes", "no", "on", "off"):
            w = v.strip().lower()
            return "auto" if w == "auto" else w in ("true", "yes", "on")
        raise ValueError("must be auto, true or false")

    @field_validator("socket")
    @classmethod
    def _socket(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must be an absolute path")
        if len(v.encode()) > 107 or "\0" in v:
            raise ValueError("not a usable unix socket path (at most 107 bytes, no NUL)")
        return v


def _finite_int(v: Any) -> Any:
    # pydantic turns 1e400 into inf before the int check; say what is wrong in one line.
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


FiniteInt = Annotated[int, BeforeValidator(_finite_int)]


class Webhook(_Model):
    """An HTTP(S) endpoint that receives each incident record as a JSON POST (null: none)."""

    url: str | None = Field(None, description="http:// or https:// URL to POST incidents to; unset: no webhook.")
    timeout_ms: FiniteInt = Field(5000, ge=100, le=600_000, description="Per attempt: connecting and each read.")
    queue: FiniteInt = Field(256, ge=1, le=100_000, description="Incidents waiting for delivery; beyond it they are dropped (counted).")
    retries: FiniteInt = Field(5, ge=0, le=100, description="Retries after a failed attempt (connection error, timeout, 408/425/429/5xx).")
    backoff_ms: FiniteInt = Field(500, ge=1, le=3_600_000, description="First retry delay; doubles each retry, with jitter.")
    max_backoff_ms: FiniteInt = Field(30000, ge=1, le=3_600_000, description="Cap of the retry delay.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlsplit

        u = urlsplit(v.strip())
        if u.scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        try:
            u.port  # noqa: B018  (raises on a bad port)
        except ValueError:
            raise ValueError("has a bad port") from None
        if not u.hostname or any(c in v for c in " \t\r\n\0"):
            raise ValueError("is not a valid URL")
        return v.strip()

    @model_validator(mode="after")
    def _complete(self) -> Webhook:
        if self.url is None and self.model_fields_set - {"url"}:
            raise ValueError("url is required when the webhook is configured")
        if self.max_backoff_ms < self.backoff_ms:
            raise ValueError("max_backoff_ms must not be below backoff_ms")
        return self


class Hooks(_Model):
    """Commands run (and a webhook called) at each incident's detection and result."""

    on_incident: list[str | list[str]] = Field(
        default_factory=list,
        description="Commands: a list of argv strings, or a string run with /bin/sh -c; incident JSON on stdin, CGGUARD_* env.",
    )
    timeout_ms: FiniteInt = Field(10000, ge=100, le=3_600_000, description="Per run; then the hook's process group is killed.")
    max_concurrent: FiniteInt = Field(4, ge=1, le=64, description="Hooks running at once.")
    queue: FiniteInt = Field(64, ge=1, le=100_000, description="Runs waiting to start; beyond it they are dropped (counted).")
    webhook: Webhook = Field(default_factory=Webhook, description="The webhook (a mapping, or just its URL); null or no url: none.")

    @field_validator("on_incident", mode="before")
    @classmethod
    def _commands(cls, v: Any) -> Any:
        if v is None:
            return []
        if not isinstance(v, list):
            raise ValueError("must be a list of commands")
        for i, cmd in enumerate(v):
            if isinstance(cmd, str):
                if not cmd.strip():
                    raise ValueError(f"command {i} is empty")
                if "\0" in cmd:
                    raise ValueError(f"command {i} contains a NUL byte")
            elif isinstance(cmd, list):
                if not cmd:
                    raise ValueError(f"command {i} is an empty argv list")
                if not all(isinstance(a, str) for a in cmd):
                    raise ValueError(f"command {i}: every argv item must be a string")
                if not cmd[0] or any("\0" in a for a in cmd):
                    raise ValueError(f"command {i}: empty program or a NUL byte")
            else:
                raise ValueError(f"command {i} must be a string or a list of strings")
        return v

    @field_validator("webhook", mode="before")
    @classmethod
    def _webhook(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, str):  # shorthand: the URL alone
            return {"url": v}
        return v


class Config(_Model):
    """cgguard configuration. Paths and globs are relative to the cgroup2 root."""

    watch: list[Glob] = Field(default_factory=list, description="Globs of cgroups to guard: '*' one level, '**' any depth.")
    protect: list[Glob] = Field(
        default_factory=list, description="Globs never acted on, with everything below them (still watched and reported)."
    )
    aggregates: list[Glob] = Field(
        default_factory=list,
        description="Aggregation levels (a user's slice, a QoS class, a pod): watched, never removed as a whole; "
        "a verdict there acts on a watched cgroup below it, or is reported.",
    )
    cgroup_root: str | None = Field(None, description="cgroup2 mount point; found from /proc/self/mountinfo if unset.")
    state_dir: str = Field("/var/lib/cgguard", description="Directory of incidents.jsonl.")
    listen: str = Field("127.0.0.1:9750", description="HOST:PORT for /healthz, /readyz and /metrics; '' disables.")
    control_socket: str = Field("/run/cgguard/control.sock", description="Root-only socket for 'cgguard ctl'.")
    dry_run: bool = Field(False, description="Detect and record, never act.")
    action: Action = Field(Action.auto, description="Default action on a verdict.")
    rules: list[Rule] = Field(default_factory=list, description="Per-glob action overrides, first match wins.")
    allow: list[AllowRule] = Field(default_factory=list, description="Allow-list: origins that may replicate, first match wins.")
    kill_budget: KillBudget = KillBudget()
    surgical_fallback: Action = Field(
        Action.kill_cgroup,
        description="When a surgical kill cannot freeze or move the lineage: kill-cgroup or report.",
    )
    remove_timeout_ms: int = Field(15_000, ge=100, le=600_000, description="How long to wait for 'populated 0' (cgroup.kill is written again at each third of it) before the result is 'timeout'. Thousands of exiting tasks on a loaded node take seconds.")
    sampling: Sampling = Sampling()
    budget: BudgetSettings = BudgetSettings()
    detect: Detect = Detect()
    tracking: Tracking = Tracking()
    realtime: bool = Field(True, description="Run the agent at SCHED_RR priority 1 so a bomb cannot starve it.")
    log_level: str = Field("info", description="debug, info, warning or error.")
    journal: Journal = Journal()
    hooks: Hooks = Hooks()

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

    def refusal(self, cgroup: str) -> str | None:
        """Why the configuration forbids acting on ``cgroup`` itself, or None. Protection covers a
        cgroup's whole subtree; an aggregation level only itself."""
        rel = cgroup.strip("/")
        if not any(glob_match(g, rel) for g in self.watch):
            return "outside the watch globs"
        cur = rel
        while cur:
            for g in self.protect:
                if glob_match(g, cur):
                    return f"protected (protect: {g})" if cur == rel else f"below a protected cgroup (protect: {g})"
            cur = cur.rsplit("/", 1)[0] if "/" in cur else ""
        for g in self.aggregates:
            if glob_match(g, rel):
                return f"an aggregation level (aggregates: {g}): only cgroups below it are acted on"
        return None

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


def _format_error(e: ValidationError) -> str:
    err = e.errors()[0]
    # A key is whatever the file says: quote any that would break the one-line message.
    loc = "".join(
        f"[{x}]" if isinstance(x, int) else f".{x}" if str(x).isprintable() else f".{str(x)!r}" for x in err["loc"]
    ).lstrip(".") or "config"
    msg = " ".join(err["msg"].removeprefix("Value error, ").split())
    extra = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{loc}: {msg}{extra}"


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
