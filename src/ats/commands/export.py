"""`ats export --onnx FILE`: write a model (unpatched or patched) as an ONNX graph, then run it in ONNX Runtime on a
few bundled images and print how far its logits and kept tokens are from PyTorch's.

With ``--static`` every block has a width fixed in advance (its capacity); without, the adaptive mode's graph sizes
each block by the largest count an image kept, computed in the graph (docs/performance.md, "Deploy"). The graph's
batch dimension is dynamic unless ``--fixed-batch``; the opset is ``ats.export.OPSET``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import ats

from ..adapters import data_config, depth_of
from ..data.build import build_dataset
from ..data.distributed import refuse_torchrun
from ..export import OPSET, check_export, export_onnx, onnx_session
from .evaluate import config_label
from .options import add_config_arguments, add_model_arguments, config_flags_given, configs_from_arguments, load_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", description=__doc__)
    parser.add_argument("--onnx", type=Path, required=True, metavar="FILE", help="the ONNX file to write")
    add_model_arguments(parser)
    add_config_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="the bundled images the graph is checked on (default 8); the graph is exported at "
                             "batch 2 and checked at N, so a dynamic batch is checked too")
    parser.add_argument("--fixed-batch", action="store_true",
                        help="fix the graph's batch dimension at --batch-size (default: dynamic)")
    parser.add_argument("--kept-tokens", action="store_true",
                        help="the graph also outputs each sampling block's kept patch-grid indices (kept_BLOCK, "
                             "[batch, capacity], -1 on padding), and the check compares them with PyTorch's")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_torchrun("export")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = load_model(args).cpu()  # exported and checked on the CPU, where ONNX Runtime runs it here
    config = None
    if config_flags_given(args):
        configs = configs_from_arguments(args, depth=depth_of(model))
        if len(configs) != 1:
            raise ValueError(f"ats export writes one model; the flags name {len(configs)} configs "
                             f"({'; '.join(config.describe() for config in configs)})")
        config = configs[0]
        ats.patch(model, config, static=args.static)
    dataset = build_dataset(None, data_config(model), limit=max(args.batch_size, 2))  # dynamic batches export at 2
    loaded = torch.stack([dataset[index][0] for index in range(len(dataset))])
    images = loaded[:args.batch_size]
    example = images if args.fixed_batch else loaded[:2]
    outputs = export_onnx(model, example, args.onnx, dynamic_batch=not args.fixed_batch, kept_tokens=args.kept_tokens)
    check = check_export(model, onnx_session(args.onnx), images)
    gflops = float(ats.last_stats(model).gflops.mean()) if config is not None else ats.gflops(model)
    report = dict(onnx=str(args.onnx), model=args.model, config=config_label(config, args.static),
                  opset=OPSET, batch="fixed" if args.fixed_batch else "dynamic", outputs=outputs, gflops=gflops,
                  **dataclasses.asdict(check))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    kept = "" if check.same_kept is None else f"; same kept tokens in every block: {'yes' if check.same_kept else 'NO'}"
    print(f"wrote {args.onnx}: {report['config']}, {gflops:.4f} GFLOPs per image, opset {OPSET}, "
          f"{report['batch']} batch, outputs {', '.join(outputs)}")
    print(f"ONNX Runtime vs PyTorch on {check.images} bundled images: max |logit difference| "
          f"{check.max_abs_diff:.2e}, same top class {check.same_class:.0%}{kept}")
    return 0
