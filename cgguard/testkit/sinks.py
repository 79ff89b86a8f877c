"""Incident sinks for tests and the demo: hand each finished incident to a callback."""

from __future__ import annotations

from typing import Any, Callable

from cgguard.sinks.incidents import Incident


class CallbackSink:
    """Calls ``fn(incident_dict)`` when an incident has its result (not at detection)."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]):
        self.fn = fn

    def incident(self, inc: Incident) -> None:
        if inc.result != "detected":
            self.fn(inc.to_dict())
