"""The generated family of workload shapes: labels by construction, peaks, fixed seed."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from cgguard.config import LineageDetect
from cgguard.testkit import shapes
from cgguard.testkit.shapes import Shape, ShapeError, ShapeKit, cells, generate, quick_subset


def tree_members(fanout: int, depth: int) -> int:
    """Members of a tree counted one by one (independently of Shape.members)."""
    count, frontier = 1, 1
    for _ in range(depth):
        frontier *= fanout
        count += frontier
    return count


@pytest.mark.parametrize("budget", [64, 256, 1024])
def test_bounded_shapes_stay_under_half_their_budget(budget):
    family = generate(budget=budget)
    benign = [s for s in family if s.label == "benign"]
    assert benign, "no bounded shapes"
    for s in benign:
        expected = tree_members(s.fanout, s.depth) if s.topology == "tree" else 1 + s.fanout
        assert s.peak_bound() == expected, s.name
        assert s.peak_bound() * 2 < budget, f"{s.name}: {s.peak_bound()} not under half of {budget}"
        assert s.budget == budget


def test_abandoning_bounded_shapes_stay_below_the_lineage_rule():
    # The model's documented limit: a bounded fire-and-forget tree of min_generations looks like a bomb.
    limit = LineageDetect().min_generations
    assert shapes.MAX_BENIGN_ABANDON_DEPTH < limit
    abandoning = [s for s in generate() if s.label == "benign" and not s.wait]
    assert abandoning
    for s in abandoning:
        assert s.abandoning_generations() < limit, s.name
    # ... while bounded shapes that wait go deeper than that.
    assert any(s.depth >= limit for s in generate() if s.label == "benign" and s.wait)


def test_labels_follow_construction():
    family = generate()
    assert len(family) >= 100
    bombs = [s for s in family if s.label == "bomb"]
    benign = [s for s in family if s.label == "benign"]
    assert len(bombs) >= 40 and len(benign) >= 40
    for s in bombs:
        assert not s.bounded and s.hold_ms == 0
        if s.topology == "tree":
            assert s.depth == 0  # no depth limit: only the deadline stops it
            assert s.fanout >= 2 or s.wait, f"{s.name}: an abandoning chain of one does not grow"
        else:
            assert s.fanout == 0  # children until stopped
        assert s.fill_estimate_s() <= shapes.MAX_BOMB_FILL_S
        assert s.deadline_s() <= 30
        assert "unbounded" in s.name
        with pytest.raises(ShapeError):
            s.members()
    for s in benign:
        assert s.bounded and s.hold_ms > 0 and s.depth >= 1
        assert s.leaves() >= 1
    # Threads never exec; every cell of the family is covered, with and without waiting.
    assert not any(s.exec for s in family if s.threads)
    covered = {(s.kind, s.topology, s.exec, s.wait, s.label) for s in family}
    assert covered == set(cells())
    assert {s.kind for s in family} == set(shapes.KINDS)


def test_the_same_seed_gives_the_same_family():
    a, b = generate(seed=7), generate(seed=7)
    assert a == b and [s.name for s in a] == [s.name for s in b]
    assert generate(seed=8) != a
    assert generate() == generate(shapes.DEFAULT_SEED, shapes.DEFAULT_COUNT, 256)
    assert len({s.name for s in a}) == len(a)  # names are unique (they name cgroups and files)


def test_quick_subset_covers_each_behaviour_once():
    q = quick_subset(generate())
    keys = [(s.kind, s.wait, s.label) for s in q]
    assert len(keys) == len(set(keys)) == len(shapes.KINDS) * 2 * 2


def test_a_shape_outside_its_class_is_refused():
    too_big = Shape(0, "bash", "tree", "benign", 2, 7, False, True, 0, 200, 256)  # 255 members
    assert "half" in shapes._check(too_big)
    too_deep = Shape(0, "bash", "tree", "benign", 2, 4, False, False, 0, 200, 256)
    assert "documented limit" in shapes._check(too_deep)
    flat = Shape(0, "bash", "tree", "bomb", 1, 0, False, False, 0, 0, 256)
    assert "does not grow" in shapes._check(flat)
    with pytest.raises(ShapeError):
        generate(budget=8)


def test_command_lines(tmp_path):
    kit = ShapeKit(str(tmp_path))
    s = next(x for x in generate() if x.kind == "bash" and x.exec and x.label == "benign")
    argv = kit.argv(s, 5, str(tmp_path / "done"))
    script = argv[argv.index("bash") + 1]
    text = open(script).read()
    assert f"FANOUT={s.fanout}" in text and f"DEPTH={s.depth}" in text and "EXEC=1" in text
    assert argv[-2] == "0"  # the generation counter the script passes on, +1 per generation
    py = next(x for x in generate() if x.kind == "py-thread")
    assert kit.argv(py, 5)[1] == kit.py


def _run(kit: ShapeKit, s: Shape, tmp_path) -> tuple[int, int]:
    done = tmp_path / f"{s.name}.done"
    p = subprocess.run(kit.argv(s, s.deadline_s(), str(done)), timeout=30, stdin=subprocess.DEVNULL)
    # Abandoning shapes exit before their leaves: wait for the last leaf's byte.
    import time

    end = time.monotonic() + 10
    while time.monotonic() < end and (not done.exists() or done.stat().st_size < s.leaves()):
        time.sleep(0.05)
    return p.returncode, done.stat().st_size if done.exists() else 0


@pytest.mark.parametrize("kind,exec_,wait", [
    ("bash", False, True), ("bash", True, False), ("c-proc", True, True), ("c-proc", False, False),
    ("c-thread", False, True), ("c-thread", False, False), ("py-thread", False, True), ("py-thread", False, False),
])
def test_tiny_bounded_shapes_finish_every_leaf(tmp_path, kind, exec_, wait):
    """Real runs of small bounded shapes (at most 7 tasks each): every leaf records its work."""
    if kind.startswith("c-") and shutil.which("gcc") is None:
        reason = "gcc is not installed"
        print(reason)
        pytest.skip(reason)
    kit = ShapeKit(str(tmp_path / "kit"))
    for topology, fanout, depth in (("tree", 2, 2), ("loop", 3, 1)):
        s = Shape(0, kind, topology, "benign", fanout, depth, exec_, wait, 10, 200, 256)
        assert shapes._check(s) is None
        rc, leaves = _run(kit, s, tmp_path)
        assert rc == 0, s.name
        assert leaves == s.leaves(), f"{s.name}: {leaves} of {s.leaves()} leaves"


def test_programs_are_built_once(tmp_path):
    if shutil.which("gcc") is None:
        reason = "gcc is not installed"
        print(reason)
        pytest.skip(reason)
    kit = ShapeKit(str(tmp_path))
    b1 = kit.c_binary()
    mtime = os.stat(b1).st_mtime_ns
    assert ShapeKit(str(tmp_path)).c_binary() == b1 and os.stat(b1).st_mtime_ns == mtime
