"""Proc connector ingestion: decoding, subscription modes, loss, recordings, throughput."""

from __future__ import annotations

import os
import time

import pytest

from cgguard.kernel.procconn import ProcConnector
from cgguard.kernel.procconn_abi import (
    MSG_SIZE,
    PROC_EVENT_COMM,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
)
from cgguard.testkit.cnproc import encode_event, iter_events, keep_lineage, replay, write_recording
from connector import ListSink

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def drain(conn: ProcConnector, sink, until=lambda: False, timeout=3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.wait(0.02)
        conn.read(sink, 1 << 16)
        if until():
            return


# -- offline: decoding and recordings ----------------------------------------------------------
def test_encoded_datagrams_decode_at_fixed_offsets(tmp_path):
    datagrams = [
        encode_event(PROC_EVENT_FORK, 1_000, (10, 10, 11, 11)),
        encode_event(PROC_EVENT_EXEC, 2_000, (11, 11)),
        encode_event(PROC_EVENT_COMM, 2_500, (11, 11)),  # not subscribed by the sink: ignored
        "enobufs",
        encode_event(PROC_EVENT_FORK, 2_800, (10, 10, 12, 11)),  # a thread of 11
        encode_event(PROC_EVENT_EXIT, 3_000, (11, 11, 256, 17, 10, 10)),
    ]
    assert all(len(d) == MSG_SIZE for d in datagrams if isinstance(d, bytes))
    path = str(tmp_path / "s.cnproc")
    write_recording(path, datagrams, {"what": "unit"})
    sink = ListSink()
    assert replay(path, sink) == 6  # every entry, as read() counts them
    assert sink.events == [
        ("fork", 1_000, 10, 10, 11, 11),
        ("exec", 2_000, 11, 11),
        ("fork", 2_800, 10, 10, 12, 11),
        ("exit", 3_000, 11, 11, 256, 17),
    ]
    assert sink.losses == ["enobufs"]
    kinds = [e[0] for e in iter_events(path)]
    assert kinds == [PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_COMM, "loss", PROC_EVENT_FORK, PROC_EVENT_EXIT]


def test_keep_lineage_drops_other_processes(tmp_path):
    src, dst = str(tmp_path / "all.cnproc"), str(tmp_path / "one.cnproc")
    write_recording(
        src,
        [
            encode_event(PROC_EVENT_EXEC, 1, (50, 50)),
            encode_event(PROC_EVENT_FORK, 2, (50, 50, 51, 51)),
            encode_event(PROC_EVENT_FORK, 3, (7, 7, 8, 8)),  # someone else
            encode_event(PROC_EVENT_FORK, 4, (51, 51, 52, 52)),
            encode_event(PROC_EVENT_EXIT, 5, (8, 8, 0, 17)),
            encode_event(PROC_EVENT_EXIT, 6, (51, 51, 0, 17)),
        ],
    )
    assert keep_lineage(src, dst, 50) == 4
    assert [(e[0], e[1]) for e in iter_events(dst)] == [
        (PROC_EVENT_EXEC, 1),
        (PROC_EVENT_FORK, 2),
        (PROC_EVENT_FORK, 4),
        (PROC_EVENT_EXIT, 6),
    ]


def test_recorded_bomb_stream_is_well_formed():
    path = os.path.join(DATA, "bash-bomb.cnproc")
    evs = [e for e in iter_events(path) if e[0] != "loss"]
    forks = [e for e in evs if e[0] == PROC_EVENT_FORK]
    assert evs[0][0] == PROC_EVENT_EXEC, "starts with the exec of the bomb's bash"
    assert len(forks) > 200
    assert all(e[4] == e[5] for e in forks), "a bash bomb forks processes, not threads"


@pytest.fixture(scope="module")
def fork_loop(tmp_path_factory):
    from cgguard.bench.ingest import compile_fork_loop

    if not __import__("shutil").which("gcc"):
        pytest.skip("no gcc")
    return compile_fork_loop(str(tmp_path_factory.mktemp("forkloop")))
