"""Parsing the pids counters of a budget's limit groups (files laid out as cgroupfs has them)."""

from __future__ import annotations

from pathlib import Path

from cgguard.kernel.files import FileCache
from cgguard.state.budget import Budget, Budgets, LimitGroup


def lay(d: Path, current: int, refused: int | None) -> str:
    d.mkdir(parents=True)
    (d / "pids.current").write_text(f"{current}\n")
    if refused is not None:
        (d / "pids.events").write_text(f"max {refused}\n")
    return str(d)


def budgets() -> Budgets:
    return Budgets(fs=None, files=FileCache(8), default_tasks=4096, use_v1=False)  # type: ignore[arg-type]


def test_refusals_counted_in_the_forking_cgroup_add_to_the_limit_group(tmp_path: Path):
    # Before Linux 6.11 a fork refused at the pod's limit is counted in the container's own
    # pids.events, not the pod's: the pod's counter alone would never show refusals.
    pod = lay(tmp_path / "pod", 100, 0)
    ctr = lay(tmp_path / "pod" / "ctr", 99, 7)
    b = Budget(groups=(LimitGroup("v2", "pod", pod, 100),))
    p = budgets().pressure(b, 99, ctr)
    assert (p.level, p.limit, p.refused, p.source) == (100, 100, 7, "v2:pod")
    # Since 6.11 they are counted at the limit: the sum is the same event counted once.
    lay(tmp_path / "pod2", 50, 3)
    ctr2 = lay(tmp_path / "pod2" / "ctr", 49, 0)
    b2 = Budget(groups=(LimitGroup("v2", "pod2", str(tmp_path / "pod2"), 100),))
    assert budgets().pressure(b2, 49, ctr2).refused == 3


def test_the_limit_group_itself_is_not_counted_twice(tmp_path: Path):
    own = lay(tmp_path / "svc", 10, 4)
    b = Budget(groups=(LimitGroup("v2", "svc", own, 20),))
    assert budgets().pressure(b, 10, own).refused == 4


def test_fullest_group_wins_and_no_counter_is_none(tmp_path: Path):
    loose = lay(tmp_path / "a", 10, None)
    tight = lay(tmp_path / "a" / "b", 9, None)
    b = Budget(groups=(LimitGroup("v2", "a/b", tight, 10), LimitGroup("v2", "a", loose, 1000)))
    p = budgets().pressure(b, 9)
    assert (p.level, p.limit, p.refused, p.source) == (9, 10, None, "v2:a/b")


def test_no_readable_group_falls_back_to_the_default(tmp_path: Path):
    b = Budget(groups=(LimitGroup("v2", "gone", str(tmp_path / "gone"), 10),))
    p = budgets().pressure(b, 12, str(tmp_path / "gone"))
    assert (p.level, p.limit, p.refused, p.source) == (12, 4096, None, "default")
