"""The `nerd` command: subcommands over library calls.

Each subcommand lives in its own module `nerd.cli.<name>` with `add_parser(subparsers)` and `run(args) -> int`;
modules import torch and friends inside `run`, so `nerd --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nerd import allocator

COMMANDS = ["info", "denoise", "eval", "train", "validate", "export", "bench", "experiment"]


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nerd", description="NERD: the Noise Equilibrium Reaching Denoiser (implicit / deep-equilibrium)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"nerd.cli.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(f"nerd.cli.{args.command}")
    allocator.tune()
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"nerd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nerd {args.command}: interrupted", file=sys.stderr)
        return 130
