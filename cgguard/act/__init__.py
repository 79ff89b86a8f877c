"""Actions: remove a bomb. Shared kill mechanics for every detector (as oomd's plugins share theirs).

* ``kill_cgroup``: ``cgroup.kill`` -- the kernel SIGKILLs the whole subtree and also catches
  children forked while it runs, so it is atomic against a fork bomb. Completion is
  ``populated 0`` in ``cgroup.events`` (watched through inotify), retried on timeout.
* ``kill_lineage``: the bomb shares its cgroup with innocent processes. Freeze the cgroup (frozen
  tasks cannot fork), move the bomb's processes into a quarantine child cgroup (which is frozen
  too: it inherits its parent's freeze), ``cgroup.kill`` the quarantine, wait for
  ``populated 0``, remove it, thaw. Membership is decided while frozen, from the lineage records
  and the frozen ppid links, so a child forked during the move cannot escape.
* ``freeze``: freeze and leave it frozen for forensics.

Everything here tolerates the cgroup vanishing underneath: that is success, not an error.
"""

from cgguard.act.cgroup import (
    QUARANTINE_PREFIX,
    SWEEP_AFTER_S,
    ActionResult,
    count_tasks,
    freeze,
    kill_cgroup,
    kill_exited_leaders,
    wait_events,
)
from cgguard.act.surgical import Classify, bomb_members, kill_lineage

__all__ = [
    "QUARANTINE_PREFIX",
    "SWEEP_AFTER_S",
    "ActionResult",
    "Classify",
    "bomb_members",
    "count_tasks",
    "freeze",
    "kill_cgroup",
    "kill_exited_leaders",
    "kill_lineage",
    "wait_events",
]
