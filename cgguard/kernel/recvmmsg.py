"""recvmmsg(2) through ctypes: many datagrams into fixed-size slots with one syscall.

The standard library has no recvmmsg. The proc connector reader (:mod:`cgguard.kernel.procconn`)
uses this to fill a batch of slots per wake-up; see there for what it saves.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)


def recvmmsg_fill(fd: int, slots: bytearray, slot_size: int, nslots: int) -> tuple[Callable[[int], int], memoryview] | None:
    """A fill function that receives up to ``vlen`` datagrams from ``fd`` into the
    ``slot_size``-byte slots of ``slots`` with one recvmmsg(2), and its view of the kernel's
    per-datagram lengths (msg_len). The fill returns how many datagrams it received, 0 when the
    queue is empty, or -1 for ENOBUFS. None if libc or the kernel has no recvmmsg."""
    try:
        import ctypes
    except ImportError:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    c_void_p, c_size_t = ctypes.c_void_p, ctypes.c_size_t

    class iovec(ctypes.Structure):
        _fields_ = [("iov_base", c_void_p), ("iov_len", c_size_t)]

    class msghdr(ctypes.Structure):
        _fields_ = [
            ("msg_name", c_void_p),
            ("msg_namelen", ctypes.c_uint32),
            ("msg_iov", c_void_p),
            ("msg_iovlen", c_size_t),
            ("msg_control", c_void_p),
            ("msg_controllen", c_size_t),
            ("msg_flags", ctypes.c_int),
        ]

    class mmsghdr(ctypes.Structure):
        _fields_ = [("msg_hdr", msghdr), ("msg_len", ctypes.c_uint)]

    if ctypes.sizeof(mmsghdr) % 4 or mmsghdr.msg_len.offset % 4:
        return None
    data = (ctypes.c_char * len(slots)).from_buffer(slots)
    base = ctypes.addressof(data)
    iovs = (iovec * nslots)()
    hdr_bytes = bytearray(ctypes.sizeof(mmsghdr) * nslots)
    hdrs = (mmsghdr * nslots).from_buffer(hdr_bytes)
    for i in range(nslots):
        iovs[i].iov_base = base + i * slot_size
        iovs[i].iov_len = slot_size
        hdrs[i].msg_hdr.msg_iov = ctypes.addressof(iovs[i])
        hdrs[i].msg_hdr.msg_iovlen = 1
    words = ctypes.sizeof(mmsghdr) // 4
    lens = memoryview(hdr_bytes).cast("I")[mmsghdr.msg_len.offset // 4 :: words]
    # vlen 0 receives nothing but tells whether the syscall exists (old kernel, seccomp).
    if recvmmsg(fd, hdrs, 0, MSG_DONTWAIT, None) != 0:
        return None
    get_errno = ctypes.get_errno
    EAGAIN, ENOBUFS, EINTR = errno.EAGAIN, errno.ENOBUFS, errno.EINTR

    def fill(vlen: int, _keep=(data, iovs)) -> int:
        # No argtypes: ctypes' default conversion (int -> C int, array -> pointer, None ->
        # NULL) is about 0.45 us cheaper per call than argtypes converters. The kernel writes
        # into ``data`` through the iovecs: ``_keep`` holds both for as long as ``fill`` lives.
        while True:
            n = recvmmsg(fd, hdrs, vlen, MSG_DONTWAIT, None)
            if n >= 0:
                return n
            err = get_errno()
            if err == EAGAIN:
                return 0
            if err == ENOBUFS:
                return -1
            if err != EINTR:
                raise OSError(err, os.strerror(err))

    return fill, lens
