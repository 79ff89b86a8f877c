"""Command line: ``cgguard run|status|tree|incidents|check-config|ctl|demo|bench``.

Bad input of any kind ends in one line on stderr and exit 2, never a traceback.

The parser is in :mod:`cgguard.cli.parser`, the commands in :mod:`cgguard.cli.commands`, and
the text output of status, tree and incidents in :mod:`cgguard.cli.render`; this module
dispatches and turns every error into its one line.
"""

from __future__ import annotations

import os
import sys

from cgguard.cli import commands
from cgguard.cli.parser import EXIT_USAGE, UsageError, build_parser

COMMANDS = {
    "run": commands.cmd_run,
    "status": commands.cmd_status,
    "tree": commands.cmd_tree,
    "incidents": commands.cmd_incidents,
    "check-config": commands.cmd_check_config,
    "ctl": commands.cmd_ctl,
    "demo": commands.cmd_demo,
    "bench": commands.cmd_bench,
    "config-reference": commands.cmd_config_reference,
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
