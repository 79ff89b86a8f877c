"""State: recent samples of one watched cgroup: its tasks and how full its budget is.

The watcher appends a :class:`Sample` per read; detectors read the history. The history is a
bounded ring (by age and by length) so 10,000 calm cgroups cost a few hundred bytes each.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cgguard.config import HISTORY_MS


@dataclass(frozen=True, slots=True)
class Sample:
    t_ns: int  # CLOCK_MONOTONIC
    tasks: int  # the cgroup's own tasks (threads, its subtree included)
    level: int  # tasks charged to its limiting group (its own tasks when the budget is the default)
    limit: int  # its budget
    refused: int | None = None  # forks refused at the limiting group, cumulative (pids.events max)
    births: int | None = None  # tasks created in it, cumulative, as the proc connector saw them
    source: str = "default"  # where the budget comes from: v2:<path>, v1:<path>, default

    @property
    def usage(self) -> float:
        return self.level / self.limit if self.limit > 0 else 0.0

    @property
    def kernel_limit(self) -> bool:
        return self.source != "default"


class History:
    __slots__ = ("samples", "max_age_ns", "peak")

    def __init__(self, max_age_ns: int = HISTORY_MS * 1_000_000, max_len: int = 600):
        self.samples: deque[Sample] = deque(maxlen=max_len)
        self.max_age_ns = max_age_ns
        self.peak = 0

    def add(self, s: Sample) -> None:
        self.samples.append(s)
        if s.tasks > self.peak:
            self.peak = s.tasks
        cutoff = s.t_ns - self.max_age_ns
        while len(self.samples) > 2 and self.samples[0].t_ns < cutoff:
            self.samples.popleft()

    def clear(self) -> None:
        self.samples.clear()
        self.peak = 0

    @property
    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def since(self, t_ns: int) -> list[Sample]:
        return [s for s in self.samples if s.t_ns >= t_ns]

    def at(self, t_ns: int) -> Sample | None:
        """The last sample taken at or before ``t_ns``."""
        found = None
        for s in self.samples:
            if s.t_ns > t_ns:
                break
            found = s
        return found

    def __len__(self) -> int:
        return len(self.samples)
