"""The ``ats`` command line: one subcommand per tool module."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .. import __version__

#: Command modules under ``ats.commands``; each defines ``add_parser(subparsers)``, which sets ``func(args) -> int``.
COMMANDS: tuple = ("evaluate", "bench", "visualize", "train", "compare", "calibrate", "retention", "segment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ats", description="Adaptive Token Sampling for pretrained vision transformers: evaluate, "
        "benchmark, visualise and fine-tune a timm ViT with ATS.")
    parser.add_argument("--version", action="version", version=f"ats {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ats.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"ats: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
