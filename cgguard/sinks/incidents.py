"""Sink: the durable incident log, ``<state-dir>/incidents.jsonl``.

One JSON object per line, appended and fsynced twice per incident: at detection (``result:
"detected"``, so a crash mid-kill still leaves a trace) and again with the outcome, under the same
``id``. Readers fold the lines by id, last line wins. A torn last line (crash during a write) is
skipped and reported, never fatal, and the next append starts on a fresh line so it loses nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

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
    torn_lines: list[int]  # 1-based line numbers that could not be parsed


class IncidentLog:
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILENAME)
        self._lock = threading.Lock()

    def open(self) -> None:
        """Create the state dir and make sure the file ends with a newline (mend a torn tail)."""
        try:
            os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        except OSError as e:
            raise IncidentLogError(f"state dir {self.state_dir}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size:
                last = os.pread(fd, 1, size - 1)
                if last != b"\n":
                    # A crash tore the last record; terminate it so new records stay parseable.
                    os.write(fd, b"\n")
                    os.fsync(fd)
        finally:
            os.close(fd)

    def open_incidents(self) -> list[dict[str, Any]]:
        """Incidents whose last record is still "detected": the agent stopped mid-action."""
        return [i for i in read(self.path).incidents if i.get("result") == "detected"]

    def close_interrupted(self, record: dict[str, Any], note: str) -> dict[str, Any]:
        """Close an open incident with result "interrupted" (same id), and say why."""
        out = {**record, "result": "interrupted", "notes": [*(record.get("notes") or []), note]}
        line = json.dumps(out, sort_keys=True, default=str) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return out

    def count(self) -> int:
        """Incidents in the log (earlier runs included)."""
        return len(read(self.path).incidents)

    def append(self, incident: Incident) -> None:
        line = json.dumps(incident.to_dict(), sort_keys=True, default=str) + "\n"
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            except OSError as e:
                raise IncidentLogError(f"{self.path}: {e.strerror}") from None
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            yield n, raw


def read(path_or_dir: str) -> ReadResult:
    path = os.path.join(path_or_dir, FILENAME) if os.path.isdir(path_or_dir) else path_or_dir
    by_id: dict[str, dict[str, Any]] = {}
    torn: list[int] = []
    try:
        for n, raw in _lines(path):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict) or "id" not in rec:
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                torn.append(n)
                continue
            prev = by_id.get(rec["id"])
            by_id[rec["id"]] = {**prev, **rec} if prev else rec
    except FileNotFoundError:
        return ReadResult([], [])
    except OSError as e:
        raise IncidentLogError(f"{path}: {e.strerror}") from None
    incidents = sorted(by_id.values(), key=lambda r: r.get("time", 0))
    return ReadResult(incidents, torn)
