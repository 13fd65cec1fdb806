"""Where a patched model's time goes, and how close it is to the best that running fewer tokens allows.

    python scripts/profile_ats.py --model deit_small_patch16_224 --rho 0.7 --batch-size 64
    python scripts/profile_ats.py --model reference --rho 1.0 --fuse --distinct 0.95 --batch-size 64

1. A torch.profiler trace of the patched forward. Every op's self CPU time goes to the ATS region
   it runs in (``ats.profiling.REGIONS``: scoring and sampling, fusing, packing and unpacking), else
   to what the op belongs to: linear layers, attention, norms and activations, or other.
2. A lower bound: timm's own blocks run on dense random tokens of the sizes ATS kept (the batch's mean
   per block), with no scoring, sampling or packing at all. Its speedup over the unpatched model is
   the most any implementation of these token counts can reach on this machine.
3. The ATen ops each forward dispatches: at small batches every op's fixed cost (Python, dispatch,
   thread launch), not its arithmetic, is what the forward pays.
Prints Markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import ats
from ats.cli_options import REFERENCE, load_model
from ats.profiling import REGIONS

OP_GROUPS = {
    "linear layers (qkv, proj, MLP, patch embedding, head)": ("aten::linear", "aten::addmm", "aten::mm",
                                                               "aten::convolution"),
    "attention (scaled_dot_product_attention)": ("aten::scaled_dot_product_attention",),
    "norms and activations": ("aten::layer_norm", "aten::gelu"),
}
REGION_NAMES = {"ats.score_and_sample": "ATS: scoring and sampling", "ats.fuse": "ATS: fusing dropped tokens",
                "ats.pack": "ATS: packing and unpacking"}
OTHER = "other (residual adds, views, copies, timm glue)"


def group_of(event) -> str:
    """The group an op's self time belongs to: its innermost enclosing ATS region, else its outermost
    enclosing op of a known group, else other."""
    group = None
    node = event
    while node is not None:
        if node.name in REGIONS:
            return REGION_NAMES[node.name]
        group = next((name for name, ops in OP_GROUPS.items() if node.name in ops), group)
        node = node.cpu_parent
    return group or OTHER


def profile_groups(model: torch.nn.Module, images: torch.Tensor, repeats: int) -> dict:
    """Share of self CPU time per group over ``repeats`` forwards."""
    with torch.inference_mode():
        model(images)
        with profile(activities=[ProfilerActivity.CPU]) as trace:
            for _ in range(repeats):
                model(images)
    totals: dict = defaultdict(float)
    for event in trace.events():
        if event.name not in REGIONS:
            totals[group_of(event)] += event.self_cpu_time_total
    total = sum(totals.values())
    return {group: totals[group] / total for group in [*OP_GROUPS, *REGION_NAMES.values(), OTHER]}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(run: Callable[[], None]) -> int:
    """How many ATen ops one call of ``run()`` dispatches."""
    with OpCounter() as counter:
        run()
    return counter.count


def median_ms(run: Callable[[], None], repeats: int) -> float:
    """Milliseconds ``run()`` takes: the median of ``repeats`` calls after one untimed call."""
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return 1e3 * statistics.median(seconds)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224",
                        help="a timm model name (random init), or 'reference' for the bundled model")
    parser.add_argument("--rho", type=float, default=0.7, help="multi-stage rho, blocks 3 to the last")
    parser.add_argument("--fuse", action="store_true", help="fold each dropped token into its most similar kept one")
    parser.add_argument("--distinct", type=float, default=0.0, metavar="COS",
                        help="also keep dropped tokens less similar than COS to every kept one (with --fuse)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(argparse.Namespace(model=args.model, pretrained=False, checkpoint=None, device="cpu"))
    if args.model == REFERENCE:
        from ats.datasets import bundled_test_set

        test_set = bundled_test_set()
        images = torch.stack([test_set[index][0] for index in range(args.batch_size)])
    else:
        images = torch.randn(args.batch_size, model.patch_embed.proj.in_channels, *model.patch_embed.img_size,
                             generator=torch.Generator().manual_seed(0))
    config = ats.ATSConfig.multi_stage(args.rho, depth=len(model.blocks), fuse=args.fuse, distinct=args.distinct)
    print(f"{args.model}, {config.describe()}, batch {args.batch_size}, {torch.get_num_threads()} threads\n")

    with torch.inference_mode():
        unpatched = median_ms(lambda: model(images), args.repeats)
        ops = {"unpatched": dispatched_ops(lambda: model(images))}
        ats.patch(model, config)
        patched = median_ms(lambda: model(images), args.repeats)
        ops["patched"] = dispatched_ops(lambda: model(images))
        stats = ats.last_stats(model)
        tokens = stats.tokens.float().mean(0).round().long().tolist()
        flop_ratio = ats.gflops(ats.unpatch(model)) / float(stats.gflops.mean())
        width = model.embed_dim
        dense = [torch.randn(args.batch_size, n, width) for n in tokens]

        def lower_bound() -> None:
            model.patch_embed(images)
            for block, x in zip(model.blocks, dense):
                block(x)

        bound = median_ms(lower_bound, args.repeats)
        ops["bound"] = dispatched_ops(lower_bound)
    ats.patch(model, config)
    shares = profile_groups(model, images, args.repeats)

    print("| group | share of the patched model's self CPU time |\n|---|---|")
    for group, share in shares.items():
        print(f"| {group} | {100 * share:.1f}% |")
    print(f"\nATS's own work (scoring, sampling, fusing, packing): "
          f"{100 * sum(share for group, share in shares.items() if group.startswith('ATS')):.1f}%\n")
    print("| forward | ms | speedup | efficiency (speedup / FLOP ratio) | ATen ops |\n|---|---|---|---|---|")
    print(f"| unpatched | {unpatched:.1f} | 1.00 | 1.00 | {ops['unpatched']} |")
    print(f"| patched | {patched:.1f} | {unpatched / patched:.2f} | {unpatched / patched / flop_ratio:.2f} | "
          f"{ops['patched']} |")
    print(f"| lower bound: timm blocks on the kept token counts | {bound:.1f} | {unpatched / bound:.2f} | "
          f"{unpatched / bound / flop_ratio:.2f} | {ops['bound']} |")
    print(f"\nFLOP ratio {flop_ratio:.2f}; mean tokens entering each block: {tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
