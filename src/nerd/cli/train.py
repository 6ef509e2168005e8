"""`nerd train` (not implemented yet)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("train", help="(not implemented yet)")


def run(args: argparse.Namespace) -> int:
    from nerd.cli import UserError

    raise UserError("not implemented yet")
