"""Where a patched model's time goes, and how close it is to the best that running fewer tokens allows.

    python scripts/profile_ats.py --model deit_small_patch16_224 --rho 0.7 --batch-size 64
    python scripts/profile_ats.py --model reference --rho 1.0 --fuse --distinct 0.95 --batch-size 64
    python scripts/profile_ats.py --count-ops --model deit_small_patch16_224   # ops and host reads only

1. A torch.profiler trace of the patched forward. Every op's self CPU time goes to the ATS region
   it runs in (``ats.profiling.REGIONS``: scoring and sampling, fusing, packing and unpacking), else
   to what the op belongs to: linear layers, attention, norms and activations, or other.
2. A lower bound: the unpatched model's own modules with no scoring, sampling or packing at all: its
   patch and position embedding, each block on dense random tokens of the size ATS kept entering it
   (the batch's mean), and its final norm and head. Its speedup over the unpatched model is the most
   any implementation of these token counts can reach on this machine. The unpatched model, the
   patched one (a copy) and the bound are timed in turn, round after round (median of --repeats), so
   the machine's drift hits all three alike.
3. The ATen ops each forward dispatches: at small batches every op's fixed cost (Python, dispatch,
   thread launch), not its arithmetic, is what the forward pays.
Prints Markdown tables. ``--count-ops`` prints only a table of ATen ops and host reads per forward (reads of a
device value on the host: ``item``, ``tolist``, and ops whose output size depends on the data), at batch 1 and
64, for the unpatched model and for each config the ATS flags, ``--merge`` and ``--evit`` name, adaptive and static.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import ats
from ats.adapters.timm import TIMM
from ats.commands.options import REFERENCE, load_model
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


#: ATen ops that read a device value on the host: a scalar, or an output whose size depends on the data.
HOST_READ_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive")


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while it is active, and the host reads among them (``HOST_READ_OPS``, a
    ``repeat_interleave`` not told its output size, and ``Tensor.tolist``, which reads without dispatching)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.host_reads = 0
        self._tolist = torch.Tensor.tolist

    def __enter__(self):
        counter, tolist = self, self._tolist

        def counted_tolist(tensor: torch.Tensor):
            counter.host_reads += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        name = func.overloadpacket.__name__
        if name in HOST_READ_OPS or (name == "repeat_interleave" and (kwargs or {}).get("output_size") is None
                                     and len(args) > 1 and isinstance(args[1], torch.Tensor)):
            self.host_reads += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(run: Callable[[], None]) -> int:
    """How many ATen ops one call of ``run()`` dispatches."""
    return counted(run)[0]


def counted(run: Callable[[], None]) -> Tuple[int, int]:
    """(ATen ops, host reads) of one call of ``run()``."""
    with OpCounter() as counter:
        run()
    return counter.count, counter.host_reads


def count_ops(model: torch.nn.Module, images: torch.Tensor, configs: List, batch_sizes: Sequence[int]) -> None:
    """Print a Markdown table of ATen ops and host reads per forward of ``model`` (under ``torch.no_grad``),
    unpatched and under each config adaptive and static, at each batch size (the first images of ``images``,
    repeated as needed)."""
    print("| config | mode | batch | ATen ops | host reads |\n|---|---|---|---|---|")
    for batch_size in batch_sizes:
        batch = images.repeat((batch_size + len(images) - 1) // len(images), 1, 1, 1)[:batch_size]
        with torch.no_grad():
            model(batch)
            ops, reads = counted(partial(model, batch))
            print(f"| unpatched | - | {batch_size} | {ops} | {reads} |")
            for config in configs:
                for static in (False, True):
                    patched = ats.patch(copy.deepcopy(model), config, static=static)
                    patched(batch)
                    ops, reads = counted(partial(patched, batch))
                    mode = "static" if static else "adaptive"
                    print(f"| {config.describe()} | {mode} | {batch_size} | {ops} | {reads} |")


def interleaved_ms(runs: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Milliseconds each ``run()`` takes: the median of ``repeats`` rounds after one untimed round; a round
    calls every run once, in turn, so the machine's drift hits them all alike."""
    seconds: Dict[str, List[float]] = {name: [] for name in runs}
    for round_index in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_index:
                seconds[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in seconds.items()}


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
    parser.add_argument("--count-ops", action="store_true",
                        help="only count ATen ops and host reads per forward at batch 1 and 64 (--batch-size "
                             "repeatable there), adaptive and static")
    parser.add_argument("--merge", type=int, action="append", default=[], metavar="R",
                        help="with --count-ops: also token merging with R per block; repeatable")
    parser.add_argument("--evit", type=float, action="append", default=[], metavar="KEEP_RATE",
                        help="with --count-ops: also EViT (blocks 3, 6, 9); repeatable")
    parser.add_argument("--count-batch-size", type=int, action="append", metavar="N",
                        help="with --count-ops: the batch sizes (default 1 and 64)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(argparse.Namespace(model=args.model, pretrained=False, checkpoint=None, device="cpu"))
    if args.model == REFERENCE:
        from ats.data.fashion_mnist import bundled_test_set

        test_set = bundled_test_set()
        images = torch.stack([test_set[index][0] for index in range(args.batch_size)])
    else:
        images = torch.randn(args.batch_size, model.patch_embed.proj.in_channels, *model.patch_embed.img_size,
                             generator=torch.Generator().manual_seed(0))
    config = ats.ATSConfig.multi_stage(args.rho, depth=len(model.blocks), fuse=args.fuse, distinct=args.distinct)
    if args.count_ops:
        configs = [config, *(ats.EViTConfig(keep_rate) for keep_rate in args.evit),
                   *(ats.MergeConfig(r) for r in args.merge)]
        print(f"{args.model}, {torch.get_num_threads()} threads\n")
        count_ops(model, images, configs, args.count_batch_size or [1, 64])
        return 0
    print(f"{args.model}, {config.describe()}, batch {args.batch_size}, {torch.get_num_threads()} threads\n")

    patched = ats.patch(copy.deepcopy(model), config)
    with torch.inference_mode():
        patched(images)
        stats = ats.last_stats(patched)
        tokens = stats.tokens.float().mean(0).round().long().tolist()
        tokens_out = stats.tokens_out.float().mean(0).round().long().tolist()
        flop_ratio = ats.gflops(model) / float(stats.gflops.mean())
        dense = [torch.randn(args.batch_size, n, model.embed_dim) for n in tokens]
        last = torch.randn(args.batch_size, tokens_out[-1], model.embed_dim)

        def lower_bound() -> None:
            TIMM.embed(model, images)
            for block, x in zip(model.blocks, dense):
                block(x)
            model.forward_head(model.norm(last))

        runs = {"unpatched": lambda: model(images), "patched": lambda: patched(images), "bound": lower_bound}
        ms = interleaved_ms(runs, args.repeats)
        ops = {name: dispatched_ops(run) for name, run in runs.items()}
    shares = profile_groups(patched, images, args.repeats)

    print("| group | share of the patched model's self CPU time |\n|---|---|")
    for group, share in shares.items():
        print(f"| {group} | {100 * share:.1f}% |")
    print(f"\nATS's own work (scoring, sampling, fusing, packing): "
          f"{100 * sum(share for group, share in shares.items() if group.startswith('ATS')):.1f}%\n")
    print("| forward | ms | speedup | efficiency (speedup / FLOP ratio) | ATen ops |\n|---|---|---|---|---|")
    for name, label in (("unpatched", "unpatched"), ("patched", "patched"),
                        ("bound", "lower bound: timm's modules on the kept token counts")):
        speedup = ms["unpatched"] / ms[name]
        efficiency = 1.0 if name == "unpatched" else speedup / flop_ratio
        print(f"| {label} | {ms[name]:.1f} | {speedup:.2f} | {efficiency:.2f} | {ops[name]} |")
    print(f"\nFLOP ratio {flop_ratio:.2f}; mean tokens entering each block: {tokens}; the patched forward "
          f"reaches {ms['bound'] / ms['patched']:.3f} of the bound's speed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
