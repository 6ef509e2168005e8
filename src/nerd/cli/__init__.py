"""The `nerd` command: subcommands over library calls.

Each subcommand lives in its own module `nerd.cli.<name>` with `add_parser(subparsers)` and `run(args) -> int`;
modules import torch and friends inside `run`, so `nerd --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nerd import allocator
from nerd.errors import NerdError

COMMANDS = ["info", "denoise", "eval", "train", "validate", "export", "bench", "experiment", "serve"]


class UserError(NerdError):
    """A problem with the command line itself (options, paths): like every `NerdError`, reported as one line on
    stderr, exit status 2, no traceback."""


def check_device(device: str) -> str:
    """`device` ("cpu", "cuda" or "cuda:N") when this machine has it; UserError otherwise."""
    import re

    import torch

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return device


def check_sigma(sigma255: float, option: str = "--sigma") -> float:
    """sigma255 when 0 < sigma255 <= 255 (the 0-255 scale); a ConfigError naming `option` otherwise."""
    from nerd.sigma import check_sigma255

    return check_sigma255(sigma255, option)


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
    except NerdError as err:  # the one place a user's error becomes one line and exit 2
        print(f"nerd {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nerd {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    """The error's message on one line (a message that quotes a file's text may hold newlines)."""
    return " ".join(str(err).split())
