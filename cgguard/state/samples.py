"""State: recent task-count samples of one watched cgroup.

The watcher appends a :class:`Sample` per read; detectors read the history. The history is a
bounded ring (by age and by length) so 1,000 calm cgroups cost a few KiB each at most.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sample:
    t_ns: int  # CLOCK_MONOTONIC
    tasks: int
    pids_max: int | None = None
    forks_refused: int | None = None  # pids.events "max" (cumulative)


class History:
    __slots__ = ("samples", "max_age_ns", "peak")

    def __init__(self, max_age_ns: int = 5_000_000_000, max_len: int = 512):
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

    @property
    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def since(self, t_ns: int) -> list[Sample]:
        return [s for s in self.samples if s.t_ns >= t_ns]

    def __len__(self) -> int:
        return len(self.samples)
