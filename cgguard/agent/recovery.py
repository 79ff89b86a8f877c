"""Start-up after a crash: incidents the last run left without a result are closed, and their
cgroups looked at again at once (a surgical kill interrupted mid-way is thawed first)."""

from __future__ import annotations

import logging

from cgguard.config import Action
from cgguard.kernel.cgroupfs import CgroupError, CgroupFS
from cgguard.sinks.incidents import IncidentLog, IncidentLogError

log = logging.getLogger("cgguard.agent")


def recover(incidents: IncidentLog, fs: CgroupFS) -> set[str]:
    """Close every incident left open by a crash. Returns their cgroups, to re-evaluate."""
    reeval: set[str] = set()
    for rec in incidents.open_incidents():
        note = "the agent stopped before this incident had a result; its cgroup was re-evaluated at start-up"
        cg = rec.get("cgroup")
        if rec.get("action") == Action.kill_lineage.value and isinstance(cg, str) and thaw_interrupted(fs, cg):
            note += " (thawed first: the interrupted surgical kill had left it frozen)"
        try:
            incidents.close_interrupted(rec, note)
        except (IncidentLogError, OSError) as e:
            log.error("incident log: closing %s: %s", rec.get("id"), e)
            continue
        if isinstance(rec.get("cgroup"), str):
            reeval.add(rec["cgroup"])
        log.warning("incident %s in %s was interrupted by an agent restart", rec.get("id"), rec.get("cgroup"))
    return reeval


def thaw_interrupted(fs: CgroupFS, rel: str) -> bool:
    """A surgical kill freezes the shared cgroup while it sorts the bomb from its neighbours;
    an agent killed in between leaves it frozen. A frozen bomb neither grows nor refuses
    forks, so no rule would ever see it, and the neighbours stay frozen with it. Thawed, the
    bomb is seen at once (its cgroup is re-evaluated) and removed whole: its lineage is lost."""
    try:
        if not fs.exists(rel) or not fs.frozen(rel):
            return False
        fs.freeze(rel, False)
    except CgroupError as e:
        log.error("thawing %s after an interrupted surgical kill: %s", rel, e)
        return False
    log.warning("thawed %s: an interrupted surgical kill had left it frozen", rel)
    return True
