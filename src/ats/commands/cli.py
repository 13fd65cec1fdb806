"""The ``ats`` command line: one subcommand per tool module, imported only when its command runs (``ats --help``
loads none of them)."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

from .. import __version__

#: Command name -> (its module under ``ats.commands``, the line ``ats --help`` shows). Each module defines
#: ``add_parser(subparsers)``, which adds the command's parser and sets ``func(args) -> int``.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "eval": ("evaluate", "accuracy, GFLOPs and throughput, unpatched vs. ATS configs"),
    "bench": ("bench", "throughput of unpatched vs. patched: speedup and efficiency"),
    "visualize": ("visualize", "draw the tokens each ATS block keeps and the class token's attention"),
    "train": ("train", "fine-tune with ATS (torchrun -m ats train for many processes)"),
    "compare": ("compare", "ATS vs. token merging, SAINT, EViT and top-K over budgets"),
    "calibrate": ("calibrate", "find the config that costs a given GFLOPs budget"),
    "retention": ("retention", "distinct tokens K inverse-transform samples keep, and the scores' effective number "
                               "of tokens"),
    "export": ("export", "write an ONNX graph of a patched model and check it in ONNX Runtime"),
    "segment": ("segment", "mIoU and GFLOPs of the cluttered segmentation benchmark, dense features restored"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser, with ``command``'s full parser (its module imported) and a one-line entry for the others."""
    parser = argparse.ArgumentParser(
        prog="ats", description="Adaptive Token Sampling for pretrained vision transformers: evaluate, benchmark, "
        "visualise, fine-tune and export a timm, Hugging Face, open_clip or torchvision ViT with ATS.")
    parser.add_argument("--version", action="version", version=f"ats {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        if name == command:
            importlib.import_module(f"ats.commands.{module}").add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((arg for arg in argv if not arg.startswith("-")), None))
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
