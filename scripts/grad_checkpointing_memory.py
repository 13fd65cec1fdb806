"""Peak memory of one training step (forward + backward), with and without gradient checkpointing,
unpatched and patched with ATS.

    python scripts/grad_checkpointing_memory.py --model deit_small_patch16_224 --batch-size 32 --multi-stage 1.0

Each case runs in a fresh process. On CUDA the figure is torch.cuda.max_memory_allocated above what
the model and its inputs held before the step; on CPU it is the growth of the process's peak
resident memory (ru_maxrss) over the resident memory before the step, which also counts allocator
slack, so compare the rows with each other, not with a GPU's.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource

import timm
import torch

import ats

CASES = [("unpatched", False), ("unpatched", True), ("patched", False), ("patched", True)]


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def training_step_memory(model_name: str, batch_size: int, rho: float, patched: bool, checkpointing: bool,
                         device: str, queue: multiprocessing.Queue) -> None:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).to(device).train()
    if patched:
        ats.patch(model, ats.ATSConfig.multi_stage(rho, depth=len(model.blocks)))
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(batch_size, model.patch_embed.proj.in_channels, *model.patch_embed.img_size, device=device)
    model(images[:1]).sum().backward()
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resident_bytes()
    model(images).logsumexp(dim=-1).mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    queue.put(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--multi-stage", type=float, default=1.0, metavar="RHO")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    rows = []
    for model_state, checkpointing in CASES:
        queue = context.Queue()
        process = context.Process(target=training_step_memory, args=(
            args.model, args.batch_size, args.multi_stage, model_state == "patched", checkpointing, args.device,
            queue))
        process.start()
        peak = queue.get()
        process.join()
        rows.append(dict(model=args.model, config="unpatched" if model_state == "unpatched" else
                         f"multi-stage rho={args.multi_stage:g}", grad_checkpointing=checkpointing,
                         batch_size=args.batch_size, device=args.device, peak_mib=round(peak / 2**20, 1)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| config | grad checkpointing | batch | peak step memory (MiB) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {'on' if row['grad_checkpointing'] else 'off'} | {row['batch_size']} | "
              f"{row['peak_mib']} |")


if __name__ == "__main__":
    main()
