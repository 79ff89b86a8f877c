"""The agent's own process on the host: scheduling priority, OOM protection, fd limit, and
readiness for systemd. Nothing here is about the processes the agent guards."""

from __future__ import annotations

import logging
import os
import resource
import socket
from typing import Any

log = logging.getLogger("cgguard.agent")
# Descriptors the rest of the agent may hold at once (sockets and their connections, pipes, the
# incident log, /proc reads, a kill's inotify, hooks): kept-open cgroupfs files never take these.
FD_RESERVE = 64


def raise_thread_priority(realtime: bool = True) -> list[str]:
    """A bomb on a small node starves everyone; the agent must keep running to remove it.

    Linux keeps nice values and scheduling policies per thread, so each agent thread calls this
    for itself (and an agent embedded in another program changes only its own threads).
    """
    notes = []
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -15)
    except OSError as e:
        notes.append(f"nice: {e.strerror}")
    if realtime:
        # Nice alone loses: CFS shares CPU per task, and 500 bomb tasks at nice 0 outweigh one
        # agent at nice -15 twenty to one. SCHED_RR at the lowest RT priority runs the agent as
        # soon as an event arrives; its hot path is event-driven and short, and the kernel's RT
        # throttling (sched_rt_runtime_us) still bounds it should it ever spin.
        try:
            # RESET_ON_FORK: nothing the agent's threads might ever spawn inherits RT priority.
            os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(1))
        except (OSError, AttributeError) as e:
            notes.append(f"SCHED_RR: {getattr(e, 'strerror', e)}")
    return notes


def protect_process() -> list[str]:
    """Per-process protections: never the OOM killer's victim, enough fds for pread sampling."""
    notes = []
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        notes.append(f"oom_score_adj: {e.strerror}")
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as e:
        notes.append(f"RLIMIT_NOFILE: {e}")
    return notes


def files_within_fd_limit(max_open: int) -> tuple[int, str] | None:
    """Kept-open files get at most half of what RLIMIT_NOFILE leaves beyond FD_RESERVE. A cache
    that filled the fd table (the file cache only shrinks when its own open fails) would make
    every other open fail with EMFILE: the status, a budget's pids.max, the incident log.
    Returns (the lower bound, a note for the operator) if ``max_open`` must shrink, else None."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    fit = max(0, (soft - FD_RESERVE) // 2)
    if fit >= max_open:
        return None
    return fit, (
        f"RLIMIT_NOFILE is {soft}: keeping at most {fit} cgroupfs files open "
        f"(sampling.max_open_files {max_open}); the rest are opened per read"
    )


def profiler() -> Any:
    """CGGUARD_PROFILE=FILE: profile the loop thread with cProfile, written to FILE at exit (for
    ``cgguard bench``'s cost runs and by hand; the profiler slows the loop, so never in production)."""
    if not os.environ.get("CGGUARD_PROFILE"):
        return None
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    return prof


def sd_notify(msg: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed: %s", e)
        return False
