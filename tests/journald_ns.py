"""A real systemd-journald in a private mount namespace, for tests of the journal sink.

tmpfs on /run and /var/log/journal and its own journald.conf bind-mounted over the host's, so
the host's journal is never touched. Writers reach the namespace's socket through
/proc/<journald>/root (``Journald.socket``); journalctl reads the entries back inside the same
namespace (nsenter).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

JOURNALD = "/lib/systemd/systemd-journald"
CONF = """[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
Audit=no
RateLimitIntervalSec=0
"""
SCRIPT = """set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/systemd/journal /run/log/journal
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
mount --bind "$1" /etc/systemd/journald.conf
exec {journald}
"""


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Journald:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.socket = f"/proc/{proc.pid}/root/run/systemd/journal/socket"

    def journalctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "journalctl", "--no-pager", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def entries(self, *matches: str) -> list[dict[str, Any]]:
        r = self.journalctl("-o", "json", "--all", *matches)
        assert r.returncode in (0, 1), r.stderr  # 1: no entries yet on some versions
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def wait_entries(self, n: int, *matches: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            e = self.entries(*matches)
            return e if len(e) >= n else None

        return wait_for(enough, f"{n} journal entries {matches}", timeout)


def missing() -> str | None:
    """Why a private journald cannot run here, or None."""
    tools = [t for t in ("unshare", "nsenter", "journalctl", "mount") if shutil.which(t) is None]
    if os.geteuid() != 0:
        return "needs root for a private mount namespace"
    if not os.path.exists(JOURNALD):
        return f"{JOURNALD} not installed"
    if tools:
        return f"missing tools: {tools}"
    if not os.path.exists("/etc/systemd/journald.conf"):
        return "/etc/systemd/journald.conf missing (the private config is bind-mounted over it)"
    return None


@contextlib.contextmanager
def private_journald(workdir: str | Path) -> Iterator[Journald]:
    """Start journald in its own mount namespace; stopped (and its namespace gone) on exit.
    Call :func:`missing` first and skip when it gives a reason."""
    conf = Path(workdir) / "journald.conf"
    conf.write_text(CONF)
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC")}
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", SCRIPT.format(journald=JOURNALD), "sh", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    j = Journald(proc)
    try:
        wait_for(lambda: proc.poll() is not None or os.path.exists(j.socket), "journald's socket")
        if proc.poll() is not None:
            assert proc.stderr is not None
            raise AssertionError(f"journald exited {proc.returncode}: {proc.stderr.read().decode()}")
        yield j
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
