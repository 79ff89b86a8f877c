"""Incident sinks at their worst must not slow a removal: the classic bomb under cgguard with a
hook that hangs and a webhook to a closed port, against the same bomb with no sinks.

Each variant runs ``runs`` times, interleaved (plain, hung, plain, hung, ...) so that drift on a
shared machine hits both alike, each trial as in :func:`cgguard.bench.runner.cgguard_bomb` (a
fresh agent, the bench's sampler, spawn -> ``populated 0``). Both variants run with a config file
that turns the journal off, so the only difference is the hooks section:

* ``hooks.on_incident``: a script that records its start and then sleeps (longer than any trial,
  shorter than ``timeout_ms``), so it still runs when the removal completes;
* ``hooks.webhook``: ``http://127.0.0.1:<a port nobody listens on>/``, retried with backoff.

The target (from the issue): the median removal time (spawn -> cgroup empty) with hung sinks is
within 10 % of the plain one. Reported, not failed on, as all bench timings. The slowdown of
verdict -> cgroup empty is reported beside it: sinks hear of an incident only at its verdict,
so that is the part they could slow; spawn -> verdict differs between variants only by noise.

The lead wires :func:`sink_overhead` into the bench plan (a named extra like ``cost``/``events``).
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from typing import Any, cast

from cgguard.testkit.corpus import WORKLOADS

from .agentproc import AgentProcess, AgentStartError
from .runner import Bench, BombRun, cgguard_bomb, median

TARGET_PCT = 10.0
HOOK_SLEEP_S = 120  # outlives a trial; bounded should an agent die without killing its hooks
HOOK = """#!/bin/sh
echo $$ >> "{started}"
exec sleep {secs}
"""


def closed_port() -> int:
    """A local port nobody listens on (bound, then released: connects are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Configured:
    """The bench, but each agent it starts reads ``config`` (the trial code is unchanged)."""

    def __init__(self, b: Bench, config: str):
        self._b = b
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._b, name)

    def agent(self, label: str) -> AgentProcess:
        b = self._b
        a = AgentProcess(os.path.join(b.tmp, f"agent-{b._n:03d}-{label}"), [f"{b.sb.name}/**"], "--config", self._config)
        try:
            a.wait_ready()
        except AgentStartError:
            a.stop()
            raise
        return a


def _write_configs(tmp: str) -> tuple[str, str, str]:
    """(plain config, hung-sinks config, the file each hook run appends its pid to)."""
    d = os.path.join(tmp, "operating")
    os.makedirs(d, exist_ok=True)
    started = os.path.join(d, "hooks-started")
    hook = os.path.join(d, "hang.sh")
    with open(hook, "w") as f:
        f.write(HOOK.format(started=started, secs=HOOK_SLEEP_S))
    os.chmod(hook, 0o755)
    plain = os.path.join(d, "plain.yaml")
    with open(plain, "w") as f:
        f.write("journal: {enabled: false}\n")
    hung = os.path.join(d, "hung.yaml")
    with open(hung, "w") as f:
        f.write(
            "journal: {enabled: false}\n"
            "hooks:\n"
            f"  on_incident: [[{hook!r}]]\n"
            f"  timeout_ms: {(HOOK_SLEEP_S + 60) * 1000}\n"
            f"  webhook: {{url: 'http://127.0.0.1:{closed_port()}/'}}\n"
        )
    return plain, hung, started


def _started_pids(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _still_hanging(pid: int) -> bool:
    """Is ``pid`` still one of our hook's sleeps (not a reused pid)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return argv[:2] == [b"sleep", str(HOOK_SLEEP_S).encode()]


def _summary(rs: list[BombRun]) -> dict[str, Any]:
    return {
        "removed": sum(1 for r in rs if r.removed),
        "runs": len(rs),
        "start_to_gone_ms": [r.start_to_gone_ms for r in rs],
        "median_start_to_gone_ms": median([r.start_to_gone_ms for r in rs]),
        "median_verdict_to_gone_ms": median([r.verdict_to_gone_ms for r in rs]),
        "median_start_to_verdict_ms": median([r.start_to_verdict_ms for r in rs]),
        "notes": [f"run {r.run}: {n}" for r in rs for n in r.notes],
    }


def _pct(base: float | None, other: float | None) -> float | None:
    if not base or other is None:
        return None
    return round((other - base) / base * 100, 1)


def sink_overhead(b: Bench, runs: int = 5, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The classic bomb's removal time without sinks and with a hanging hook plus a dead
    webhook: medians of ``runs`` each, the slowdown in percent, and whether it is within
    ``TARGET_PCT``."""
    wl = WORKLOADS["classic"]
    plain_cfg, hung_cfg, started = _write_configs(b.tmp)
    plain_b = cast(Bench, _Configured(b, plain_cfg))
    hung_b = cast(Bench, _Configured(b, hung_cfg))
    plain: list[BombRun] = []
    hung: list[BombRun] = []
    hanging_at_end: list[int] = []
    for run in range(1, runs + 1):
        for label, bench, out in (("plain", plain_b, plain), ("hung-sinks", hung_b, hung)):
            before = len(_started_pids(started))
            r = cgguard_bomb(bench, wl, run)
            r.method = f"cgguard ({label})"
            # The scenario must really have happened: a hook started for this bomb.
            if label == "hung-sinks" and len(_started_pids(started)) == before:
                r.notes.append("no hook started: the hung-hook scenario did not happen")
            out.append(r)
            log(f"  classic / {label} #{run}: removed {r.removed}, start->gone {r.start_to_gone_ms} ms, "
                f"verdict->gone {r.verdict_to_gone_ms} ms")
    # The agent kills its hooks' process groups as it stops; any sleep left is a defect worth
    # reporting (and ending: these are our own processes, named by the pids they wrote).
    for pid in _started_pids(started):
        if _still_hanging(pid):
            hanging_at_end.append(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    p, h = _summary(plain), _summary(hung)
    slowdown = _pct(p["median_start_to_gone_ms"], h["median_start_to_gone_ms"])
    res = {
        "workload": wl.name,
        "runs": runs,
        "plain": p,
        "hung_sinks": h,
        "hooks_started": len(_started_pids(started)),
        "hooks_left_running": hanging_at_end,
        "slowdown_pct": slowdown,
        # Only what follows the verdict can be touched by the sinks (they hear of an incident at
        # its verdict); start->verdict is the same detection in both variants, plus noise.
        "slowdown_verdict_to_gone_pct": _pct(p["median_verdict_to_gone_ms"], h["median_verdict_to_gone_ms"]),
        "target_pct": TARGET_PCT,
        "met": slowdown is not None and slowdown <= TARGET_PCT and p["removed"] == h["removed"] == runs,
        "bomb_runs": [r.to_dict() for r in plain + hung],
    }
    log(f"  hung hook + dead webhook: median start->gone {h['median_start_to_gone_ms']} ms vs {p['median_start_to_gone_ms']} ms "
        f"plain ({'n/a' if slowdown is None else f'{slowdown:+.1f} %'}; target <= {TARGET_PCT:g} %)")
    return res
