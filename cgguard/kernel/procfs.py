"""Kernel edge: the bits of /proc cgguard reads, with process identity as (tgid, start_ns).

``start_ns`` is on the CLOCK_MONOTONIC scale so that records created from proc-connector events
(whose timestamps are monotonic) and records loaded from /proc compare directly. /proc gives the
start in clock ticks since boot (CLOCK_BOOTTIME), so the boottime-monotonic offset (time spent
suspended) is subtracted. A pid is the same process only if its start time matches too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
TICK_NS = 1_000_000_000 // CLK_TCK


def _suspend_offset_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    comm: str
    state: str
    ppid: int
    start_ns: int  # monotonic scale, tick resolution
    num_threads: int


def parse_stat(pid: int, text: str, offset_ns: int = 0) -> ProcStat:
    # comm may contain spaces and parentheses: it runs to the *last* ')'.
    lpar, rpar = text.index("("), text.rindex(")")
    comm = text[lpar + 1 : rpar]
    rest = text[rpar + 2 :].split()
    # rest[0] is field 3 (state); starttime is field 22, num_threads field 20.
    return ProcStat(
        pid=pid,
        comm=comm,
        state=rest[0],
        ppid=int(rest[1]),
        start_ns=int(rest[19]) * TICK_NS - offset_ns,
        num_threads=int(rest[17]),
    )


def read_stat(pid: int, offset_ns: int | None = None) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    return parse_stat(pid, text, _suspend_offset_ns() if offset_ns is None else offset_ns)


def read_cmdline(pid: int, limit: int = 4096) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(limit)
    except OSError:
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace") or None


def same_process(stat: ProcStat | None, start_ns: int, slack_ns: int = 3 * TICK_NS) -> bool:
    """Is this the process that started at ``start_ns``? /proc has tick resolution; events ns."""
    return stat is not None and abs(stat.start_ns - start_ns) <= slack_ns
