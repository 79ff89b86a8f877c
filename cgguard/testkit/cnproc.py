"""Recorded proc-connector streams, for tests and the benchmark (not used by the agent).

A recording is what :class:`cgguard.kernel.procconn.ProcConnector` decoded, kept as datagrams in
the kernel's layout so that a replay goes through the same decoding as a live read. Make one by
reading a connector into a :class:`RecordingSink`; replay it into any ``EventSink``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from cgguard.kernel.procconn import EventSink, deliver
from cgguard.kernel.procconn_abi import (
    _CNHDR,
    _EVENT,
    _EVENT_OFFSET,
    _NLHDR,
    CN_IDX_PROC,
    CN_VAL_PROC,
    MSG_SIZE,
    NLMSG_DONE,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
)

# File format: a magic line, one JSON metadata line, then entries of (kind u8, length u16,
# payload). Kind 1 is a raw datagram exactly as the kernel sent it; kind 2 is a loss report
# whose payload is the reason. Raw bytes keep recordings independent of this decoder.
_MAGIC = b"CGGUARD-CNPROC 1\n"
_ENTRY = struct.Struct("=BH")
_KIND_DATAGRAM = 1
_KIND_LOSS = 2


def _write_header(f: BinaryIO, meta: dict) -> None:
    f.write(_MAGIC)
    f.write(json.dumps(meta, sort_keys=True).encode() + b"\n")


def _write_datagram(f: BinaryIO, buf: bytearray, n: int) -> None:
    f.write(_ENTRY.pack(_KIND_DATAGRAM, n))
    f.write(memoryview(buf)[:n])


def _write_loss(f: BinaryIO, reason: str) -> None:
    data = reason.encode()
    f.write(_ENTRY.pack(_KIND_LOSS, len(data)))
    f.write(data)


@dataclass
class Recording:
    meta: dict
    entries: list[tuple[int, bytes]] = field(default_factory=list)


def load_recording(path: str) -> Recording:
    with open(path, "rb") as f:
        if f.readline() != _MAGIC:
            raise ValueError(f"{path}: not a cgguard proc-connector recording")
        rec = Recording(json.loads(f.readline()))
        while True:
            head = f.read(_ENTRY.size)
            if len(head) < _ENTRY.size:
                break
            kind, n = _ENTRY.unpack(head)
            rec.entries.append((kind, f.read(n)))
    return rec


def iter_events(path: str) -> Iterator[tuple]:
    """Decoded entries of a recording: ("loss", reason) or (what, ts, a, b, c, d)."""
    for kind, data in load_recording(path).entries:
        if kind == _KIND_LOSS:
            yield ("loss", data.decode())
        elif len(data) >= MSG_SIZE:
            _seq, what, _cpu, ts, a, b, c, d, _e, _f = _EVENT.unpack_from(data, _EVENT_OFFSET)
            yield (what, ts, a, b, c, d)


def replay(path: str, sink: EventSink) -> int:
    """Feed a recording into ``sink`` as ProcConnector.read would; returns entries handled
    (events of every type and loss reports, as read() counts them)."""
    n = 0
    for kind, data in load_recording(path).entries:
        if kind == _KIND_LOSS:
            sink.on_loss(data.decode())
            n += 1
        elif len(data) >= MSG_SIZE:
            deliver(sink, _EVENT.unpack_from(data, _EVENT_OFFSET))
            n += 1
    return n


def keep_lineage(path: str, out: str, root_tgid: int, meta: dict | None = None) -> int:
    """Copy to ``out`` only the entries of ``path`` that belong to ``root_tgid`` and its
    descendants (and loss reports): a recording of one workload without the host's other
    processes. Returns the number of entries kept."""
    rec = load_recording(path)
    members = {root_tgid}
    kept: list[bytes | str] = []
    for kind, data in rec.entries:
        if kind == _KIND_LOSS:
            kept.append(data.decode())
            continue
        if len(data) < MSG_SIZE:
            continue
        _seq, what, _cpu, _ts, a, b, c, d, _e, _f = _EVENT.unpack_from(data, _EVENT_OFFSET)
        if what == PROC_EVENT_FORK and (b in members or d in members):
            members.add(d)
        elif what not in (PROC_EVENT_EXEC, PROC_EVENT_EXIT) or b not in members:
            continue
        kept.append(data)
    write_recording(out, kept, {**rec.meta, **(meta or {}), "root_tgid": root_tgid})
    return len(kept)


def encode_event(what: int, ts_ns: int, data: tuple[int, ...] = (), seq: int = 0, cpu: int = 0) -> bytes:
    """A datagram as the kernel would send it, for tests and synthetic recordings."""
    body = struct.pack("=IIQ", what, cpu, ts_ns) + struct.pack("=6I", *(tuple(data) + (0,) * (6 - len(data))))
    cn = _CNHDR.pack(CN_IDX_PROC, CN_VAL_PROC, seq, 0, len(body), 0)
    return _NLHDR.pack(16 + len(cn) + len(body), NLMSG_DONE, 0, 0, 0) + cn + body


def write_recording(path: str, datagrams: list[bytes | str], meta: dict | None = None) -> None:
    """Write a recording from datagrams (bytes) and loss reasons (str)."""
    with open(path, "wb") as f:
        _write_header(f, meta or {})
        for d in datagrams:
            if isinstance(d, str):
                _write_loss(f, d)
            else:
                _write_datagram(f, bytearray(d), len(d))




class RecordingSink:
    """An EventSink that writes every event it gets to ``f`` (and passes it on to ``inner``)."""

    def __init__(self, f: BinaryIO, meta: dict | None = None, inner: EventSink | None = None):
        self.f, self.inner = f, inner
        _write_header(f, meta or {})

    def _put(self, what: int, ts_ns: int, data: tuple[int, ...]) -> None:
        d = encode_event(what, ts_ns, data)
        _write_datagram(self.f, bytearray(d), len(d))

    def on_fork(self, ts_ns: int, parent_pid: int, parent_tgid: int, child_pid: int, child_tgid: int) -> None:
        self._put(PROC_EVENT_FORK, ts_ns, (parent_pid, parent_tgid, child_pid, child_tgid))
        if self.inner is not None:
            self.inner.on_fork(ts_ns, parent_pid, parent_tgid, child_pid, child_tgid)

    def on_exec(self, ts_ns: int, pid: int, tgid: int) -> None:
        self._put(PROC_EVENT_EXEC, ts_ns, (pid, tgid))
        if self.inner is not None:
            self.inner.on_exec(ts_ns, pid, tgid)

    def on_exit(self, ts_ns: int, pid: int, tgid: int, exit_code: int, exit_signal: int) -> None:
        self._put(PROC_EVENT_EXIT, ts_ns, (pid, tgid, exit_code, exit_signal))
        if self.inner is not None:
            self.inner.on_exit(ts_ns, pid, tgid, exit_code, exit_signal)

    def on_loss(self, reason: str) -> None:
        _write_loss(self.f, reason)
        if self.inner is not None:
            self.inner.on_loss(reason)
