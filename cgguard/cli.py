"""Command line: ``cgguard run|status|tree|incidents|check-config|ctl|demo|bench``.

Bad input of any kind ends in one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from typing import Any, NoReturn

from cgguard import __version__

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        sub = self.prog.removeprefix("cgguard").strip()
        raise UsageError(f"{sub}: {message}" if sub else message)


def _at_least_one(v: str) -> int:
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


def _overrides(a: argparse.Namespace) -> dict[str, Any]:
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
    i.add_argument("--last", type=_at_least_one, metavar="N", help="only the last N (N >= 1)")

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

    b = sub.add_parser("bench", help="benchmark detection, removal and cost against baselines")
    b.add_argument("--quick", action="store_true", help="fewer runs, for CI")
    b.add_argument("--out", metavar="DIR", default="results", help="results folder (default ./results)")
    b.add_argument("--only", action="append", metavar="NAME", help="run only these workloads")
    b.add_argument("--cost", action="store_true", help="only the agent-cost scenarios: fork loads, busy node, 10,000 cgroups, scrape load")

    sub.add_parser("config-reference", help="print the configuration reference (markdown)")
    return p


# -- helpers -----------------------------------------------------------------------------------
def _load_config(path: str | None, overrides: dict[str, Any] | None = None):
    from cgguard import configfile

    path = path or configfile.default_config_path()
    return configfile.load(path, overrides)


def _control_path(a: argparse.Namespace) -> str:
    if getattr(a, "control_socket", None):
        return a.control_socket
    try:
        return _load_config(getattr(a, "config", None)).control_socket
    except Exception:
        from cgguard.config import Config

        return Config().control_socket


def request(path: str, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except FileNotFoundError:
        raise UsageError(f"no agent listening on {path} (is 'cgguard run' running?)") from None
    except ConnectionRefusedError:
        raise UsageError(f"no agent listening on {path} (stale socket; is 'cgguard run' running?)") from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied (the control socket is root-only)") from None
    with s:
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\n"):
                break
    try:
        reply = json.loads(data)
    except ValueError:
        raise UsageError(f"{path}: the agent sent an unreadable reply") from None
    if not reply.get("ok"):
        raise UsageError(str(reply.get("error", "request failed")))
    return reply


def _resolve_root(cgroup_root: str | None):
    from cgguard.kernel.cgroupfs import CgroupFS, NoCgroup2, find_cgroup2_root

    if cgroup_root:
        if not os.path.isfile(os.path.join(cgroup_root, "cgroup.procs")):
            raise UsageError(f"--cgroup-root {cgroup_root}: not a cgroup2 mount (no cgroup.procs)")
        if not os.path.isfile(os.path.join(cgroup_root, "cgroup.subtree_control")):
            raise UsageError(f"--cgroup-root {cgroup_root}: this is a cgroup v1 hierarchy; cgguard needs cgroup2")
        fs = CgroupFS(cgroup_root)
    else:
        try:
            fs = CgroupFS(find_cgroup2_root())
        except NoCgroup2 as e:
            raise UsageError(str(e)) from None
    if not fs.supports_kill():
        raise UsageError(
            f"kernel {os.uname().release} has no cgroup.kill (needs Linux 5.14 or newer); cgguard cannot remove bombs atomically"
        )
    return fs


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- commands ----------------------------------------------------------------------------------
def cmd_run(a: argparse.Namespace) -> int:
    from cgguard.agent import Agent
    from cgguard.agent.control import ControlError
    from cgguard.sinks import build_sinks
    from cgguard.sinks.incidents import IncidentLogError
    from cgguard.state.status import StatusBoard

    cfg = _load_config(a.config, _overrides(a))
    if not cfg.watch:
        raise UsageError("nothing to watch: give --watch GLOB or 'watch:' in the config")
    _setup_logging(cfg.log_level)
    fs = _resolve_root(cfg.cgroup_root)
    board = StatusBoard()
    metrics = _metrics(board) if cfg.listen else None
    extra = build_sinks(cfg)
    agent = Agent(cfg, fs, sinks=[*([metrics] if metrics else []), *extra], board=board)
    server = None
    try:
        # The port first: a second agent started by mistake fails here, before it touches the
        # running agent's control socket or state.
        if cfg.listen:
            server = start_http(cfg.listen, lambda: agent.ready, metrics)
        try:
            agent.setup()
        except (IncidentLogError, ControlError) as e:
            raise UsageError(str(e)) from None
        signal.signal(signal.SIGTERM, lambda *_: agent.stop())
        signal.signal(signal.SIGINT, lambda *_: agent.stop())
        agent.run()
    finally:
        agent.close()
        close_sinks(extra)
        if server is not None:
            server.close()
    return 0


def close_sinks(sinks: list) -> None:
    """Close the journal, hook and webhook sinks side by side: each may wait up to its own bound
    for deliveries in flight, and shutdown must not add those waits up."""
    import threading

    threads = [threading.Thread(target=s.close, daemon=True) for s in sinks]
    for th in threads:
        th.start()
    for th in threads:
        th.join(5)


def _metrics(board):
    try:
        from cgguard.sinks.metrics import Metrics
    except ImportError:
        return None
    return Metrics(board)


def start_http(listen: str, ready, metrics):
    from cgguard.config import parse_listen
    from cgguard.sinks.http import serve

    try:
        return serve(listen, ready, metrics)
    except OSError as e:
        host, port = parse_listen(listen)
        raise UsageError(f"--listen {listen}: cannot listen on {host}:{port}: {e.strerror}") from None


def cmd_status(a: argparse.Namespace) -> int:
    from cgguard.state.status import Status

    raw = request(_control_path(a), {"cmd": "status"})["status"]
    if a.json:
        print(json.dumps(raw, indent=2, default=str))
        return 0
    st = Status.from_dict(raw)
    pc, tr = st.connector, st.tracking
    print(f"cgroup2 root: {st.cgroup_root}   ready: {st.ready}   dry run: {st.dry_run}")
    print(f"watch: {', '.join(st.watch)}   protect: {', '.join(st.protect) or '-'}")
    print(
        f"proc connector: {pc.mode}  received {pc.received}  overflows {pc.overflows}  rescans {pc.rescans}   "
        f"lineage records: {tr.records} (live {tr.live}, placeholders {tr.placeholders})"
    )
    print(f"incidents: {st.incidents.since_start} since start, {st.incidents.recorded} recorded   log: {st.incidents.log}")
    for note in st.notes:
        print(f"note: {note}")
    rows = [("CGROUP", "TASKS", "MAX", "STATE", "SOURCE", "WORKLOAD")]
    for c in st.cgroups:
        wl = c.workload or {}
        rows.append(
            (c.path, str(c.tasks), "-" if c.pids_max is None else str(c.pids_max), c.state, c.source, wl.get("summary") or wl.get("kind") or "")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
    return 0


def _print_tree(nodes: list[dict[str, Any]], indent: int = 0) -> None:
    for n in nodes:
        mark = "" if n.get("alive", True) else " [placeholder]"
        cmd = n.get("cmdline") or n.get("comm") or "?"
        print(
            f"{'  ' * indent}{n.get('pid')} {cmd[:80]}{mark}  family={n.get('family')} depth={n.get('depth')} "
            f"score={n.get('score')} threads={n.get('threads')}"
        )
        _print_tree(n.get("children", []), indent + 1)


def cmd_tree(a: argparse.Namespace) -> int:
    tree = request(_control_path(a), {"cmd": "tree", "cgroup": a.cgroup.strip("/")})["tree"]
    if a.json:
        print(json.dumps(tree, indent=2, default=str))
    else:
        forest = tree.get("forest", tree) if isinstance(tree, dict) else tree
        if not forest:
            print(f"no tracked processes in {a.cgroup or 'the watched cgroups'}")
        _print_tree(forest if isinstance(forest, list) else [forest])
    return 0


def cmd_incidents(a: argparse.Namespace) -> int:
    from cgguard.sinks import incidents

    state_dir = a.state_dir
    if not state_dir:
        try:
            state_dir = _load_config(a.config).state_dir
        except Exception:
            state_dir = "/var/lib/cgguard"
    if not os.path.exists(state_dir):
        raise UsageError(f"--state-dir {state_dir}: no such directory")
    try:
        rr = incidents.read(state_dir)
    except incidents.IncidentLogError as e:
        raise UsageError(str(e)) from None
    if rr.torn_lines:
        more = f" and {len(rr.torn_lines) - 5} more" if len(rr.torn_lines) > 5 else ""
        print(
            f"cgguard: warning: skipped {len(rr.torn_lines)} unreadable line(s) in the incident log "
            f"(line {', '.join(map(str, rr.torn_lines[:5]))}{more}; a crash during a write tears the last one, "
            "other lines are not incident records)",
            file=sys.stderr,
        )
    items = rr.incidents[-a.last :] if a.last else rr.incidents
    if a.json:
        for it in items:
            print(json.dumps(it, sort_keys=True))
        return 0
    if not items:
        print("no incidents")
        return 0
    # The reader checked each record's shape; the text is still the tenants' (cgroup names,
    # command lines), so nothing reaches the terminal unescaped.
    for it in items:
        origin = it.get("origin") or {}
        o = ""
        if origin:
            cmd = origin.get("cmdline") or origin.get("comm")
            o = f" origin {_text(origin.get('pid'))} {_text(cmd)}{'' if origin.get('alive') else ' (dead)'}"
        evidence = f" ({_text(it['evidence'])})" if it.get("evidence") else ""
        dry = " [dry run]" if it.get("dry_run") else ""
        print(
            f"{_text(it.get('time_iso', ''))} {_text(it['id'])} {_text(it['cgroup'])} {_text(it.get('detector'))}{evidence}"
            f" -> {_text(it['action'])}: {_text(it['result'])}{dry}"
            f" tasks {it.get('tasks_at_detection')} peak {it.get('peak_tasks')} detect {it.get('detect_ms')} ms"
            f" remove {it.get('remove_ms')} ms survivors {it.get('survivors')}{o}"
        )
        if it.get("budget") is not None or it.get("tenant"):
            print(f"    budget {it.get('budget')} ({_text(it.get('budget_source') or '?')}), tenant {_text(it.get('tenant') or '?')}")
        for r in it.get("reasons") or []:
            print(f"    {_text(r.get('rule'))}: {_text(r.get('detail'))}")
        for n in it.get("notes") or []:
            print(f"    note: {_text(n)}")
    return 0


def _text(v: Any, limit: int = 4096) -> str:
    """One printable line: control characters (escape sequences, newlines) shown escaped."""
    s = v if isinstance(v, str) else str(v) if v is None or isinstance(v, (int, float)) else json.dumps(v, default=str)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s if len(s) <= limit else s[:limit] + "..."


def cmd_check_config(a: argparse.Namespace) -> int:
    cfg = _load_config(a.file)
    print(
        f"{a.file}: ok: watch {len(cfg.watch)} glob(s), protect {len(cfg.protect)}, action {cfg.action.value}"
        f"{', dry run' if cfg.dry_run else ''}"
    )
    # The allow-list in the order it is tried (first match wins), each regex exactly as parsed
    # (not repr'd), so an operator sees what YAML quoting turned it into.
    for rule in cfg.allow:
        what = " ".join(f"{k}~'{v}'" for k, v in (("exe", rule.exe), ("comm", rule.comm), ("cmdline", rule.cmdline)) if v is not None)
        print(_text(f"allow: {rule.mode} {what} in '{rule.match}'"))
    if not cfg.watch:
        print(f"{a.file}: note: no 'watch' globs; 'cgguard run' will need --watch", file=sys.stderr)
    return 0


def cmd_ctl(a: argparse.Namespace) -> int:
    path = _control_path(a)
    if a.knob == "tracking":
        r = request(path, {"cmd": "tracking", "value": a.value})
        print(f"tracking {r['tracking']}")
    else:
        try:
            ms = int(a.value)
        except ValueError:
            raise UsageError(f"reset-interval: {a.value!r} is not a whole number of milliseconds") from None
        r = request(path, {"cmd": "reset-interval", "value": ms})
        print(f"reset interval {r['reset_interval_ms']} ms")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from cgguard.testkit.demo import run_demo

    fs = _resolve_root(a.cgroup_root)
    return run_demo(fs, keep_state=a.keep_state)


def cmd_bench(a: argparse.Namespace) -> int:
    try:
        from cgguard.bench import main as bench_main
    except ImportError as e:
        raise UsageError(f"benchmark unavailable: {e}") from None
    return bench_main(a)


def cmd_config_reference(a: argparse.Namespace) -> int:
    from cgguard.configfile import reference_markdown

    sys.stdout.write(reference_markdown())
    return 0


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "tree": cmd_tree,
    "incidents": cmd_incidents,
    "check-config": cmd_check_config,
    "ctl": cmd_ctl,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "config-reference": cmd_config_reference,
}


def main(argv: list[str] | None = None) -> int:
    from cgguard.config import ConfigError
    from cgguard.kernel.cgroupfs import CgroupError

    try:
        a = build_parser().parse_args(argv)
        return COMMANDS[a.cmd](a)
    except (UsageError, ConfigError, CgroupError) as e:
        print(f"cgguard: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # last resort: one line, the traceback only on request
        if os.environ.get("CGGUARD_DEBUG"):
            raise
        print(f"cgguard: internal error: {type(e).__name__}: {e} (set CGGUARD_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
