"""The budget and trajectory detectors (pinned, fill-hold, trajectory) on synthetic sample series.

The detection model: a runaway grows without bound toward its budget; bounded work stays under
half of it and is never flagged. Histories are fed one sample at a time and every rule is asked
after each sample, with ``now`` at that sample, the way the agent samples (every 20 ms while a
cgroup is active), so a rule that fired for a moment along the way is caught too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import pytest

from cgguard.config import FillHoldParams, PinnedParams, TrajectoryParams
from cgguard.detect import Verdict
from cgguard.detect import cgroup as d
from cgguard.state.samples import History, Sample

MS = 1_000_000
STEP_MS = 20  # the sampler's interval while a cgroup is active

PIN = PinnedParams()
FILL = FillHoldParams()
TRAJ = TrajectoryParams()
DEFAULTS = {"pinned": PIN, "fill_hold": FILL, "trajectory": TRAJ}

Rule = Callable[[str, History, int, object], "Verdict | None"]


# -- builder ---------------------------------------------------------------------------------
def series(
    tasks: Sequence[int],
    *,
    limit: int,
    source: str = "v2:pod",
    level: Sequence[int] | None = None,
    refused: Sequence[int | None] | int | None = None,
    births: Sequence[int | None] | None = None,
    step_ms: int = STEP_MS,
    t0_ms: int = 1000,
) -> list[Sample]:
    """Samples ``step_ms`` apart. ``level`` defaults to the cgroup's own tasks (its own limit);
    ``refused`` is a cumulative sequence, or one constant counter that never moves."""
    n = len(tasks)
    lv = list(tasks) if level is None else list(level)
    rf: list[int | None] = [refused] * n if refused is None or isinstance(refused, int) else list(refused)
    bt: list[int | None] = [None] * n if births is None else list(births)
    assert len(lv) == len(rf) == len(bt) == n
    return [
        Sample((t0_ms + i * step_ms) * MS, tasks[i], lv[i], limit, rf[i], bt[i], source)
        for i in range(n)
    ]


def run(rule: Rule, samples: Sequence[Sample], params: object = None) -> list[tuple[int, Verdict]]:
    """Every (sample index, verdict) the rule gives when asked after each sample."""
    p = params if params is not None else DEFAULTS[rule.__name__]
    h = History()
    out = []
    for i, s in enumerate(samples):
        h.add(s)
        v = rule("pod/c", h, s.t_ns, p)
        if v is not None:
            out.append((i, v))
    return out


def at_end(rule: Rule, samples: Sequence[Sample], params: object = None) -> Verdict | None:
    h = History()
    for s in samples:
        h.add(s)
    return rule("pod/c", h, samples[-1].t_ns, params if params is not None else DEFAULTS[rule.__name__])


def first(rule: Rule, samples: Sequence[Sample], params: object = None) -> tuple[int, Verdict] | None:
    got = run(rule, samples, params)
    return got[0] if got else None


def all_rules(samples: Sequence[Sample]) -> list[tuple[str, int]]:
    return [(r.__name__, i) for r in d.RULES for i, _ in run(r, samples)]


def cumulative(increments: Sequence[int], base: int = 0) -> list[int]:
    out, c = [], base
    for x in increments:
        c += x
        out.append(c)
    return out


def births_under_pressure(levels: Sequence[int], limit: int, per_s: float) -> list[int | None]:
    """Cumulative births at ``per_s`` as the sampler records them: only at or above half the
    budget (below it they are not summed)."""
    return [int(per_s * i * STEP_MS / 1000) if lv >= 0.5 * limit else None for i, lv in enumerate(levels)]


def linear(start: int, rate_per_s: float, limit: int, n: int) -> list[int]:
    return [min(limit, start + int(rate_per_s * i * STEP_MS / 1000)) for i in range(n)]


def ms(n_samples: int) -> int:
    return n_samples * STEP_MS


def pinned_bomb(limit: int, ramp: int, hold: int, refused_per_sample: int = 3, source: str = "v2:pod") -> list[Sample]:
    """Grows to its limit in ``ramp`` samples, then stays there while forks are refused."""
    tasks = [max(1, limit * i // ramp) for i in range(ramp)] + [limit] * hold  # below 95% until sample ``ramp``
    refused = [0] * ramp + cumulative([refused_per_sample] * hold)
    return series(tasks, limit=limit, refused=refused, source=source)


# -- pinned ----------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["v2:kubepods/pod1", "v1:docker/abc"])
def test_pinned_fires_at_a_kernel_limit_held_with_refusals(source):
    s = pinned_bomb(limit=512, ramp=10, hold=40, source=source)
    got = first(d.pinned, s)
    assert got is not None
    i, v = got
    reached = 10  # first sample at >= 95% of the limit
    assert s[reached - 1].level < 0.95 * 512 <= s[reached].level
    # Not before hold_ms at the limit, and at the first sample once it has held.
    assert s[i].t_ns - s[reached].t_ns == PIN.hold_ms * MS
    assert v.detector == "pinned" and v.evidence == "budget"
    assert v.first_sign_ns == s[reached].t_ns  # when it first reached the limit
    assert v.budget == 512 and v.budget_source == source and v.tasks == 512
    r = v.reasons[0]
    assert r.rule == "pinned-at-limit"
    held = PIN.hold_ms // STEP_MS
    assert r.values == {"level": 512, "limit": 512, "source": source, "refused": 3 * held, "hold_ms": PIN.hold_ms, "tasks": 512}
    assert f"512 of 512 tasks ({source}) for {PIN.hold_ms} ms" in r.detail
    assert f"{3 * held} forks refused in the last {PIN.hold_ms} ms" in r.detail


def test_pinned_first_sign_stays_at_the_first_arrival_while_it_keeps_firing():
    s = pinned_bomb(limit=256, ramp=5, hold=60)
    got = run(d.pinned, s)
    assert len(got) > 30  # fires at every sample once held
    assert {v.first_sign_ns for _, v in got} == {s[5].t_ns}
    i, v = got[-1]
    assert f"for {(s[i].t_ns - s[5].t_ns) // MS} ms" in v.reasons[0].detail
    # The refusal count is the one within the hold, not since the start.
    assert v.reasons[0].values["refused"] == 3 * (PIN.hold_ms // STEP_MS)


def test_pinned_ratio_is_the_threshold():
    limit = 1000
    for level, fires in ((950, True), (949, False)):
        s = series([level] * 30, limit=limit, refused=cumulative([2] * 30))
        assert (at_end(d.pinned, s) is not None) is fires, level


def test_pinned_counts_the_limit_groups_level_not_only_its_own_tasks():
    # The bomb is one of several containers under a pod limit: the pod is full, the bomb holds
    # most of it, forks are refused at the pod.
    s = series([400] * 30, level=[512] * 30, limit=512, refused=cumulative([4] * 30))
    assert at_end(d.pinned, s) is not None


def test_pinned_not_for_the_default_budget():
    # The default budget is a scale, not a limit: nothing refuses forks there.
    s = series([4096] * 40, limit=4096, source="default", refused=cumulative([5] * 40))
    assert run(d.pinned, s) == []


def test_pinned_not_for_a_build_that_touched_its_limit_once():
    # make -j hits the limit, a few forks fail, it backs off and runs at the limit without more
    # refusals, then finishes.
    limit = 256
    tasks = linear(10, 3000, limit, 15) + [limit] * 50 + [200, 120, 40, 5] + [5] * 20
    refused = [0] * 15 + [1, 2, 4] + [4] * 47 + [4] * 24
    s = series(tasks, limit=limit, refused=refused)
    assert sum(1 for x in tasks if x >= 0.95 * limit) * STEP_MS > PIN.hold_ms
    assert run(d.pinned, s) == []


def test_pinned_stops_once_refusals_stop_for_the_hold():
    limit = 256
    hold_refusing = 30
    s = pinned_bomb(limit, ramp=5, hold=hold_refusing)
    quiet = 40
    last = s[-1]
    s += [Sample(last.t_ns + (k + 1) * STEP_MS * MS, limit, limit, limit, last.refused, None, last.source) for k in range(quiet)]
    got = [i for i, _ in run(d.pinned, s)]
    assert got, "it fired while refusals went on"
    stopped = len(s) - quiet - 1  # the last sample with a new refusal
    assert all(s[i].t_ns - s[stopped].t_ns < PIN.hold_ms * MS for i in got)
    assert got[-1] < len(s) - 1


def test_pinned_not_when_the_level_dips_below_the_ratio_within_the_hold():
    limit = 512
    s = pinned_bomb(limit, ramp=5, hold=60, refused_per_sample=5)
    dip = 30
    s[dip] = Sample(s[dip].t_ns, 400, 400, limit, s[dip].refused, None, s[dip].source)
    got = [i for i, _ in run(d.pinned, s)]
    hold = PIN.hold_ms // STEP_MS
    in_hold = [i for i in got if dip <= i and s[i].t_ns - PIN.hold_ms * MS <= s[dip].t_ns]
    assert in_hold == []
    # It fires again once the dip has left the hold (and it did before the dip).
    assert any(i < dip for i in got) and any(i > dip + hold for i in got)
    after = [v for i, v in run(d.pinned, s) if i > dip + hold]
    assert after[0].first_sign_ns == s[dip + 1].t_ns


def test_pinned_not_without_a_refused_counter():
    s = series([512] * 50, limit=512, refused=None)
    assert run(d.pinned, s) == []


def test_pinned_not_with_too_few_refusals_or_too_short():
    limit = 512
    few = series([limit] * 50, limit=limit, refused=cumulative([1] + [0] * 49, 100))
    assert run(d.pinned, few) == []
    # Fewer than min_refused within every hold_ms window: one refusal every 100 ms.
    sparse = series([limit] * 80, limit=limit, refused=cumulative([1 if i % 5 == 0 else 0 for i in range(80)]))
    assert (PIN.hold_ms // 100) < PIN.min_refused
    assert run(d.pinned, sparse) == []
    # History shorter than the hold (the agent just started): it cannot have held yet.
    short = series([limit] * 10, limit=limit, refused=cumulative([10] * 10))
    assert run(d.pinned, short) == []


def test_pinned_disabled():
    s = pinned_bomb(limit=512, ramp=5, hold=60)
    assert run(d.pinned, s) != []
    assert run(d.pinned, s, PinnedParams(enabled=False)) == []


def test_pinned_params_are_honored():
    s = pinned_bomb(limit=512, ramp=5, hold=60, refused_per_sample=1)
    i_default, _ = first(d.pinned, s)
    i_long, _ = first(d.pinned, s, PinnedParams(hold_ms=800))
    assert s[i_long].t_ns - s[5].t_ns == 800 * MS and i_long > i_default
    assert run(d.pinned, s, PinnedParams(min_refused=100)) == []


# -- fill-hold -------------------------------------------------------------------------------
def churn_at_limit(limit: int, fill: int, hold: int, births_per_s: float, start: int = 20, source: str = "v2:pod", hover: float = 0.93) -> list[Sample]:
    """Fills from ``start`` to ``hover`` of the budget over ``fill`` samples, then hovers there
    (tasks exit as fast as new ones are born: churn just under the limit)."""
    top = int(hover * limit)
    tasks = [start + (top - start) * i // fill for i in range(fill)] + [top - (i % 3) for i in range(hold)]
    return series(tasks, limit=limit, source=source, births=births_under_pressure(tasks, limit, births_per_s))


def test_fill_hold_fires_for_a_fast_fill_held_with_churn():
    limit = 1024
    fill, hold = 50, 80
    s = churn_at_limit(limit, fill, hold, births_per_s=500)
    got = first(d.fill_hold, s)
    assert got is not None
    i, v = got
    reached = next(k for k, x in enumerate(s) if x.usage >= FILL.min_usage)
    assert s[i].t_ns - s[reached].t_ns == FILL.hold_ms * MS
    assert v.detector == "fill-hold" and v.evidence == "budget"
    low = max(k for k, x in enumerate(s[: i + 1]) if x.usage < 0.5)
    assert v.first_sign_ns == s[low].t_ns  # the last sample below half
    vals = v.reasons[0].values
    assert vals["births_per_s"] == 500
    assert vals["fill_ms"] == (s[reached].t_ns - s[low].t_ns) // MS
    assert vals["limit"] == limit and vals["source"] == "v2:pod" and vals["level"] == s[i].level
    assert "while 500 tasks/s were born" in v.reasons[0].detail


def test_fill_hold_also_on_the_default_budget():
    # No kernel limit, but a cgroup that filled its scale in a second and churns there.
    s = churn_at_limit(4096, 50, 80, births_per_s=1000, source="default")
    assert first(d.fill_hold, s) is not None


def test_fill_hold_churn_floor_scales_with_the_limit():
    # 5% of the budget per second, at least min_births_per_s.
    for limit, rate, fires in (
        (1024, 60, True),  # max(50, 51.2)
        (1024, 45, False),
        (200, 55, True),  # floor is min_births_per_s = 50
        (200, 40, False),
        (8192, 450, True),  # 5% of 8192 = 409.6/s
        (8192, 350, False),
    ):
        s = churn_at_limit(limit, 50, 80, births_per_s=rate)
        assert (run(d.fill_hold, s) != []) is fires, (limit, rate)


def test_fill_hold_not_for_a_steady_state_never_below_half_in_the_history():
    # An agent started next to a full but busy service: it has been at 93% all along.
    limit = 1024
    tasks = [952 - (i % 4) for i in range(400)]
    s = series(tasks, limit=limit, births=cumulative([20] * 400))  # 1000 births/s
    assert run(d.fill_hold, s) == []


def test_fill_hold_not_when_it_filled_too_slowly():
    limit = 1024
    s = churn_at_limit(limit, fill=250, hold=100, births_per_s=800)  # 5 s from 20 to 93%
    assert run(d.fill_hold, s) != []
    assert run(d.fill_hold, s, FillHoldParams(fill_ms=1000)) == []


def test_fill_hold_not_without_births():
    # No proc connector: births are never counted.
    limit = 1024
    s = churn_at_limit(limit, 50, 80, births_per_s=500)
    s = [Sample(x.t_ns, x.tasks, x.level, x.limit, x.refused, None, x.source) for x in s]
    assert run(d.fill_hold, s) == []


def test_fill_hold_not_at_low_churn():
    s = churn_at_limit(1024, 50, 200, births_per_s=25)
    assert run(d.fill_hold, s) == []


def test_fill_hold_not_when_usage_dips_within_the_hold():
    limit = 1024
    s = churn_at_limit(limit, 50, 80, births_per_s=500)
    i0, _ = first(d.fill_hold, s)
    k = i0 - 5  # below min_usage within the hold that would have fired at i0
    s[k] = Sample(s[k].t_ns, 850, 850, limit, None, s[k].births, s[k].source)
    got = [i for i, _ in run(d.fill_hold, s)]
    hold = FILL.hold_ms // STEP_MS
    assert all(i > k + hold - 1 for i in got)


def test_fill_hold_disabled():
    s = churn_at_limit(1024, 50, 80, births_per_s=500)
    assert run(d.fill_hold, s, FillHoldParams(enabled=False)) == []


# -- trajectory ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, tasks, limit",
    [
        # A CPU-bound bash bomb on two cores grows linearly from the first sample.
        ("bash bomb to 1024", linear(1, 3000, 1024, 25), 1024),
        ("bash bomb to 1500", linear(1, 3000, 1500, 35), 1500),
        # A slow bomb doubling every 300 ms, seen from a quarter of its budget on.
        ("doubling every 300 ms", [min(4096, int(1024 * 2 ** (i * STEP_MS / 300))) for i in range(40)], 4096),
        # A thread bomb filling its budget in 200 ms.
        ("thread bomb", [min(2048, 1 + 2048 * i // 10) for i in range(15)], 2048),
    ],
)
def test_trajectory_fires_for_runaways_before_the_limit(name, tasks, limit):
    s = series(tasks, limit=limit)
    got = first(d.trajectory, s)
    assert got is not None, name
    i, v = got
    assert s[i].level < limit, "flagged before the budget is gone"
    assert s[i].usage >= TRAJ.min_usage
    assert v.detector == "trajectory" and v.evidence == "trajectory"
    vals = v.reasons[0].values
    assert vals["tasks"] == tasks[i] and vals["limit"] == limit
    assert vals["eta_ms"] <= TRAJ.max_eta_ms
    assert vals["tasks_low"] == min(x.tasks for x in s if x.t_ns >= s[i].t_ns - TRAJ.window_ms * MS)
    assert v.first_sign_ns == next(x.t_ns for x in s if x.t_ns >= s[i].t_ns - TRAJ.window_ms * MS and x.tasks == vals["tasks_low"])


def test_trajectory_reason_numbers():
    # 60 tasks per sample = 3000/s; by sample 9 it holds 541 of 1024.
    s = series([1 + 60 * i for i in range(10)], limit=1024)
    v = at_end(d.trajectory, s)
    assert v is not None
    vals = v.reasons[0].values
    assert vals["tasks"] == 541 and vals["tasks_low"] == 1
    assert vals["rate_per_s"] == 3000
    assert vals["eta_ms"] == round((1024 - 541) / 3000 * 1000)
    assert vals["usage"] == round(541 / 1024, 3) and vals["level"] == 541 and vals["source"] == "v2:pod"
    assert v.first_sign_ns == s[0].t_ns
    assert "tasks grew 1 -> 541 in 180 ms (3000/s)" in v.reasons[0].detail


def bounded_ramp(rng: random.Random, limit: int) -> list[int]:
    """Bounded work: starts small, ramps at some rate, stops somewhere under half its budget,
    sits there, then winds down."""
    plateau = max(1, int(rng.uniform(0.02, 0.49) * limit))
    rate = rng.choice([50, 300, 1000, 3000, 10_000, 50_000])
    start = rng.randint(0, plateau)
    up = []
    c = float(start)
    while int(c) < plateau:
        up.append(int(c))
        c += rate * STEP_MS / 1000
    hold = [plateau] * rng.randint(5, 100)
    down = list(range(plateau, 0, -max(1, plateau // rng.randint(2, 20))))
    return up + hold + down


LIMITS = [64, 100, 512, 1024, 1500, 4096, 32768]


@pytest.mark.parametrize("seed", range(8))
def test_trajectory_never_fires_for_bounded_ramps_under_half(seed):
    rng = random.Random(seed)
    for _ in range(25):
        limit = rng.choice(LIMITS)
        source = rng.choice(["v2:pod", "v1:docker/x", "default"])
        tasks = bounded_ramp(rng, limit)
        assert max(tasks) < 0.5 * limit
        s = series(tasks, limit=limit, source=source, refused=0 if source != "default" else None)
        assert run(d.trajectory, s) == [], (limit, tasks[:20])


def test_trajectory_not_for_a_plateau_above_half():
    limit = 1024
    tasks = linear(1, 3000, 700, 20) + [700] * 100
    s = series(tasks, limit=limit)
    got = [i for i, _ in run(d.trajectory, s)]
    flat_from = tasks.index(700)
    assert all(i <= flat_from for i in got)
    # Also when it got there slowly enough never to have fired.
    slow = linear(560, 100, 700, 80) + [700] * 100
    assert run(d.trajectory, series(slow, limit=limit)) == []


def test_trajectory_not_for_slow_growth_with_a_far_eta():
    # 10 tasks/s at 60% of 1024: the budget would last another 40 s. Sampled every 100 ms so it
    # rises in every sample, and with min_rise lowered so only the ETA stands in the way.
    limit = 1024
    tasks = [614 + i for i in range(30)]
    s = series(tasks, limit=limit, step_ms=100)
    assert run(d.trajectory, s) == []  # defaults: too little rise as well
    lax = TrajectoryParams(min_rise=0.005)
    assert run(d.trajectory, s, lax) == []
    assert run(d.trajectory, s, TrajectoryParams(min_rise=0.005, max_eta_ms=60_000)) != []


def test_trajectory_not_for_a_calm_sibling_under_a_shared_limit():
    # Two containers under a pod limit of 1024: the bomb fills the pod; its calm sibling holds
    # 100 tasks throughout. The sibling's own tasks are flat while the pod's level rises.
    limit = 1024
    bomb = linear(1, 3000, limit - 100, 30)
    level = [b + 100 for b in bomb]
    sibling = series([100] * 30, level=level, limit=limit, refused=0)
    assert run(d.trajectory, sibling) == []
    # The bomb itself, with the same level, is flagged.
    assert run(d.trajectory, series(bomb, level=level, limit=limit, refused=0)) != []
    # A sibling that started 300 workers a moment ago (a rise well past min_rise) and then
    # stopped, while the bomb beside it keeps the pod's level rising: its own tasks are flat.
    own = [20 + 60 * i for i in range(6)] + [320] * 6
    bomb = linear(1, 3000, limit - 320, 12)
    level = [o + b for o, b in zip(own, bomb)]
    assert level[-1] > level[-2] > level[-3] > level[-4] >= 0.5 * limit
    got = run(d.trajectory, series(own, level=level, limit=limit, refused=0))
    assert all(i < 6 + TRAJ.rising_samples for i, _ in got)


def test_trajectory_not_for_a_sibling_that_grows_a_little_beside_a_bomb():
    # The sibling starts a few workers while the pod fills: rising in every sample, but far too
    # little growth of its own to count.
    limit = 1024
    bomb = linear(1, 3000, 900, 30)
    own = [100 + i for i in range(30)]
    s = series(own, level=[b + o for b, o in zip(bomb, own)], limit=limit)
    assert run(d.trajectory, s) == []


def test_trajectory_uses_the_level_for_usage_and_eta():
    limit = 1024
    own = [370 + 3 * i for i in range(51)]  # 150 tasks/s of its own, 520 at the end
    # Alone under its limit: 51% used, ~3.4 s to go at 150/s: not yet.
    assert at_end(d.trajectory, series(own, limit=limit)) is None
    # The same growth in a pod whose other containers hold 100 more: ~2.7 s to go.
    v = at_end(d.trajectory, series(own, level=[x + 100 for x in own], limit=limit))
    assert v is not None
    assert v.reasons[0].values["rate_per_s"] == 150 and v.reasons[0].values["eta_ms"] == round((1024 - 620) / 150 * 1000)
    # Fast growth of its own while the level is below min_usage (a large limit group): no.
    fast = linear(1, 3000, limit, 8)  # 421 at the end, still rising
    assert at_end(d.trajectory, series(fast, limit=limit)) is None
    assert at_end(d.trajectory, series(fast, level=[x + 200 for x in fast], limit=limit)) is not None


def test_trajectory_needs_rising_in_each_of_the_last_samples():
    limit = 1024
    tasks = linear(1, 3000, limit, 17)  # fires at 541 (sample 9); 961 at sample 16
    assert first(d.trajectory, series(tasks, limit=limit))[0] == 9
    stalled = tasks[:8] + [tasks[7]] + tasks[9:]  # one flat step just before
    got = first(d.trajectory, series(stalled, limit=limit))
    assert got is not None and got[0] == 8 + TRAJ.rising_samples
    ten = TrajectoryParams(rising_samples=10)
    assert first(d.trajectory, series(tasks, limit=limit), ten)[0] == 10
    assert first(d.trajectory, series(stalled, limit=limit), ten) is None  # would need sample 18


def test_trajectory_needs_enough_rise_within_the_window():
    limit = 1024
    # 80 tasks/s: rises every sample, but only ~8% of the budget per second.
    tasks = [600 + (8 * i) // 5 for i in range(100)]
    assert tasks[-1] - tasks[-51] < 0.1 * limit
    s = series(tasks, limit=limit, step_ms=STEP_MS)
    assert run(d.trajectory, s) == []
    assert run(d.trajectory, s, TrajectoryParams(min_rise=0.05, max_eta_ms=10_000)) != []


def test_trajectory_disabled():
    s = series(linear(1, 3000, 1024, 25), limit=1024)
    assert run(d.trajectory, s, TrajectoryParams(enabled=False)) == []


# -- properties over all three rules ---------------------------------------------------------
def bounded_shape(rng: random.Random, limit: int, n: int) -> list[int]:
    cap = int(0.49 * limit)
    kind = rng.choice(["walk", "saw", "spikes", "stairs", "exp-plateau", "burst", "flat"])
    if kind == "walk":
        c, out = rng.randint(0, cap), []
        for _ in range(n):
            c = min(cap, max(0, c + rng.randint(-cap // 8 - 1, cap // 8 + 1)))
            out.append(c)
        return out
    if kind == "saw":
        period = rng.randint(2, 60)
        return [cap * (i % period) // period for i in range(n)]
    if kind == "spikes":
        return [cap if rng.random() < 0.1 else rng.randint(0, cap // 4) for _ in range(n)]
    if kind == "stairs":
        step = rng.randint(1, 30)
        return [min(cap, (i // step) * max(1, cap // 10)) for i in range(n)]
    if kind == "exp-plateau":
        dbl = rng.uniform(20, 500)
        return [min(cap, int(2 ** (i * STEP_MS / dbl))) for i in range(n)]
    if kind == "burst":
        # Repeatedly 0 -> cap at full speed (parallel test runs, one after another).
        period = rng.randint(3, 40)
        return [cap if i % period else 0 for i in range(n)]
    return [rng.randint(0, cap)] * n


@pytest.mark.parametrize("seed", range(10))
def test_no_rule_fires_for_bounded_workloads(seed):
    rng = random.Random(1000 + seed)
    for _ in range(12):
        limit = rng.choice(LIMITS)
        source = rng.choice(["v2:kubepods/pod", "v1:system.slice/x", "default"])
        n = rng.randint(20, 300)
        tasks = bounded_shape(rng, limit, n)
        assert max(tasks) <= 0.49 * limit
        # Whatever churn: births counted (as if under pressure) at any rate, a refusal counter
        # that may carry earlier refusals but no new ones (nothing is at the limit now).
        churn = rng.choice([0, 10, 100, 2000])
        births = cumulative([churn] * n) if rng.random() < 0.7 else None
        refused = rng.choice([None, 0, 12345]) if source != "default" else None
        s = series(tasks, limit=limit, source=source, births=births, refused=refused)
        assert all_rules(s) == [], (limit, source, tasks[:30])


def unbounded(rng: random.Random, limit: int) -> tuple[list[Sample], int]:
    """Grows until its kernel limit, at least 100 tasks/s on average, then stays there while
    forks are refused. Returns the samples and the index of the first sample at the limit."""
    rate = math.exp(rng.uniform(math.log(100), math.log(30_000)))
    dbl = rng.choice([None, 50, 150, 300, 1000])
    sibling = rng.choice([0, 0, int(limit * rng.uniform(0, 0.3))])  # other containers under the same pod limit
    jitter = rng.random() < 0.3  # irregular scheduling: some samples see no new task
    room = limit - sibling
    base = rng.randint(1, max(1, room // 10))
    tasks: list[int] = []
    t, c = 0.0, float(base)
    while True:
        t += STEP_MS / 1000
        inc = rate * STEP_MS / 1000
        if dbl:
            inc = max(inc, c * (2 ** (STEP_MS / dbl) - 1))
        if jitter and rng.random() < 0.2:
            inc *= 2 if rng.random() < 0.5 else 0
        c += inc
        tasks.append(min(room, int(c)))
        if int(c) >= room:
            break
    reached = len(tasks) - 1
    after = 60  # 1.2 s at the limit
    tasks += [room] * after
    attempts = max(1, round(rate * STEP_MS / 1000))  # forks it keeps trying, refused at the limit
    refused = cumulative([0] * reached + [attempts] * (after + 1))
    source = rng.choice(["v2:kubepods/pod", "v1:docker/abc"])
    births = births_under_pressure([x + sibling for x in tasks], limit, max(rate, 100)) if rng.random() < 0.5 else None
    s = series(tasks, level=[x + sibling for x in tasks], limit=limit, source=source, refused=refused, births=births)
    return s, reached


@pytest.mark.parametrize("seed", range(10))
def test_some_rule_fires_for_unbounded_growth_within_a_second_of_the_limit(seed):
    rng = random.Random(2000 + seed)
    for _ in range(6):
        limit = rng.choice([64, 100, 512, 1024, 1500, 4096])
        s, reached = unbounded(rng, limit)
        assert s[reached].level == limit
        fired = sorted(all_rules(s), key=lambda x: x[1])
        assert fired, (limit, [x.tasks for x in s[:20]])
        name, i = fired[0]
        assert s[i].t_ns <= s[reached].t_ns + 1000 * MS, (name, limit, (s[i].t_ns - s[reached].t_ns) // MS)


@pytest.mark.parametrize("limit", [64, 1024, 4096])
def test_the_slowest_unbounded_growth_is_caught_at_the_limit(limit):
    # 100 tasks/s is below what the short window measures as growth for large budgets (10% a
    # second); the long window sees the steady trickle near the budget, or pinned at it.
    tasks = linear(1, 100, limit, limit * 10 + 10) + [limit] * 30
    reached = tasks.index(limit)
    tasks = tasks[: reached + 30]
    refused = cumulative([0] * reached + [2] * 30)
    s = series(tasks, limit=limit, refused=refused, source="v2:pod")
    fired = sorted(all_rules(s), key=lambda x: x[1])
    assert fired
    name, i = fired[0]
    assert s[i].t_ns - s[reached].t_ns <= 1000 * MS
    assert name in ("trajectory", "pinned")


@pytest.mark.parametrize("rate", [20, 50, 150, 400])
def test_a_slow_trickle_without_a_kernel_limit_is_caught_near_its_default_budget(rate):
    """No pids.max anywhere, the default budget (4096), and a runaway at a steady rate: it must be
    stopped before it doubles its budget, however slow (no refusals will ever come)."""
    limit = 4096
    tasks = linear(1, rate, 2 * limit, int(2 * limit / rate * 50) + 50)
    s = series(tasks, limit=limit, source="default")
    fired = sorted(all_rules(s), key=lambda x: x[1])
    assert fired, "never flagged"
    name, i = fired[0]
    assert name == "trajectory" and s[i].level <= 1.05 * limit, (s[i].level, rate)


def test_a_slow_ramp_that_stops_under_half_is_never_flagged():
    limit = 4096
    tasks = linear(1, 150, limit * 0.45, 900) + [int(limit * 0.45)] * 600
    s = series(tasks, limit=limit, source="default")
    assert all_rules(s) == []


# -- a calm sibling at a full shared limit (see the report) ----------------------------------
def test_budget_rules_see_the_shared_limit_and_the_agent_blames_the_one_holding_it():
    """Pinned and fill-hold measure the limit group, which a pod's containers share: on its own
    history a calm sibling of a bomb looks pinned too. The agent keeps such a verdict only for
    the cgroup holding the most of the limit (holds_most), so the sibling is not blamed."""
    limit = 512
    bomb = pinned_bomb(limit - 50, ramp=10, hold=40)
    sib = series([50] * len(bomb), level=[x.level + 50 for x in bomb], limit=limit, refused=[x.refused for x in bomb])
    assert run(d.pinned, sib) != []  # the rule alone cannot tell
    assert not d.holds_most(50, [limit - 50])  # the agent's attribution can
    assert d.holds_most(limit - 50, [50])
    assert d.holds_most(7, [])  # alone under its limit


def test_fill_hold_for_a_sibling_with_churn_is_dropped_by_attribution():
    limit = 1024
    bomb = churn_at_limit(limit - 30, fill=50, hold=80, births_per_s=500)
    level = [x.level + 30 for x in bomb]
    sib = series([30] * len(bomb), level=level, limit=limit, births=births_under_pressure(level, limit, 200))
    assert run(d.fill_hold, sib) != []
    assert not d.holds_most(30, [limit - 30])


def test_pinned_slowly_a_forker_that_backs_off_but_never_lets_go():
    """bash retries a refused fork after 1, 2, 4, 8 s: at its limit, ~1 refusal a second, never
    5 within 300 ms. Held for long_hold_ms with refusals still coming, it is pinned all the same."""
    limit = 256
    n = 500  # 10 s of samples
    refused = cumulative([1 if i % 50 == 0 else 0 for i in range(n)])  # one refusal a second
    s = series([limit] * n, limit=limit, refused=refused, source="v1:ctr")
    fired = run(d.pinned, s)
    assert fired, "never flagged"
    i = fired[0][0]
    assert PIN.long_hold_ms <= ms(i) <= PIN.long_hold_ms + 1500
    # bash's own back-off (refused at 0, then retried 1 s and 3 s later, then 7 s): two refusals
    # inside the long hold, so it is flagged within a few seconds of reaching the limit, not 8.
    t_refused = [0, 1000, 3000, 7000]
    bash = series([limit] * n, limit=limit, source="v1:ctr",
                  refused=cumulative([sum(1 for t in t_refused if t == k * STEP_MS) for k in range(n)]))
    fired = run(d.pinned, bash)
    assert fired and ms(fired[0][0]) <= 4500, fired[:1]
    # and a workload at its limit whose forks stopped being refused is left alone
    quiet = series([limit] * n, limit=limit, refused=cumulative([1 if i == 3 else 0 for i in range(n)]), source="v1:ctr")
    assert run(d.pinned, quiet) == []


def test_a_leap_far_past_the_default_budget_between_samples_is_caught_while_it_sits_there():
    """Calm sampling (1 s) misses the growth; the count then sits at whatever really holds it
    (pid_max, threads-max, RLIMIT_NPROC, a limit the agent cannot read): flat, no refusals it can
    read, no births it can count. Twice the default budget within the long window is the harm."""
    limit = 256
    calm = series([3, 3, 3], limit=limit, source="default", step_ms=1000)
    sitting = series([2048] * 10, limit=limit, source="default", t0_ms=1000 + 3 * 1000)
    s = calm + sitting
    fired = sorted(all_rules(s), key=lambda x: x[1])
    assert fired and fired[0] == ("trajectory", 3), fired
    v = at_end(d.trajectory, s[:4])
    assert v is not None and "8.0x its budget" in v.reasons[0].detail, v


def test_no_leap_verdict_under_a_kernel_limit_or_short_of_the_factor_or_from_long_ago():
    limit = 256
    jump = [3, 3, 3] + [2048] * 10
    # A kernel limit holds it: pinned decides there, on refusals, not the leap.
    assert at_end(d.trajectory, series(jump, limit=limit, level=[min(x, limit) for x in jump], source="v1:x")) is None
    # Short of the factor: a plateau past the budget that does not grow is not a runaway.
    assert not run(d.trajectory, series([3] * 3 + [int(1.9 * limit)] * 10, limit=limit, source="default"))
    # Past twice the budget for longer than the long window: it got there long ago and stays.
    long_ago = series([3] * 3, limit=limit, source="default", step_ms=20)
    later = series([600] * 2, limit=limit, source="default", t0_ms=1000 + 9000, step_ms=20)
    assert at_end(d.trajectory, long_ago + later) is None
