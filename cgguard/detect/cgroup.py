"""Cgroup-level detectors: pure functions of a cgroup's sample history.

They need no lineage, so they also work where the proc connector is unavailable, and they are
the only ones that see thread bombs and zombie pile-ups (``pids.current`` counts both).
"""

from __future__ import annotations

from cgguard.config import ForkFailureParams, GrowthParams, SaturationParams
from cgguard.detect import Reason, Verdict
from cgguard.kernel.clock import MS
from cgguard.state.samples import History, Sample


def _since_before(hist: History, cutoff_ns: int, partial: bool = False) -> list[Sample] | None:
    """Samples after ``cutoff_ns`` plus the last one at or before it, which proves the state
    already held at the cutoff. None when the history does not reach back that far (unless
    ``partial``: then whatever there is)."""
    before = None
    after = []
    for s in hist.samples:
        if s.t_ns <= cutoff_ns:
            before = s
        else:
            after.append(s)
    if before is None:
        return after if partial else None
    return [before, *after]


def growth(cgroup: str, hist: History, now_ns: int, p: GrowthParams) -> Verdict | None:
    """Runaway growth: many tasks, multiplied within the window, and still rising sample after sample.

    On a small machine a bomb is CPU-bound within milliseconds and from then on its count rises
    linearly (about 3k tasks/s for a bash bomb on 2 cores), so this rule cannot ask for
    exponential growth. What it asks for instead is size (``min_tasks``: above the few hundred a
    single parent or a pool starts), a multiplication within ``window_ms`` (not a slow climb),
    a high rate, and growth in each of the last ``rising_samples`` samples (a burst that is
    over is not a bomb). Lineage tells bombs from bursts far earlier; this is the net for
    thread bombs and for hosts without the proc connector.
    """
    last = hist.last
    if last is None or last.tasks < p.min_tasks:
        return None
    window = [s for s in hist.samples if s.t_ns >= now_ns - p.window_ms * MS]
    if len(window) < p.rising_samples + 1:
        return None
    tail = window[-(p.rising_samples + 1) :]
    if any(b.tasks <= a.tasks for a, b in zip(tail, tail[1:])):
        return None
    low_sample = min(window, key=lambda s: s.tasks)
    n, low = last.tasks, low_sample.tasks
    if n < p.min_factor * max(low, 1):
        return None
    span_s = max((last.t_ns - low_sample.t_ns) / 1e9, 1e-3)
    rate = (n - low) / span_s
    if rate < p.min_rate_per_s:
        return None
    return Verdict(
        cgroup=cgroup,
        detector="growth",
        reasons=(
            Reason(
                "tasks-multiplying",
                f"tasks grew {low} -> {n} ({n / max(low, 1):.1f}x) in {span_s * 1000:.0f} ms, "
                f"{rate:.0f} tasks/s, still rising over the last {p.rising_samples} samples",
                {
                    "tasks": n,
                    "tasks_low": low,
                    "factor": round(n / max(low, 1), 2),
                    "span_ms": round(span_s * 1000, 1),
                    "rate_per_s": round(rate),
                    "window_ms": p.window_ms,
                },
            ),
        ),
        tasks=n,
        first_sign_ns=low_sample.t_ns,
        at_ns=now_ns,
    )


def saturation(cgroup: str, hist: History, now_ns: int, p: SaturationParams) -> Verdict | None:
    """Sitting at pids.max while forks keep being refused: contained, but not removed.

    Fullness alone is not enough (a build may touch its limit once and back off); something must
    keep retrying forks against the wall for ``hold_ms``.
    """
    if not p.enabled:
        return None
    last = hist.last
    if last is None or not last.pids_max:
        return None
    limit = last.pids_max
    held = _since_before(hist, now_ns - p.hold_ms * MS)
    if held is None:
        return None
    if any(s.tasks < p.ratio * limit for s in held):
        return None
    refused = None
    if last.forks_refused is not None and held[0].forks_refused is not None:
        refused = last.forks_refused - held[0].forks_refused
    if p.min_forks_refused and (refused is None or refused < p.min_forks_refused):
        return None
    return Verdict(
        cgroup=cgroup,
        detector="saturation",
        reasons=(
            Reason(
                "pids-max-saturated",
                f"{last.tasks} of pids.max {limit} tasks for {p.hold_ms} ms with {refused} forks refused",
                {"tasks": last.tasks, "pids_max": limit, "hold_ms": p.hold_ms, "forks_refused": refused},
            ),
        ),
        tasks=last.tasks,
        first_sign_ns=held[0].t_ns,
        at_ns=now_ns,
    )


def fork_failures(cgroup: str, hist: History, now_ns: int, p: ForkFailureParams) -> Verdict | None:
    """Forks refused at pids.max (pids.events 'max') at a rate only a retrying bomb produces."""
    if not p.enabled:
        return None
    last = hist.last
    if last is None or last.forks_refused is None:
        return None
    span = _since_before(hist, now_ns - p.window_ms * MS, partial=True)
    span = [s for s in span or [] if s.forks_refused is not None]
    if len(span) < 2:
        return None
    base = span[0]
    refused = last.forks_refused - base.forks_refused
    if refused < p.min_failures:
        return None
    span_ms = max((last.t_ns - base.t_ns) / MS, 1.0)
    return Verdict(
        cgroup=cgroup,
        detector="fork-failures",
        reasons=(
            Reason(
                "forks-refused",
                f"{refused} forks refused at pids.max {last.pids_max} within {span_ms:.0f} ms",
                {"forks_refused": refused, "span_ms": round(span_ms, 1), "pids_max": last.pids_max, "tasks": last.tasks},
            ),
        ),
        tasks=last.tasks,
        first_sign_ns=base.t_ns,
        at_ns=now_ns,
    )
