"""Cgroup-level detectors on recorded/synthetic sample series (pure, no I/O)."""

from cgguard.config import ForkFailureParams, GrowthParams, SaturationParams
from cgguard.detect import cgroup as d
from cgguard.state.samples import History, Sample

MS = 1_000_000

# Recorded on this machine (2 cores, hybrid cgroups, agent at SCHED_RR 1): a classic bash bomb
# sampled every 20 ms. CPU-bound from the first sample, it grows linearly at ~2.8k tasks/s.
BASH_BOMB = [1, 61, 118, 168, 225, 282, 336, 402, 465, 535, 551, 553, 554, 554]


def hist(counts, step_ms=20, pids_max=None, refused=None):
    h = History()
    for i, c in enumerate(counts):
        h.add(Sample(i * step_ms * MS, c, pids_max, None if refused is None else refused[i]))
    return h


def test_recorded_bash_bomb_is_flagged_while_rising():
    p = GrowthParams()
    first = None
    for n in range(3, len(BASH_BOMB) + 1):
        h = hist(BASH_BOMB[:n])
        v = d.growth("x", h, h.last.t_ns, p)
        if v is not None:
            first = (n, v)
            break
    assert first is not None
    n, v = first
    assert v.tasks >= p.min_tasks and v.detector == "growth"
    assert v.reasons[0].values["rate_per_s"] > 2000
    assert v.first_sign_ns == 0  # growth began at the first sample


def test_plateau_is_not_flagged():
    # The same bomb once held by a cap: a flat count is contained, not growing.
    h = hist([554] * 30)
    assert d.growth("x", h, h.last.t_ns, GrowthParams()) is None


def test_burst_of_sleepers_below_min_tasks_is_not_flagged():
    # One parent starting 300 sleeping children at ~4k forks/s.
    counts = [1 + min(300, 80 * i) for i in range(20)]
    hist(counts)
    for n in range(2, len(counts) + 1):
        hh = hist(counts[:n])
        assert d.growth("x", hh, hh.last.t_ns, GrowthParams()) is None


def test_slow_climb_is_not_flagged():
    # A big service adding 600 workers over 10 s: large, but no multiplication within 1 s.
    counts = [100 + 6 * i for i in range(100)]
    h = hist(counts, step_ms=100)
    assert d.growth("x", h, h.last.t_ns, GrowthParams()) is None


def test_churn_is_not_flagged():
    counts = [16, 18, 17, 16, 19, 17] * 10
    h = hist(counts)
    assert d.growth("x", h, h.last.t_ns, GrowthParams()) is None


def test_saturation_needs_hold_and_refusals():
    p = SaturationParams(hold_ms=500, min_forks_refused=10)
    full = [100] * 40
    # full and refusing forks for the whole hold time
    h = hist(full, pids_max=100, refused=list(range(0, 400, 10)))
    v = d.saturation("x", h, h.last.t_ns, p)
    assert v is not None and v.reasons[0].values["pids_max"] == 100
    # full but nothing refused: a workload that merely sits at its limit
    h = hist(full, pids_max=100, refused=[5] * 40)
    assert d.saturation("x", h, h.last.t_ns, p) is None
    # not full for the whole hold
    h = hist([50] * 20 + [100] * 20, pids_max=100, refused=list(range(0, 400, 10)))
    assert d.saturation("x", h, h.last.t_ns, p) is None
    # no pids.max (hybrid host): never
    h = hist(full)
    assert d.saturation("x", h, h.last.t_ns, p) is None


def test_fork_failures_rate():
    p = ForkFailureParams(min_failures=50, window_ms=1000)
    h = hist([100] * 50, pids_max=100, refused=[i * 3 for i in range(50)])
    v = d.fork_failures("x", h, h.last.t_ns, p)
    assert v is not None and v.reasons[0].values["forks_refused"] >= 50
    h = hist([100] * 50, pids_max=100, refused=[i // 10 for i in range(50)])
    assert d.fork_failures("x", h, h.last.t_ns, p) is None


def test_history_is_bounded():
    h = History(max_age_ns=1000 * MS, max_len=64)
    for i in range(10_000):
        h.add(Sample(i * MS, i))
    assert len(h) <= 64 and h.peak == 9999
