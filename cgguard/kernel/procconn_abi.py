"""The kernel's proc connector ABI (NETLINK_CONNECTOR, group CN_IDX_PROC): constants and layouts.

The kernel multicasts one 76-byte datagram per process event: nlmsghdr (16) + cn_msg (20) +
proc_event (40: what, cpu, timestamp_ns, then a 24-byte union). Readers decode it with one
precompiled ``struct.Struct`` at a fixed offset instead of pyroute2's per-message parser, which
tops out at about 15k events/s -- a quarter of what a C fork loop produces -- and then falls
behind without bound.

Shared by the socket set-up (:mod:`cgguard.kernel.procconn_socket`), the reader
(:mod:`cgguard.kernel.procconn`) and the harness's recordings (:mod:`cgguard.testkit.cnproc`).
"""

from __future__ import annotations

import socket
import struct

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_NONE = 0x0
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_UID = 0x4
PROC_EVENT_GID = 0x40
PROC_EVENT_SID = 0x80
PROC_EVENT_PTRACE = 0x100
PROC_EVENT_COMM = 0x200
PROC_EVENT_NONZERO_EXIT = 0x20000000
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000
PROC_EVENT_ALL = (
    PROC_EVENT_FORK
    | PROC_EVENT_EXEC
    | PROC_EVENT_UID
    | PROC_EVENT_GID
    | PROC_EVENT_SID
    | PROC_EVENT_PTRACE
    | PROC_EVENT_COMM
    | PROC_EVENT_NONZERO_EXIT
    | PROC_EVENT_COREDUMP
    | PROC_EVENT_EXIT
)
DEFAULT_EVENTS = PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_EXIT

EVENT_NAMES = {
    PROC_EVENT_NONE: "none",
    PROC_EVENT_FORK: "fork",
    PROC_EVENT_EXEC: "exec",
    PROC_EVENT_UID: "uid",
    PROC_EVENT_GID: "gid",
    PROC_EVENT_SID: "sid",
    PROC_EVENT_PTRACE: "ptrace",
    PROC_EVENT_COMM: "comm",
    PROC_EVENT_COREDUMP: "coredump",
    PROC_EVENT_EXIT: "exit",
}

MSG_SIZE = 76
# nlmsghdr: len, type, flags, seq, pid
_NLHDR = struct.Struct("=IHHII")
# cn_msg: idx, val, seq, ack, len, flags
_CNHDR = struct.Struct("=IIIIHH")
# From cn_msg.seq (offset 24) to the end of the proc_event union, skipping ack/len/flags:
# seq, what, cpu, timestamp_ns, six u32 of event data.
_EVENT = struct.Struct("=I8xIIQIIIIII")
_EVENT_OFFSET = 24
_ACK_FIELD = struct.Struct("=I")  # cn_msg.ack at offset 28
_ACK_OFFSET = 28

# Subscription modes (see :mod:`cgguard.kernel.procconn_socket`).
FILTER_EVENTS = "event-filter"
FILTER_LEGACY = "legacy-all"


class ProcConnectorUnavailable(OSError):
    """The proc connector cannot be used here (not the initial net/pid namespace, no
    CAP_NET_ADMIN, no connector in the kernel). The agent should fall back to sampling."""


def control_message(payload: bytes, ack: int, portid: int) -> bytes:
    """A control message (subscribe, unsubscribe) from netlink port ``portid`` to the connector."""
    cn = _CNHDR.pack(CN_IDX_PROC, CN_VAL_PROC, 0, ack, len(payload), 0)
    return _NLHDR.pack(16 + len(cn) + len(payload), NLMSG_DONE, 0, 0, portid) + cn + payload
