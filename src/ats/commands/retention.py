"""Retention: how many distinct tokens K inverse-transform samples keep, and how flat the scores are.

Inverse transform sampling places K points on the scores' cumulative distribution; a token whose score
is far above 1/K catches several points but is kept once, so a model with peaked scores keeps far fewer
than K tokens. The paper's DeiT-S keeps about 95% of K = 108 at block 3 (its single-stage K = 108
averages about 3.0 GFLOPs against 3.06 if all 108 were kept); ``measure_retention`` gives the same
statistic for any model ATS patches, with the scores' effective number of tokens (the exponential of
their entropy, between 1 for one token and ``num_patches`` for uniform scores) that explains it.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..adapters import data_config
from ..adapters.family import last_stats, unpatch
from ..data.build import build_dataset
from ..data.distributed import make_loader, refuse_torchrun
from ..methods import ATSConfig
from .options import add_model_arguments, load_model, require_data

#: The paper's single-stage budget at block 3 on DeiT-S (196 patch tokens), where retention is read.
RETENTION_K = 108
RETENTION_BLOCK = 3


@dataclass(frozen=True)
class Retention:
    """Means over the images: ``kept`` distinct patch tokens of ``k`` samples in ``block``; ``retention`` =
    kept / k; ``effective_tokens`` = exp(entropy) of the block's normalised scores, also as a share of the
    ``num_patches`` patch tokens (``effective_share``)."""

    k: int
    block: int
    images: int
    kept: float
    retention: float
    effective_tokens: float
    effective_share: float
    num_patches: int

    def as_dict(self) -> dict:
        return asdict(self)


def effective_tokens(scores: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row of non-negative ``scores`` [B, n] (normalised here; zeros contribute 0) -> [B]."""
    p = scores.float() / scores.float().sum(dim=-1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=-1)
    return entropy.exp()


@torch.inference_mode()
def measure_retention(model: nn.Module, batches: Iterable, k: int = RETENTION_K,
                      block: int = RETENTION_BLOCK) -> Retention:
    """Retention of single-stage ATS with ``k`` samples in ``block`` on an unpatched ``model`` over
    ``batches`` of inputs (or (inputs, labels) pairs); the model is patched for the measurement and
    unpatched after."""
    from .. import is_patched, patch

    if is_patched(model):
        raise ValueError("measure_retention patches the model itself; pass an unpatched model (ats.unpatch(model))")
    patch(model, ATSConfig.single_stage(k, block=block))
    kept, effective, num_patches = [], [], 0
    try:
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(inputs.to(next(model.parameters()).device))
            stats = last_stats(model)
            kept.append(stats.kept_counts(block).float().cpu())
            effective.append(effective_tokens(stats.scores[block]).cpu())
            num_patches = stats.scores[block].shape[1]
    finally:
        unpatch(model)
    if not kept:
        raise ValueError("measure_retention got no batches; pass at least one batch of inputs")
    kept_mean, effective_mean = float(torch.cat(kept).mean()), float(torch.cat(effective).mean())
    return Retention(k=k, block=block, images=len(torch.cat(kept)), kept=kept_mean, retention=kept_mean / k,
                     effective_tokens=effective_mean, effective_share=effective_mean / num_patches,
                     num_patches=num_patches)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("retention", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--k", type=int, default=RETENTION_K, help=f"samples (default {RETENTION_K})")
    parser.add_argument("--block", type=int, default=RETENTION_BLOCK, help=f"the ATS block (default {RETENTION_BLOCK})")
    parser.add_argument("--data", help="an ImageFolder directory; default: the model's bundled test set")
    parser.add_argument("--limit", type=int, default=1000, help="the first N images (default 1000)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_torchrun("retention")
    model = load_model(args)
    require_data(args, model, "retention")
    loader = make_loader(build_dataset(args.data, data_config(model), args.limit), args.batch_size, 0)
    result = measure_retention(model, tqdm(loader, desc="retention", leave=False), args.k, args.block)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    else:
        print(f"block {result.block}, K = {result.k}: {result.kept:.1f} distinct tokens kept (retention "
              f"{result.retention:.3f}); effective tokens {result.effective_tokens:.1f} of {result.num_patches} "
              f"({100 * result.effective_share:.1f}%); {result.images} images")
    return 0
