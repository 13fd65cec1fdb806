"""The paper's off-the-shelf experiments on a model (default: the bundled reference), as JSON and PNGs.

    python scripts/reproduce_paper.py --out docs/results --limit 2000

Experiments (all in one pass of ``ats.commands.evaluate.evaluate`` over the data):
- ksweep: single-stage K at block 3 from 8 to 196, inverse transform sampling and top-K
  (supplement Fig. 1 and Table 3);
- placement: ATS at block 0, 3 and 6 with K chosen so the upper-bound GFLOPs equal K=108 at block 3,
  multi-stage 3..11 and all blocks 0..11 at several rho (Table 4);
- cls: class token enforced or not, multi-stage (Fig. 4);
- floor: multi-stage with a floor of min_kept unique tokens (the collapse study).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

import ats
from ats.adapters import data_config
from ats.commands.evaluate import evaluate
from ats.commands.options import add_model_arguments, load_model
from ats.commands.plots import plot_frontier
from ats.data.build import build_dataset
from ats.data.distributed import make_loader
from ats.methods import ATSConfig

K_SWEEP = (8, 16, 32, 48, 64, 78, 96, 108, 128, 160, 196)
RHOS = (1.0, 0.9, 0.8, 0.7)
FLOORS = (0, 16, 32, 64)


def k_matching(model, block: int, target: float) -> int:
    """The K at ``block`` whose upper-bound GFLOPs come closest to ``target``."""
    def bound(k: int) -> float:
        ats.patch(model, ATSConfig.single_stage(k=k, block=block))
        value = ats.gflops(model)
        ats.unpatch(model)
        return value

    return min(range(1, model.patch_embed.num_patches + 1), key=lambda k: abs(bound(k) - target))


def experiments(model, names: List[str]) -> dict:
    depth = len(model.blocks)
    runs = {}
    if "ksweep" in names:
        runs["ksweep"] = [ATSConfig.single_stage(k=k) for k in K_SWEEP] + \
            [ATSConfig.single_stage(k=k, sampler="topk") for k in K_SWEEP]
    if "placement" in names:
        ats.patch(model, ATSConfig.single_stage(k=108, block=3))
        target = ats.gflops(model)
        ats.unpatch(model)
        runs["placement"] = [ATSConfig.single_stage(k=k_matching(model, block, target), block=block)
                             for block in (0, 3, 6)]
        runs["placement"] += [ATSConfig.multi_stage(rho, first=first, depth=depth) for first in (3, 0) for rho in RHOS]
    if "cls" in names:
        runs["cls"] = [ATSConfig.multi_stage(rho, depth=depth, keep_cls=keep) for keep in (True, False) for rho in RHOS]
    if "floor" in names:
        runs["floor"] = [ATSConfig.multi_stage(rho, depth=depth, min_kept=floor) for floor in FLOORS for rho in RHOS]
    return runs


def line_of(name: str, config: ATSConfig) -> str:
    """The frontier line a config belongs to in experiment ``name``."""
    if name == "ksweep":
        return config.sampler.replace("_", " ")
    if name == "placement":
        blocks = list(config.budgets)
        return f"blocks {blocks[0]}..{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}"
    if name == "cls":
        return "class token enforced" if config.keep_cls else "class token not enforced"
    return f"min_kept={config.min_kept}"


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", help="ImageFolder; default: the bundled Fashion-MNIST test set")
    parser.add_argument("--limit", type=int, help="first N images")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--experiments", nargs="+", default=["ksweep", "placement", "cls", "floor"],
                        choices=["ksweep", "placement", "cls", "floor"])
    parser.add_argument("--out", type=Path, required=True, help="directory for <experiment>.json and .png")
    args = parser.parse_args(argv)
    model = load_model(args)
    loader = make_loader(build_dataset(args.data, data_config(model), args.limit), args.batch_size, 0)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = experiments(model, args.experiments)
    unique = {config.describe(): config for configs in runs.values() for config in configs}
    rows = evaluate(model, loader, [None, *unique.values()], repeats=1)
    row_of = dict(zip(["unpatched", *unique], rows))
    for name, configs in runs.items():
        records = [dict(row_of["unpatched"].to_json(), line="unpatched")]
        records += [dict(row_of[config.describe()].to_json(), line=line_of(name, config)) for config in configs]
        (args.out / f"{name}.json").write_text(json.dumps(records, indent=1))
        points = [dict(method=record["line"], gflops=record["gflops"], top1=record["top1"]) for record in records]
        title = f"{name} ({args.model}, {len(loader.dataset)} images)"
        plot_frontier(points, args.out / f"{name}.png", title=title, baseline="unpatched")
        for record in records:
            print(f"{name:9s} {record['line']:28s} {record['config']:40s} {record['gflops']:.4f} GFLOPs  "
                  f"{record['top1']:.2f}%  kept {record['kept_tokens_min']}/{record['kept_tokens_mean']}/"
                  f"{record['kept_tokens_max']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
