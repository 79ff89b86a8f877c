"""Cgroup path globs: '*' stays within one level, '**' spans levels ('X/**' is X and all below).

Shared by the configuration (watch, protect, aggregates, rules, allow) and the watcher, which
also needs to know whether a glob could match below a directory before it watches it.
"""

from __future__ import annotations

import fnmatch
import re

_GLOB_OK = re.compile(r"^[A-Za-z0-9_.:@*?\[\]!\-/\\=+,%]+$")


def check_glob(glob: str) -> str:
    g = glob.strip()
    if not g:
        raise ValueError("empty glob")
    if g.startswith("/"):
        raise ValueError(f"{glob!r}: must be relative to the cgroup2 root (no leading '/')")
    if ".." in g.split("/"):
        raise ValueError(f"{glob!r}: '..' is not allowed")
    if not _GLOB_OK.match(g):
        raise ValueError(f"{glob!r}: unexpected characters")
    for part in g.split("/"):
        if "**" in part and part != "**":
            raise ValueError(f"{glob!r}: '**' must be a whole path component")
    return g.strip("/")


def _glob_regex(glob: str) -> re.Pattern[str]:
    rx = ""
    parts = glob.strip("/").split("/")
    if parts == ["**"]:
        return re.compile(".*")
    for part in parts:
        if part == "**":
            # '**' spans zero or more whole levels: 'a/**' matches 'a' itself and all below it,
            # '**/x' matches 'x' at any depth.
            rx = f"{rx}(?:/.*)?" if rx else "(?:.*/)?"
            continue
        piece = fnmatch.translate(part)
        piece = piece[len("(?s:") : -len(")\\Z")] if piece.startswith("(?s:") else piece
        # fnmatch's '*' crosses '/'; here it stays within one level.
        piece = piece.replace(".*", "[^/]*")
        rx += ("/" if rx and not rx.endswith("/)?") else "") + piece
    return re.compile(rx)


_cache: dict[str, re.Pattern[str]] = {}


def glob_match(glob: str, path: str) -> bool:
    rx = _cache.get(glob)
    if rx is None:
        rx = _cache[glob] = _glob_regex(glob)
    return rx.fullmatch(path.strip("/")) is not None


def glob_static_prefix(glob: str) -> str:
    """The longest leading part of a glob without wildcards: where watching has to start."""
    out = []
    for part in glob.strip("/").split("/"):
        if any(c in part for c in "*?["):
            break
        out.append(part)
    return "/".join(out)


def glob_may_match_below(glob: str, path: str) -> bool:
    """Could a descendant of ``path`` (or path itself) match ``glob``? Prunes directory watches."""
    gparts = glob.strip("/").split("/")
    pparts = [p for p in path.strip("/").split("/") if p]
    for i, pp in enumerate(pparts):
        if i >= len(gparts):
            return False
        g = gparts[i]
        if g == "**":
            return True
        if not glob_match(g, pp):
            return False
    return True
