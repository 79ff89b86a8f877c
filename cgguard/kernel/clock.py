"""Time in cgguard: CLOCK_MONOTONIC nanoseconds, the scale the proc connector stamps events with."""

from __future__ import annotations

import time

MS = 1_000_000
S = 1_000_000_000

now_ns = time.monotonic_ns
