"""`ats train` / `python -m ats.train`: fine-tune a model with ATS, on one process or many.

Under ``torchrun --nproc_per_node N -m ats.train ...`` every process trains a DistributedDataParallel
replica on its shard of the data (NCCL on CUDA, gloo on CPU); only rank 0 evaluates, writes
checkpoints and the log, and shows the progress bar. AdamW, cosine schedule with warm-up, label
smoothing, mixed precision on CUDA; a checkpoint every epoch (``--resume`` continues from it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

import ats

from .checkpoints import save_atomic
from .cli_options import add_config_arguments, add_model_arguments, configs_from_arguments, load_model
from .config import ATSConfig
from .datasets import build_dataset, training_set
from .evaluate import evaluate, make_loader
from .patch import as_logits, family_of

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
LOG = "log.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, help="training ImageFolder (root/<class>/<image>), or a folder with "
                                                "Fashion-MNIST's train-*-idx*-ubyte.gz files; default: Fashion-MNIST's "
                                                "training set from Debian (apt-get install dataset-fashion-mnist)")
    data.add_argument("--val-data", help="validation ImageFolder; default: the bundled Fashion-MNIST test set")
    data.add_argument("--limit", type=int, help="train on the first N images")
    data.add_argument("--val-limit", type=int, help="validate on the first N images")
    data.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    add_config_arguments(parser)
    parser.add_argument("--stochastic", action="store_true", help="stochastic sampling points in training")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=30)
    optim.add_argument("--batch-size", type=int, default=96, help="per process")
    optim.add_argument("--lr", type=float, default=5e-4)
    optim.add_argument("--min-lr", type=float, default=1e-6)
    optim.add_argument("--warmup-epochs", type=float, default=1.0)
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--label-smoothing", type=float, default=0.1)
    optim.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint and log directory")
    parser.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="fine-tune with ATS (torchrun -m ats.train for many processes)",
                                   description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)


def training_config(args: argparse.Namespace, depth: int) -> ATSConfig:
    """The one config to train with: the flags' only config, or multi-stage rho = 1 (the paper's
    K = number of input tokens) when none is given."""
    given = args.multi_stage or args.single_stage or args.blocks
    configs = configs_from_arguments(args, depth) if given else [ATSConfig.multi_stage(1.0, depth=depth)]
    if len(configs) != 1:
        raise ValueError(f"training takes one ATS config, got {len(configs)}: give one of --multi-stage, "
                         "--single-stage or --blocks")
    return dataclasses.replace(configs[0], stochastic=args.stochastic)


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.data is not None and not args.data.is_dir():
        raise FileNotFoundError(f"training data directory {args.data} does not exist; pass an ImageFolder "
                                "(root/<class>/<image>.jpg)")
    if args.resume and not (args.out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"--resume: {args.out / CHECKPOINT} does not exist; train without --resume first")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        cuda = torch.cuda.is_available() and args.device.startswith("cuda")
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        if cuda:
            local_rank = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local_rank)
            args.device = f"cuda:{local_rank}"
    try:
        return train(args, rank=dist.get_rank() if distributed else 0,
                     world_size=dist.get_world_size() if distributed else 1)
    finally:
        if distributed:
            dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world_size: int) -> int:
    torch.manual_seed(args.seed)
    model = load_model(args)
    device = next(model.parameters()).device
    config = training_config(args, family_of(model).depth(model))
    ats.patch(model, config)

    dataset = training_set(args.data, model)
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    sampler = (DistributedSampler(dataset, world_size, rank, shuffle=True, seed=args.seed) if world_size > 1
               else RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed)))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        drop_last=len(dataset) >= args.batch_size * world_size)
    val_loader = make_loader(build_dataset(args.val_data, model, args.val_limit), 250, args.workers) \
        if rank == 0 else None

    network: nn.Module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * len(loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=steps, lr_min=args.min_lr, warmup_t=int(
        args.warmup_epochs * len(loader)), warmup_lr_init=args.min_lr, t_in_epochs=False)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    start_epoch = 0
    if args.resume:
        state = torch.load(args.out / CHECKPOINT, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"training {config.describe()} on {len(dataset)} images, {world_size} process(es), "
              f"epochs {start_epoch}..{args.epochs - 1}", file=sys.stderr)

    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        network.train()
        total_loss, batches = 0.0, 0
        for images, labels in tqdm(loader, desc=f"epoch {epoch}", disable=rank != 0, file=sys.stderr):
            images, labels = images.to(device), labels.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = criterion(as_logits(network(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step_update(epoch * len(loader) + batches + 1)
            total_loss += loss.item()
            batches += 1
        if rank == 0:
            record = dict(epoch=epoch, train_loss=total_loss / max(batches, 1), lr=optimizer.param_groups[0]["lr"],
                          seconds=round(time.time() - started, 1))
            record.update(validate(model, val_loader, config))
            save(args, model, optimizer, scheduler, scaler, epoch, config, record)
            print(json.dumps(record), file=sys.stderr)
    report_replicas(model, world_size, rank)
    return 0


def validate(model: nn.Module, loader: DataLoader, config: ATSConfig) -> dict:
    """Top-1 and mean GFLOPs of the patched model on ``loader``; the model stays patched."""
    row = evaluate(model, loader, [config], repeats=1, progress=False)[0]
    ats.patch(model, config)
    return dict(top1=row.top1, gflops=row.gflops)


def save(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: CosineLRScheduler,
         scaler: torch.amp.GradScaler, epoch: int, config: ATSConfig, record: dict) -> None:
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 scaler=scaler.state_dict(), epoch=epoch, config=config.describe(),
                 args={key: str(value) for key, value in vars(args).items() if key != "func"})
    save_atomic(state, args.out / CHECKPOINT)
    save_atomic(model.state_dict(), args.out / WEIGHTS)
    with open(args.out / LOG, "a") as log:
        log.write(json.dumps(record) + "\n")


def report_replicas(model: nn.Module, world_size: int, rank: int) -> Optional[list]:
    """With several processes, gather a checksum of every replica's parameters; rank 0 prints them and
    fails if they differ (they must not: DDP keeps the replicas identical)."""
    if world_size == 1:
        return None
    checksum = torch.stack([parameter.detach().double().sum() for parameter in model.parameters()]).sum()
    gathered = [torch.zeros((), dtype=torch.float64, device=checksum.device) for _ in range(world_size)]
    dist.all_gather(gathered, checksum)
    values = [float(value) for value in gathered]
    if rank == 0:
        print(f"replica checksums: {json.dumps(values)}", file=sys.stderr)
        if len(set(values)) != 1:
            raise RuntimeError(f"the replicas' parameters differ after training: {values}")
    return values


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ats.train", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"ats train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
