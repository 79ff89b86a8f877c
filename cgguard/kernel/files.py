"""Kernel edge: reading small cgroupfs files, with a bounded set kept open.

Re-reading a kept-open file with ``pread`` costs about a third of open+read+close, which matters
for the files sampled every 20 ms. But one open file per watched cgroup lets anyone who can
create cgroups push the agent into EMFILE, and an agent that cannot open files cannot remove the
next bomb. So at most ``max_open`` files stay open (least recently used ones are closed first),
everything else is opened per read, and EMFILE/ENFILE halves the budget and retries instead of
failing: the agent degrades to slower reads, never stops.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict

_RETRY = (errno.EMFILE, errno.ENFILE)


class FileCache:
    def __init__(self, max_open: int = 1024):
        self.max_open = max(0, max_open)
        self._open: OrderedDict[str, int] = OrderedDict()
        self.shrinks = 0  # times EMFILE/ENFILE forced the budget down

    def __len__(self) -> int:
        return len(self._open)

    def read(self, path: str, keep: bool = True) -> bytes:
        """The whole file. ``keep``: worth keeping open (sampled often). Raises OSError as
        open/read would (ENOENT, ENODEV when the cgroup vanished)."""
        fd = self._open.get(path)
        if fd is not None:
            self._open.move_to_end(path)
            try:
                return _pread_all(fd)
            except OSError as e:
                if e.errno not in (errno.ENODEV, errno.ENOENT, errno.EBADF):
                    raise
                self.forget(path)  # the cgroup went away under the open file
                raise
        fd = self._open_fd(path)
        try:
            data = _pread_all(fd)
        except BaseException:
            os.close(fd)
            raise
        if keep and self.max_open > 0:
            while len(self._open) >= self.max_open:
                _, old = self._open.popitem(last=False)
                os.close(old)
            self._open[path] = fd
        else:
            os.close(fd)
        return data

    def _open_fd(self, path: str) -> int:
        while True:
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                if e.errno not in _RETRY or not self._open:
                    raise
                # Out of descriptors: give some back and keep fewer from now on.
                self.shrinks += 1
                self.max_open = len(self._open) // 2
                while len(self._open) > self.max_open:
                    _, old = self._open.popitem(last=False)
                    os.close(old)

    def trim(self) -> None:
        """Close the least recently used files until at most ``max_open`` stay open."""
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            os.close(old)

    def forget(self, path: str) -> None:
        fd = self._open.pop(path, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def forget_under(self, directory: str) -> None:
        prefix = directory.rstrip("/") + "/"
        for p in [p for p in self._open if p.startswith(prefix)]:
            self.forget(p)

    def close(self) -> None:
        for p in list(self._open):
            self.forget(p)


def _pread_all(fd: int) -> bytes:
    chunks, off = [], 0
    while True:
        b = os.pread(fd, 65536, off)
        chunks.append(b)
        if len(b) < 65536:
            return b"".join(chunks)
        off += len(b)
