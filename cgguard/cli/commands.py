"""The ``cgguard`` commands: one ``cmd_*`` function per subcommand, each returning its exit code.

Bad input raises :class:`~cgguard.cli.parser.UsageError` (one line, exit 2); text output of
status, tree and incidents is :mod:`cgguard.cli.render`'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from cgguard.cli.parser import UsageError, _Parser, config_overrides
from cgguard.cli.render import print_incidents, print_status, print_tree, printable


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

    cfg = _load_config(a.config, config_overrides(a))
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
    print_status(Status.from_dict(raw))
    return 0


def cmd_tree(a: argparse.Namespace) -> int:
    tree = request(_control_path(a), {"cmd": "tree", "cgroup": a.cgroup.strip("/")})["tree"]
    if a.json:
        print(json.dumps(tree, indent=2, default=str))
    else:
        print_tree(tree, a.cgroup)
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
    print_incidents(items)
    return 0


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
        print(printable(f"allow: {rule.mode} {what} in '{rule.match}'"))
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
        from cgguard.bench.__main__ import build_parser
    except ImportError as e:
        raise UsageError(f"benchmark unavailable: {e}") from None
    return bench_main(build_parser(prog="cgguard bench", parser_class=_Parser).parse_args(a.args))


def cmd_config_reference(a: argparse.Namespace) -> int:
    from cgguard.configfile import reference_markdown

    sys.stdout.write(reference_markdown())
    return 0
