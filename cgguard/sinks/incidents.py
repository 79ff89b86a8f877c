"""Sink: the durable incident log, ``<state-dir>/incidents.jsonl``.

One JSON object per line, appended and fsynced twice per incident: at detection (``result:
"detected"``, so a crash mid-kill still leaves a trace) and again with the outcome, under the same
``id``. Readers fold the lines by id, last line wins. A torn last line (crash during a write) is
skipped and reported, never fatal, and the next append starts on a fresh line so it loses nothing.
A line of the wrong shape (valid JSON, wrong fields or types) is skipped and reported the same way.

The agent writes as root, so the state dir must be a real directory (not a symlink) owned by the
agent and not writable by group or others, and the file a regular file of ours with one link,
opened without following symlinks; anything else is refused (IncidentLogError), never written.
After a crash, :meth:`IncidentLog.open_incidents` finds incidents left at ``detected`` and
:meth:`IncidentLog.close_interrupted` closes them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

FILENAME = "incidents.jsonl"


class IncidentLogError(Exception):
    pass


@dataclass
class Incident:
    cgroup: str
    action: str
    reasons: list[dict[str, Any]]
    tasks_at_detection: int
    detector: str  # the rule: pinned, fill-hold, trajectory, lineage
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    evidence: str = ""  # what decided: budget, trajectory or lineage
    budget: int | None = None  # the task budget the verdict measured against
    budget_source: str = ""  # v2:<cgroup>, v1:<pids cgroup> or default
    tenant: str = ""  # whose kill budget the action spent
    time: float = field(default_factory=time.time)
    peak_tasks: int | None = None
    detect_ms: float | None = None
    remove_ms: float | None = None
    survivors: int | None = None
    result: str = "detected"
    dry_run: bool = False
    origin: dict[str, Any] | None = None
    family: int | None = None
    depth: int | None = None
    workload: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["time_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        return d


@dataclass
class ReadResult:
    incidents: list[dict[str, Any]]
    torn_lines: list[int]  # 1-based line numbers that could not be parsed or have the wrong shape


# -- the shape of a record ---------------------------------------------------------------------
# The log is data from a file, not a trusted structure: each line is checked for the fields a
# reader uses, with their types, before it is folded in. A line that fails is skipped like a
# torn one, so one bad line costs that line only, never the command.
MAX_DEPTH = 32  # the agent writes 4 levels; anything near the recursion limit is not a record


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, float) and math.isfinite(v)) or _is_int(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_reasons(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(r, dict) and all(r.get(k) is None or isinstance(r[k], str) for k in ("rule", "detail")) for r in v
    )


def _is_notes(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(n, str) for n in v)


_REQUIRED: dict[str, Callable[[Any], bool]] = {
    "id": lambda v: isinstance(v, str) and 0 < len(v) <= 256,
    "time": _is_num,
    "cgroup": _is_str,
    "action": _is_str,
    "result": _is_str,
}
_OPTIONAL: dict[str, Callable[[Any], bool]] = {
    "detector": _is_str,
    "time_iso": _is_str,
    "tasks_at_detection": _is_int,
    "peak_tasks": _is_int,
    "survivors": _is_int,
    "family": _is_int,
    "depth": _is_int,
    "detect_ms": _is_num,
    "remove_ms": _is_num,
    "dry_run": lambda v: isinstance(v, bool),
    "origin": lambda v: isinstance(v, dict),
    "workload": lambda v: isinstance(v, dict),
    "reasons": _is_reasons,
    "notes": _is_notes,
}


def _shallow_enough(obj: Any, limit: int = MAX_DEPTH) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return False
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return True


def check_record(rec: Any) -> str | None:
    """Why ``rec`` is not an incident record, or None if it is one."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for key, ok in _REQUIRED.items():
        if key not in rec or not ok(rec[key]):
            return f"{key}: missing or of the wrong type"
    for key, ok in _OPTIONAL.items():
        if rec.get(key) is not None and not ok(rec[key]):
            return f"{key}: of the wrong type"
    if not _shallow_enough(rec):
        return f"nested deeper than {MAX_DEPTH} levels"
    return None


def _parse(lines: Iterable[bytes]) -> ReadResult:
    by_id: dict[str, dict[str, Any]] = {}
    torn: list[int] = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            torn.append(n)
            continue
        if check_record(rec) is not None:
            torn.append(n)
            continue
        prev = by_id.get(rec["id"])
        by_id[rec["id"]] = {**prev, **rec} if prev else rec
    incidents = sorted(by_id.values(), key=lambda r: r["time"])
    return ReadResult(incidents, torn)


# -- the state dir and the file, as root --------------------------------------------------------
# The agent runs as root and the state dir is a path from the config, so it is handled as root
# handles paths someone else may have prepared: the directory is opened once without following
# a symlink and must be ours and closed to others; the file is opened relative to that
# directory, again without following a symlink, and must be a regular file of ours with one link.
def _make_parents(path: str) -> None:
    missing = []
    p = os.path.dirname(path)
    while p and p != "/" and not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        try:
            # 0755: the usual mode for a directory like /var/lib; only the state dir is private.
            os.mkdir(d, 0o755)
        except FileExistsError:
            pass


def open_state_dir(state_dir: str) -> int:
    """A directory fd of the checked state dir (created 0700 if missing, parents 0755).

    IncidentLogError if it is a symlink, not a directory, not owned by our euid, or writable by
    group or others (anyone who can write there can plant links for root to write through)."""
    path = state_dir.rstrip("/") or "/"  # a trailing slash makes the kernel follow a symlink
    created = False
    try:
        _make_parents(path)
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            pass
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise IncidentLogError(f"state dir {state_dir}: is a symlink; refusing it (give the real directory)") from None
        if e.errno == errno.ENOTDIR and os.path.lexists(path):
            raise IncidentLogError(f"state dir {state_dir}: not a directory") from None
        raise IncidentLogError(f"state dir {state_dir}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        euid = os.geteuid()
        if st.st_uid != euid:
            raise IncidentLogError(
                f"state dir {state_dir}: owned by uid {st.st_uid}, not by the agent (uid {euid}); refusing it"
            )
        if created:
            os.fchmod(fd, 0o700)  # exactly, whatever the umask
        elif st.st_mode & 0o022:
            raise IncidentLogError(
                f"state dir {state_dir}: mode {stat.S_IMODE(st.st_mode):04o} is writable by group or others; "
                "make it 0700 (chmod go-w)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_log_file(dir_fd: int, path: str, flags: int) -> int:
    try:
        # O_NONBLOCK: a FIFO planted in place of the log must not hang the agent in open().
        fd = os.open(FILENAME, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o640, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IncidentLogError(f"{path}: is a symlink; not following it") from None
        raise IncidentLogError(f"{path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IncidentLogError(f"{path}: not a regular file; refusing it")
        if flags & (os.O_WRONLY | os.O_RDWR):
            euid = os.geteuid()
            if st.st_uid != euid:
                raise IncidentLogError(f"{path}: owned by uid {st.st_uid}, not by the agent (uid {euid}); refusing it")
            if st.st_nlink != 1:
                # A hard link to a file elsewhere (made while the dir was open to others) would
                # send our writes into that file.
                raise IncidentLogError(f"{path}: has {st.st_nlink} hard links; refusing to write through a link")
            if st.st_mode & 0o022:
                os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o022)  # ours: others must not forge records
    except BaseException:
        os.close(fd)
        raise
    return fd


class IncidentLog:
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILENAME)
        self._lock = threading.Lock()
        self._dir_fd: int | None = None

    def _dir(self) -> int:
        if self._dir_fd is None:
            self._dir_fd = open_state_dir(self.state_dir)
        return self._dir_fd

    def open(self) -> None:
        """Check (or create) the state dir and make sure the file ends with a newline (mend a torn tail)."""
        with self._lock:
            fd = _open_log_file(self._dir(), self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
            try:
                size = os.fstat(fd).st_size
                if size:
                    last = os.pread(fd, 1, size - 1)
                    if last != b"\n":
                        # A crash tore the last record; terminate it so new records stay parseable.
                        _write_all(fd, b"\n")
                        os.fsync(fd)
            except OSError as e:
                raise IncidentLogError(f"{self.path}: {e.strerror}") from None
            finally:
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None

    def read(self) -> ReadResult:
        """The log as the agent sees it, through the checked directory."""
        with self._lock:
            fd = _open_log_file(self._dir(), self.path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            try:
                return _parse(f)
            except OSError as e:
                raise IncidentLogError(f"{self.path}: {e.strerror}") from None

    def count(self) -> int:
        """Incidents in the log (earlier runs included)."""
        return len(self.read().incidents)

    def append(self, incident: Incident) -> None:
        self._append(incident.to_dict())

    def open_incidents(self) -> list[dict[str, Any]]:
        """Incidents whose last record is still ``detected``: the agent stopped between detection
        and outcome (killed mid-action, a crash). Oldest first."""
        return [r for r in self.read().incidents if r.get("result") == "detected"]

    def close_interrupted(self, record: dict[str, Any], note: str) -> dict[str, Any]:
        """Close an open incident after a restart: a final record, same id, result ``interrupted``."""
        why = check_record(record)
        if why is not None:
            raise ValueError(f"not an incident record: {why}")
        closed = {**record, "result": "interrupted", "notes": [*(record.get("notes") or []), note]}
        self._append(closed)
        return closed

    def _append(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, sort_keys=True, default=str) + "\n"
        with self._lock:
            fd = _open_log_file(self._dir(), self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
            try:
                _write_all(fd, line.encode())
                os.fsync(fd)
            except OSError as e:
                raise IncidentLogError(f"{self.path}: {e.strerror}") from None
            finally:
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read(path_or_dir: str) -> ReadResult:
    """Read a log (or the log in a directory) without writing anything; for the CLI and tests."""
    path = os.path.join(path_or_dir, FILENAME) if os.path.isdir(path_or_dir) else path_or_dir
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return ReadResult([], [])
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IncidentLogError(f"{path}: is a symlink; not following it") from None
        raise IncidentLogError(f"{path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IncidentLogError(f"{path}: not a regular file; refusing it")
        try:
            return _parse(f)
        except OSError as e:
            raise IncidentLogError(f"{path}: {e.strerror}") from None
