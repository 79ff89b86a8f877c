"""Budget and trajectory detectors: pure functions of one cgroup's sample history.

Each sample holds the cgroup's own tasks and how full its budget is (``level`` of ``limit``,
refused forks at the limiting group). A runaway is anything whose task count grows without bound
toward its budget, whatever its shape; bounded work stops short. Three rules say so from the
counts alone, so they also see thread bombs, zombie piles, exec chains and runaways that were
running before the agent started:

* **pinned** (evidence "budget"): at the kernel limit while forks keep being refused;
* **fill-hold** (evidence "budget"): filled most of the budget within seconds and holding it
  while tasks keep being born (churn just under the limit);
* **trajectory**: past ``min_usage`` of the budget (default half), still rising, and on course to
  exhaust it within ``max_eta_ms`` -- measured over ``window_ms`` for fast runaways and over
  ``long_window_ms`` for slow ones (a steady trickle of forks is caught as it nears its budget).

A workload that stays under half its budget is never flagged here. Trajectory measures growth
of the cgroup's own tasks, so a calm sibling under a shared pod limit is not blamed for the bomb
beside it; pinned and fill-hold measure the shared limit, so the agent keeps their verdict only
for the cgroup that holds the most of it (:func:`holds_most`).
"""

from __future__ import annotations

from typing import Iterable

from cgguard.config import FillHoldParams, PinnedParams, TrajectoryParams
from cgguard.detect import Reason, Verdict
from cgguard.kernel.clock import MS
from cgguard.state.samples import History, Sample


def _verdict(cgroup: str, rule: str, evidence: str, reason: Reason, last: Sample, first_sign_ns: int, now_ns: int) -> Verdict:
    return Verdict(
        cgroup=cgroup,
        detector=rule,
        reasons=(reason,),
        tasks=last.tasks,
        first_sign_ns=first_sign_ns,
        at_ns=now_ns,
        evidence=evidence,
        budget=last.limit,
        budget_source=last.source,
    )


def pinned(cgroup: str, hist: History, now_ns: int, p: PinnedParams) -> Verdict | None:
    """At the kernel limit for ``hold_ms`` with at least ``min_refused`` forks refused meanwhile,
    or -- a forker that backs off between refusals but never lets go of the limit (bash retries
    after 1, 2, 4, 8 s) -- for ``long_hold_ms`` with ``long_min_refused``.

    Touching the limit once is not enough (a build may, then back off): something must keep
    retrying forks against it. Needs a limit with a refusal counter (v2, or v1 on hybrid hosts).
    """
    last = hist.last
    if not p.enabled or last is None or last.refused is None or not last.kernel_limit:
        return None
    if last.level < p.ratio * last.limit:
        return None
    for hold_ms, need in ((p.hold_ms, p.min_refused), (p.long_hold_ms, p.long_min_refused)):
        held_since = hist.at(now_ns - hold_ms * MS)
        if held_since is None or held_since.refused is None:
            continue
        span = [s for s in hist.samples if s.t_ns >= held_since.t_ns]
        if any(s.level < p.ratio * s.limit for s in span):
            continue
        refused = last.refused - held_since.refused
        if refused >= need:
            break
    else:
        return None
    first = held_since
    for s in reversed(hist.samples):  # when it first got there, for the detection latency
        if s.level < p.ratio * s.limit:
            break
        first = s
    return _verdict(
        cgroup,
        "pinned",
        "budget",
        Reason(
            "pinned-at-limit",
            f"{last.level} of {last.limit} tasks ({last.source}) for {(now_ns - first.t_ns) / MS:.0f} ms, "
            f"{refused} forks refused in the last {hold_ms} ms",
            {"level": last.level, "limit": last.limit, "source": last.source, "refused": refused,
             "hold_ms": hold_ms, "tasks": last.tasks},
        ),
        last,
        first.t_ns,
        now_ns,
    )


def fill_hold(cgroup: str, hist: History, now_ns: int, p: FillHoldParams) -> Verdict | None:
    """Holding ``min_usage`` of the budget for ``hold_ms``, reached within ``fill_ms`` from below
    half of it, with tasks still being born at a churn rate (proc connector counts)."""
    last = hist.last
    if not p.enabled or last is None or last.births is None or last.usage < p.min_usage:
        return None
    start = hist.at(now_ns - p.hold_ms * MS)
    if start is None or start.births is None:
        return None
    span = [s for s in hist.samples if s.t_ns >= start.t_ns]
    if any(s.usage < p.min_usage for s in span):
        return None
    low = None
    for s in reversed(hist.samples):
        if s.usage < 0.5:
            low = s
            break
    if low is None or start.t_ns - low.t_ns > p.fill_ms * MS:
        return None  # not filled recently (or before the history): a steady state, not a runaway
    secs = max((last.t_ns - start.t_ns) / 1e9, 1e-3)
    rate = (last.births - start.births) / secs
    if rate < max(p.min_births_per_s, 0.05 * last.limit):
        return None
    fill_ms = (start.t_ns - low.t_ns) / MS
    return _verdict(
        cgroup,
        "fill-hold",
        "budget",
        Reason(
            "holding-budget-with-churn",
            f"filled {last.level} of {last.limit} tasks ({last.source}) within {fill_ms:.0f} ms and held it "
            f"{secs * 1000:.0f} ms while {rate:.0f} tasks/s were born",
            {"level": last.level, "limit": last.limit, "source": last.source, "fill_ms": round(fill_ms),
             "births_per_s": round(rate), "tasks": last.tasks},
        ),
        last,
        low.t_ns,
        now_ns,
    )


def trajectory(cgroup: str, hist: History, now_ns: int, p: TrajectoryParams) -> Verdict | None:
    """Past ``min_usage`` of the budget, still growing, and at the recent rate the budget is gone
    within ``max_eta_ms``. Two views of "still growing": over ``window_ms``, risen by ``min_rise`` of
    the budget and rising in each of the last ``rising_samples`` samples (a bomb); over
    ``long_window_ms``, risen by ``min_rise`` of the budget (by anything at all once past the
    budget) with every quarter of the window above the one before and the last sample its
    highest (a steady trickle that never stops).

    A bomb on a small machine is CPU-bound within milliseconds and grows linearly from then on,
    so nothing here asks for exponential growth: only that it does not stop.
    """
    last = hist.last
    if not p.enabled or last is None or last.usage < p.min_usage:
        return None
    found = _fast(hist, now_ns, p) or _slow(hist, now_ns, p) or _leap(hist, now_ns, p)
    if found is None:
        return None
    low, span_s, how = found
    rate = (last.tasks - low.tasks) / span_s
    eta_ms = max(0.0, (last.limit - last.level) / rate * 1000)
    if eta_ms > p.max_eta_ms:
        return None
    return _verdict(
        cgroup,
        "trajectory",
        "trajectory",
        Reason(
            "growing-toward-budget",
            f"tasks grew {low.tasks} -> {last.tasks} in {span_s * 1000:.0f} ms ({rate:.0f}/s), {how}; "
            f"{last.level} of {last.limit} ({last.source}), exhausted in ~{eta_ms:.0f} ms",
            {"tasks": last.tasks, "tasks_low": low.tasks, "rate_per_s": round(rate), "level": last.level,
             "limit": last.limit, "source": last.source, "eta_ms": round(eta_ms), "usage": round(last.usage, 3)},
        ),
        last,
        low.t_ns,
        now_ns,
    )


def _fast(hist: History, now_ns: int, p: TrajectoryParams) -> tuple[Sample, float, str] | None:
    last = hist.samples[-1]
    window = [s for s in hist.samples if s.t_ns >= now_ns - p.window_ms * MS]
    if len(window) < p.rising_samples + 1:
        return None
    tail = window[-(p.rising_samples + 1):]
    if any(b.tasks <= a.tasks for a, b in zip(tail, tail[1:])):
        return None
    low = min(window, key=lambda s: s.tasks)
    if last.tasks - low.tasks < p.min_rise * last.limit:
        return None
    return low, max((last.t_ns - low.t_ns) / 1e9, 1e-3), f"rising over the last {p.rising_samples} samples"


def _slow(hist: History, now_ns: int, p: TrajectoryParams) -> tuple[Sample, float, str] | None:
    last = hist.samples[-1]
    start = now_ns - p.long_window_ms * MS
    window = [s for s in hist.samples if s.t_ns >= start]
    first = hist.at(start)
    if first is None or len(window) < 8 or last.tasks < max(s.tasks for s in window):
        return None  # the history does not reach back a whole window, or it is not rising now
    quarter = p.long_window_ms * MS // 4
    peaks = []
    for q in range(4):
        seg = [s.tasks for s in window if start + q * quarter <= s.t_ns < start + (q + 1) * quarter]
        if not seg:
            return None
        peaks.append(max(seg))
    # Past the whole budget (only possible where no kernel limit holds it) any steady growth
    # is enough: the budget is the scale of harm, and this one keeps going beyond it.
    need = 1 if last.level >= last.limit else p.min_rise * last.limit
    if any(b <= a for a, b in zip(peaks, peaks[1:])) or last.tasks - first.tasks < need:
        return None
    return first, max((last.t_ns - first.t_ns) / 1e9, 1e-3), f"higher in every quarter of {p.long_window_ms} ms"


def _leap(hist: History, now_ns: int, p: TrajectoryParams) -> tuple[Sample, float, str] | None:
    """Within the long window, from within the budget to ``leap_factor`` times it. Only where no
    kernel limit holds the cgroup: there the count may jump between two samples and then sit far
    past the budget (at pid_max, threads-max, RLIMIT_NPROC or a limit the agent cannot read),
    where neither the rising views nor the pinned rule can see it."""
    last = hist.samples[-1]
    if last.source != "default" or last.level < p.leap_factor * last.limit:
        return None
    start = now_ns - p.long_window_ms * MS
    within = [s for s in hist.samples if s.t_ns >= start and s.level <= s.limit]
    if not within:
        return None
    low = within[-1]
    return low, max((last.t_ns - low.t_ns) / 1e9, 1e-3), f"{last.level / last.limit:.1f}x its budget within {p.long_window_ms} ms"


def holds_most(tasks: int, peers: Iterable[int]) -> bool:
    """A budget verdict measures the limit group, which cgroups may share (the containers of one
    pod, under the pod's pids.max): the runaway is the one holding the most of it, and a verdict
    on any other cgroup under that limit is its neighbour's. ``peers``: the own tasks of the
    other watched cgroups under the same limit, nested ones excluded (narrowing handles those)."""
    return all(tasks >= t for t in peers)


RULES = (pinned, fill_hold, trajectory)
