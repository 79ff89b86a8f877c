"""The agent core, split by role:

* :mod:`.core` -- the loop: kernel sources in, verdicts, incidents out (owns all state);
* :mod:`.policy` -- pure: from a verdict and what is known to an action;
* :mod:`.worker` -- carries actions out off the loop;
* :mod:`.control` -- the control socket, on its own thread;
* :mod:`.status` -- the typed status and the lineage tree view, built on request;
* :mod:`.tracking` -- proc connector -> lineage records, with the seed's knobs;
* :mod:`.host` -- what the agent does to its own process (priority, OOM protection, sd_notify).
"""

from .core import Agent, IncidentSink

__all__ = ["Agent", "IncidentSink"]
