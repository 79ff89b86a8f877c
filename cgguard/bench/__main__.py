"""``python -m cgguard.bench`` and ``cgguard bench``: the benchmark's flags and entry.

The guest runs its part through this entry (``--in-guest``), and so can a developer who wants
the generated shapes alone (``--shapes``), in the guest too (``--guest``), from another seed.
"""

from __future__ import annotations

import argparse
import sys

from cgguard.cli.parser import at_least_one

from . import main


def build_parser(prog: str = "python -m cgguard.bench", parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench's parser; ``cgguard bench`` passes the CLI's parser class (one-line errors)."""
    p = parser_class(prog=prog, description="Benchmark cgguard against baselines: detection quality, removal time, cost.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's flags, for this entry and for ``cgguard bench``."""
    p.add_argument("--quick", action="store_true", help="fewer runs and a subset of the shapes, for CI")
    p.add_argument("--out", metavar="DIR", default="results", help="results folder (default ./results)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only these workloads (or: cost, events, targets, shapes)")
    p.add_argument("--cost", action="store_true",
                   help="only the agent-cost scenarios: fork loads, busy node, 10,000 cgroups, scrape load")
    p.add_argument("--shapes", action="store_true", help="run only the generated shapes (with and without a limit)")
    p.add_argument("--guest", action="store_true", help="also run the generated shapes in the pure cgroup-v2 guest")
    p.add_argument("--guest-only", action="store_true", help="run only the generated shapes, only in the guest")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the generated shapes (default: fixed)")
    p.add_argument("--count", type=at_least_one, metavar="N", help="number of generated shapes (default 104)")
    p.add_argument("--shape", action="append", metavar="NAME",
                   help="run only the generated shapes whose name starts with NAME (e.g. s027), to reproduce one")
    # Internal: how the host runs the guest's part.
    p.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape-budget", type=at_least_one, help=argparse.SUPPRESS)
    p.add_argument("--time-budget", type=at_least_one, help=argparse.SUPPRESS)


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
