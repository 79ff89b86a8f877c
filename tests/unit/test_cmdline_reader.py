"""CmdlineReader: a read that stalls in the kernel (mmap_lock held by a forking process, a
stalled FUSE page) costs the caller a bounded wait and never its thread."""

import threading

from cgguard.kernel import cmdline_reader
from cgguard.kernel.cmdline_reader import CmdlineReader


class Gate:
    """A read function that blocks on the pids told to, until released."""

    def __init__(self):
        self.blocked: set[int] = set()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []

    def __call__(self, pid):
        self.calls.append(pid)
        if pid in self.blocked:
            self.entered.set()
            self.release.wait()
        return f"cmd-{pid}"


def test_a_free_read_answers():
    gate = Gate()
    r = CmdlineReader(gate, wait_s=5)
    assert r.read(1) == "cmd-1"
    assert r.read(2) == "cmd-2"
    assert r.overruns == 0 and r.skipped == 0


def test_a_stalled_read_gives_up_and_the_next_ones_do_not_wait():
    gate = Gate()
    gate.blocked.add(7)
    r = CmdlineReader(gate, wait_s=0.05)
    assert r.read(7) is None
    assert gate.entered.is_set() and r.overruns == 1
    # The worker is still inside the read: others are skipped, not queued behind it.
    assert r.read(8) is None and r.skipped == 1
    assert 8 not in gate.calls
    gate.release.set()
    # The late answer for 7 is dropped (its pid may be reused by now); new reads work again.
    assert _eventually(lambda: r.read(9) == "cmd-9")
    assert _eventually(lambda: r.read(7) == "cmd-7")


def _eventually(check, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


def test_a_read_stuck_for_good_is_abandoned_within_a_limit(monkeypatch):
    monkeypatch.setattr(cmdline_reader, "STUCK_S", 0.0)
    monkeypatch.setattr(cmdline_reader, "MAX_ABANDONED", 2)
    gate = Gate()
    gate.blocked.update({1, 2, 3})
    r = CmdlineReader(gate, wait_s=0.05)
    try:
        assert r.read(1) is None  # worker 1 stuck
        assert r.read(2) is None and r.abandoned == 1  # worker 2 takes over, gets stuck
        assert r.read(3) is None and r.abandoned == 2  # worker 3, stuck too
        assert r.read(4) is None and r.abandoned == 2 and r.skipped == 1  # no more threads spent
        assert 4 not in gate.calls
    finally:
        gate.release.set()


def test_a_failing_read_is_an_unknown_command_line():
    def boom(pid):
        raise OSError("gone")

    r = CmdlineReader(boom, wait_s=5)
    assert r.read(1) is None
    assert r.overruns == 0
