"""The agent core, split by role:

* :mod:`.core` -- the loop: kernel sources in (inotify, the proc connector, wake-ups), wiring;
* :mod:`.draining` -- when and how the loop reads the proc connector (coalesced drains);
* :mod:`.detecting` -- the detectors run on what the sources brought in: verdicts;
* :mod:`.policy` -- pure: from a verdict and what is known to an action;
* :mod:`.context` -- what is known: gathered for the policy on the loop;
* :mod:`.acting` -- verdict to decision, action and incident; cooldowns and escalation;
* :mod:`.kills` -- whole-cgroup kills written on the loop, waiting for their end;
* :mod:`.worker` -- carries the slower actions out off the loop;
* :mod:`.recording` -- incidents out (log, sinks, counts) and workload attribution;
* :mod:`.recovery` -- start-up after a crash: interrupted incidents closed, frozen cgroups thawed;
* :mod:`.control` -- the control socket, on its own thread, and its answers;
* :mod:`.status` -- the typed status and the lineage tree view, built on request;
* :mod:`.tracking` -- proc connector -> lineage records, with the seed's knobs;
* :mod:`.host` -- what the agent does to its own process (priority, OOM protection, fd limit, sd_notify).
"""

from .core import Agent
from .recording import IncidentSink

__all__ = ["Agent", "IncidentSink"]
