"""Where a patched model's time goes: torch.profiler, ops grouped by what they do.

    python scripts/profile_ats.py --model deit_small_patch16_224 --rho 0.7 --batch-size 64

timm's own layers use only the ops of the first four groups; everything ATS adds (scores, sampling,
packing and unpacking of the variable token counts) lands in the other groups, so their share is
ATS's own cost. Prints a Markdown table of self CPU time per group.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import ats

GROUPS = {
    "linear layers (qkv, proj, MLP, patch embedding, head)": ("aten::addmm", "aten::mm", "aten::linear",
                                                               "aten::mkldnn_convolution", "aten::convolution"),
    "attention (scaled_dot_product_attention)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                                 "aten::_scaled_dot_product_efficient_attention",
                                                 "aten::_scaled_dot_product_flash_attention",
                                                 "aten::scaled_dot_product_attention"),
    "norms and activations": ("aten::native_layer_norm", "aten::layer_norm", "aten::gelu"),
    "residual adds": ("aten::add", "aten::add_"),
    "ATS scoring and sampling": ("aten::matmul", "aten::bmm", "aten::_softmax", "aten::softmax", "aten::sort",
                                 "aten::cumsum", "aten::searchsorted", "aten::scatter_", "aten::masked_fill",
                                 "aten::masked_fill_", "aten::pow", "aten::sum", "aten::sqrt", "aten::div",
                                 "aten::floor", "aten::clamp", "aten::clamp_min", "aten::isinf", "aten::gt",
                                 "aten::bitwise_or", "aten::bitwise_and", "aten::__and__", "aten::__or__",
                                 "aten::lt", "aten::ge", "aten::mean", "aten::max", "aten::argsort"),
    "ATS packing and unpacking": ("aten::index_select", "aten::index_copy_", "aten::gather",
                                  "aten::repeat_interleave", "aten::new_zeros", "aten::zeros", "aten::stack",
                                  "aten::_local_scalar_dense", "aten::item"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--rho", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model).eval()
    ats.patch(model, ats.ATSConfig.multi_stage(args.rho, depth=len(model.blocks)))
    images = torch.randn(args.batch_size, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(images)
        with profile(activities=[ProfilerActivity.CPU]) as trace:
            for _ in range(args.repeats):
                model(images)
    totals: dict = defaultdict(float)
    for event in trace.key_averages():
        group = next((name for name, ops in GROUPS.items() if event.key in ops), "other (views, copies, glue)")
        totals[group] += event.self_cpu_time_total
    total = sum(totals.values())
    print(f"{args.model}, multi-stage rho={args.rho}, batch {args.batch_size}, {args.threads} threads, "
          f"{args.repeats} forwards: {total / 1e3 / args.repeats:.1f} ms per forward\n")
    print("| group | share of self CPU time |\n|---|---|")
    for group in [*GROUPS, "other (views, copies, glue)"]:
        print(f"| {group} | {100 * totals[group] / total:.1f}% |")


if __name__ == "__main__":
    main()
