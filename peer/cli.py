"""The `splitring` command line: agent, train, status, demo, plan, schedule, cancel."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module registers one subcommand with `register(subparsers)`; its parser sets `func`.
COMMANDS = ["peer.cli_agent", "peer.cli_train", "peer.cli_status", "peer.cli_demo",
            "peer.cli_plan", "peer.cli_schedule", "peer.cli_cancel"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitring", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # command not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
