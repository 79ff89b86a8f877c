"""The netlink proc connector, cgguard's lineage feed, works in the guest."""

from __future__ import annotations

import os
import subprocess

from pyroute2 import ProcEventSocket


# pyroute2 reads the socket from its own event loop into an internal queue, so select() on the
# fd misses queued events; get() simply blocks, and pytest-timeout (the guest's per-test
# timeout) stops it if an event is lost.
def test_fork_exec_and_exit_events_arrive_for_a_child():
    ps = ProcEventSocket()
    try:
        ps.bind()
        ps.control(listen=True)
        child = subprocess.Popen(["true"])
        child.wait()
        wanted = {"PROC_EVENT_FORK", "PROC_EVENT_EXEC", "PROC_EVENT_EXIT"}
        seen: dict[str, dict] = {}
        while not wanted <= seen.keys():
            for msg in ps.get():
                if child.pid in (msg.get("child_pid"), msg.get("process_pid")):
                    seen.setdefault(msg.get("event"), msg)
    finally:
        ps.close()
    fork = seen["PROC_EVENT_FORK"]
    assert (fork["parent_tgid"], fork["child_tgid"]) == (os.getpid(), child.pid)
    assert seen["PROC_EVENT_EXIT"]["exit_code"] == 0
