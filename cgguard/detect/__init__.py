"""Detectors: pure functions of state that say whether a cgroup holds a bomb, and why.

Every detector returns ``None`` or a :class:`Verdict`. A verdict always carries the reasons,
each with the numbers that crossed a threshold, so an operator can see why cgguard acted.
Detectors do no I/O: they get samples (cgroup level) or the lineage tree, and a clock value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Reason:
    """One triggered rule: ``rule`` names it, ``detail`` says it in words, ``values`` the numbers."""

    rule: str
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "detail": self.detail, "values": dict(self.values)}


@dataclass(frozen=True, slots=True)
class Origin:
    """The process a bomb's lineage descends from; it may be dead (a placeholder record)."""

    pid: int
    start_ns: int
    comm: str | None
    cmdline: str | None
    alive: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_ns": self.start_ns,
            "comm": self.comm,
            "cmdline": self.cmdline,
            "alive": self.alive,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """A detector's finding about one cgroup.

    ``first_sign_ns`` is when the growth began as far as the detector can tell (monotonic ns);
    the incident's ``detect_ms`` is measured from it. ``members`` is set from the lineage tree:
    the (tgid, start_ns) identities of the bomb's live members, for a surgical kill.
    """

    cgroup: str
    detector: str  # the rule: pinned, fill-hold, trajectory, lineage
    reasons: tuple[Reason, ...]
    tasks: int
    first_sign_ns: int
    at_ns: int
    # What decided, in the words of the detection model: "budget" (at or holding its limit),
    # "trajectory" (growth that will not stop short of it) or "lineage" (a family that abandons
    # its copies generation after generation).
    evidence: str = ""
    budget: int | None = None
    budget_source: str = ""
    # False when the lineage behind this verdict is only partly known (the agent started after
    # the family did, or events were lost): nothing may then be spared as "not the bomb".
    complete: bool = True
    origin: Origin | None = None
    members: frozenset[tuple[int, int]] | None = None
    family: int | None = None
    depth: int | None = None
    # The origin's lineage record (state, not serialized): after the cgroup is frozen the action
    # asks the tree which processes descend from it, including those forked after the verdict.
    origin_ref: Any = field(default=None, compare=False, repr=False)

    def summary(self) -> str:
        return "; ".join(r.detail for r in self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cgroup": self.cgroup,
            "detector": self.detector,
            "reasons": [r.to_dict() for r in self.reasons],
            "tasks": self.tasks,
            "evidence": self.evidence,
            "budget": self.budget,
            "budget_source": self.budget_source,
            "origin": self.origin.to_dict() if self.origin else None,
            "family": self.family,
            "depth": self.depth,
        }
