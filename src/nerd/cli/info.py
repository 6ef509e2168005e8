"""`nerd info`: model presets with their parameter counts, shipped weights, and the runtime."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("info", help="list model presets (with parameter counts) and shipped weights")


def run(args: argparse.Namespace) -> int:
    import torch

    from nerd.models import PRESETS, count_parameters, create_model

    print(f"nerd: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cuda {'available' if torch.cuda.is_available() else 'not available'}")
    print("\nmodel presets:")
    print(f"  {'name':<7} {'params':>10}  channels heads window blocks")
    for name, cfg in PRESETS.items():
        n = count_parameters(create_model(name))
        print(f"  {name:<7} {n:>10,}  {cfg.channels:>8} {cfg.heads:>5} {cfg.window:>6} {cfg.blocks}")
    from nerd.weights import list_weights

    entries = list_weights()
    print("\nshipped weights:" if entries else "\nshipped weights: none")
    for entry in entries:
        print(f"  {entry}")
    return 0
