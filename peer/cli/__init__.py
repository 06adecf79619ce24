"""The `splitring` command line: agent, train, status, demo, plan, schedule, cancel, jobs, attach, plot,
dashboard."""
from __future__ import annotations

import argparse
import sys

from peer.cli import agent, cancel, dashboard, demo, jobs, plan, plot, schedule, status, train

# Each module registers one subcommand with `register(subparsers)`; its parser sets `func`.
COMMANDS = [agent, train, status, demo, plan, schedule, cancel, jobs, plot, dashboard]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitring", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
