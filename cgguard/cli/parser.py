"""The ``cgguard`` argument parser: every command and flag, and bad input as :class:`UsageError`."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from cgguard import __version__

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        sub = self.prog.removeprefix("cgguard").strip()
        raise UsageError(f"{sub}: {message}" if sub else message)


def at_least_one(v: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v!r}: must be 1 or more")
    return n


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML or TOML config file (default: $CGGUARD_CONFIG or /etc/cgguard/config.yaml)")
    p.add_argument("--watch", "-w", action="append", metavar="GLOB", help="cgroups to guard, relative to the cgroup2 root (repeatable)")
    p.add_argument("--protect", action="append", metavar="GLOB", help="cgroups never acted on (repeatable)")
    p.add_argument("--cgroup-root", metavar="PATH", help="cgroup2 mount point (found from /proc/self/mountinfo by default)")
    p.add_argument("--state-dir", metavar="DIR", help="where incidents.jsonl is kept (default /var/lib/cgguard)")
    p.add_argument("--listen", metavar="HOST:PORT", help="health and metrics endpoint (default 127.0.0.1:9750; '' disables)")
    p.add_argument("--control-socket", metavar="PATH", help="root-only control socket (default /run/cgguard/control.sock)")
    p.add_argument("--dry-run", action="store_true", default=None, help="detect and record, never act")
    p.add_argument("--action", choices=["auto", "kill-cgroup", "kill-lineage", "freeze", "report"], help="default action")
    p.add_argument("--no-lineage", action="store_true", help="do not track lineage (sampling only)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def config_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """The config settings ``cgguard run``'s flags override (None: not given, the file decides)."""
    o: dict[str, Any] = {
        "watch": a.watch,
        "protect": a.protect,
        "cgroup_root": a.cgroup_root,
        "state_dir": a.state_dir,
        "listen": a.listen,
        "control_socket": a.control_socket,
        "dry_run": a.dry_run,
        "action": a.action,
        "log_level": a.log_level,
    }
    if getattr(a, "no_lineage", False):
        o["tracking.connector"] = False
    return o


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cgguard", description="Find fork bombs in cgroup-v2 subtrees and remove them atomically.")
    p.add_argument("--version", action="version", version=f"cgguard {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    r = sub.add_parser("run", help="run the agent")
    _add_config_flags(r)

    s = sub.add_parser("status", help="what the running agent watches")
    s.add_argument("--json", action="store_true")
    s.add_argument("--control-socket", metavar="PATH")
    s.add_argument("--config", "-c", metavar="FILE")

    t = sub.add_parser("tree", help="lineage forest of a cgroup")
    t.add_argument("cgroup", nargs="?", default="", help="path relative to the cgroup2 root (default: all)")
    t.add_argument("--json", action="store_true")
    t.add_argument("--control-socket", metavar="PATH")
    t.add_argument("--config", "-c", metavar="FILE")

    i = sub.add_parser("incidents", help="list recorded incidents")
    i.add_argument("--json", action="store_true", help="one JSON object per line")
    i.add_argument("--state-dir", metavar="DIR")
    i.add_argument("--config", "-c", metavar="FILE")
    i.add_argument("--last", type=at_least_one, metavar="N", help="only the last N (N >= 1)")

    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file")

    ctl = sub.add_parser("ctl", help="change knobs of the running agent")
    ctl.add_argument("--control-socket", metavar="PATH")
    ctl.add_argument("--config", "-c", metavar="FILE")
    ctl_sub = ctl.add_subparsers(dest="knob", metavar="KNOB", parser_class=_Parser)
    ctl_sub.required = True
    tr = ctl_sub.add_parser("tracking", help="enable or disable lineage tracking")
    tr.add_argument("value", choices=["enable", "disable"])
    ri = ctl_sub.add_parser("reset-interval", help="lineage aging interval in ms")
    ri.add_argument("value", metavar="MS")

    d = sub.add_parser("demo", help="start a contained bomb in a throwaway cgroup and watch cgguard remove it")
    d.add_argument("--cgroup-root", metavar="PATH")
    d.add_argument("--keep-state", action="store_true", help="keep the demo's state dir")

    # The bench's flags are defined once, by the bench (cgguard/bench/__main__.py), which is
    # imported only when the command runs: the agent's command line never loads the harness.
    b = sub.add_parser("bench", help="benchmark detection, removal and cost against baselines (cgguard bench --help)",
                       add_help=False, prefix_chars="\0")
    b.add_argument("args", nargs=argparse.REMAINDER)

    sub.add_parser("config-reference", help="print the configuration reference (markdown)")
    return p
