"""`ats train`: fine-tune a model with ATS, on one process or many.

Under ``torchrun --nproc_per_node N -m ats train ...`` every process trains a DistributedDataParallel
replica on its shard of the data (NCCL on CUDA, gloo on CPU); only rank 0 evaluates, writes
checkpoints and the log, and shows the progress bar. AdamW, cosine schedule with warm-up, label
smoothing, mixed precision on CUDA. A checkpoint at the end of every epoch and, inside an epoch,
every ``--checkpoint-minutes`` (and ``--checkpoint-every`` steps); ``--resume`` continues from the
last one exactly (``ats.commands.resume``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import ats

from ..adapters import as_logits, data_config, depth_of
from ..data.build import build_dataset, training_set
from ..data.distributed import make_loader, torchrun_processes
from ..data.skipped import SkippedImages, collate_usable
from ..methods import ATSConfig, EViTConfig, PatchConfig
from ..methods.stacked import with_ats_options
from ..reference.checkpoints import save_atomic
from .evaluate import evaluate
from .options import (
    add_config_arguments,
    add_max_bad_argument,
    add_model_arguments,
    config_flags_given,
    configs_from_arguments,
    load_model,
    require_data,
)
from .resume import CheckpointClock, ResumableSampler, restore_rng_states, rng_states

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
    add_max_bad_argument(data)
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
    parser.add_argument("--checkpoint-minutes", type=float, default=15.0, metavar="M",
                        help="inside an epoch, write a checkpoint when M minutes have passed since the last "
                             "(default 15; 0: only at the end of each epoch)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                        help="inside an epoch, also write a checkpoint every STEPS steps (default 0: off)")
    parser.add_argument("--export", type=Path, metavar="FILE",
                        help="at the end, also write the weights as an fp16 state dict (what --checkpoint takes)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)


def training_config(args: argparse.Namespace, depth: int) -> PatchConfig:
    """The one config to train with: the flags' only config, or multi-stage rho = 1 (the paper's
    K = number of input tokens) when none is given."""
    given = config_flags_given(args)
    configs = configs_from_arguments(args, depth) if given else [ATSConfig.multi_stage(1.0, depth=depth)]
    if len(configs) != 1:
        raise ValueError(f"training takes one config, got {len(configs)}: give one of --multi-stage, "
                         "--single-stage, --blocks, --merge or --keep-all, and at most one --evit")
    if args.stochastic and isinstance(configs[0], EViTConfig):
        raise ValueError(f"--stochastic changes how ATS samples; {configs[0].describe()} has no ATS blocks")
    return with_ats_options(configs[0], stochastic=True) if args.stochastic else configs[0]


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
    with torchrun_processes(args.device) as processes:
        args.device = processes.device
        return train(args, rank=processes.rank, world_size=processes.world_size)


def train(args: argparse.Namespace, rank: int, world_size: int) -> int:
    torch.manual_seed(args.seed)
    model = load_model(args)
    require_data(args, model, "train")
    device = next(model.parameters()).device
    config = training_config(args, depth_of(model))
    ats.patch(model, config, static=args.static)

    dataset = training_set(args.data, data_config(model))
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    sampler = ResumableSampler(DistributedSampler(dataset, world_size, rank, shuffle=True, seed=args.seed))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        drop_last=len(dataset) >= args.batch_size * world_size, collate_fn=collate_usable,
                        generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch = len(loader)
    val_loader = make_loader(build_dataset(args.val_data, data_config(model), args.val_limit), 250, args.workers) \
        if rank == 0 else None

    network: nn.Module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=args.min_lr, warmup_t=int(
        args.warmup_epochs * steps_per_epoch), warmup_lr_init=args.min_lr, t_in_epochs=False)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    position = EpochProgress(epoch=0, step=0)
    if args.resume:
        state = torch.load(args.out / CHECKPOINT, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        position = EpochProgress(**state.get("progress", dict(epoch=state["epoch"], step=steps_per_epoch)))
        if position.step >= steps_per_epoch:
            position = EpochProgress(epoch=position.epoch + 1, step=0)
        if "rng" in state:
            restore_rng_states(state["rng"], rank, world_size)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        start = f"epochs {position.epoch}..{args.epochs - 1}" + (f" from step {position.step}" if position.step else "")
        print(f"training {config.describe()} on {len(dataset)} images, {world_size} process(es), {start}",
              file=sys.stderr)

    clock = CheckpointClock(args.checkpoint_every, args.checkpoint_minutes, world_size, device)
    trainer = Trainer(args, model, optimizer, scheduler, scaler, config, rank, world_size,
                      nn.CrossEntropyLoss(label_smoothing=args.label_smoothing))
    for epoch in range(position.epoch, args.epochs):
        started = time.time()
        progress = position if epoch == position.epoch else EpochProgress(epoch=epoch, step=0)
        sampler.set_epoch(epoch, skip=progress.step * args.batch_size)
        network.train()
        skipped = SkippedImages(len(dataset) // world_size, args.max_bad, names=progress.skipped)
        for batch in tqdm(loader, desc=f"epoch {epoch}", disable=rank != 0, file=sys.stderr, initial=progress.step,
                          total=steps_per_epoch):
            skipped.note(batch)
            progress.step += 1
            if len(batch[1]) == 0:
                if world_size > 1:
                    raise ValueError(f"rank {rank}: every image of a batch was unusable, so this process cannot "
                                     "take part in the step; fix or remove the images named above")
            else:
                progress.loss += trainer.step(network, batch[0].to(device), batch[1].to(device))
                progress.batches += 1
            scheduler.step_update(epoch * steps_per_epoch + progress.step)
            if progress.step < steps_per_epoch and clock.due(progress.step):
                trainer.save(progress)
                clock.saved()
        record = dict(epoch=epoch, train_loss=progress.loss / max(progress.batches, 1),
                      lr=optimizer.param_groups[0]["lr"], seconds=round(time.time() - started, 1),
                      skipped=len(skipped))
        if rank == 0:
            record.update(validate(model, val_loader, config, args.max_bad, args.static))
        trainer.save(progress, record)
        clock.saved()
        if rank == 0:
            print(json.dumps(record), file=sys.stderr)
    if rank == 0 and args.export is not None:
        save_atomic({name: tensor.half() for name, tensor in model.state_dict().items()}, args.export)
        print(f"wrote {args.export}", file=sys.stderr)
    report_replicas(model, world_size, rank)
    return 0


def validate(model: nn.Module, loader: DataLoader, config: PatchConfig, max_bad: float, static: bool = False) -> dict:
    """Top-1 and mean GFLOPs of the patched model on ``loader``; the model stays patched."""
    row = evaluate(model, loader, [config], repeats=1, progress=False, max_bad=max_bad, static=static)[0]
    ats.patch(model, config, static=static)
    return dict(top1=row.top1, gflops=row.gflops, val_skipped=row.skipped)


@dataclass
class EpochProgress:
    """Where a run is inside an epoch: steps done (batches drawn), the loss summed over the batches
    trained, and the images skipped so far."""

    epoch: int
    step: int
    loss: float = 0.0
    batches: int = 0
    skipped: List[str] = field(default_factory=list)


@dataclass
class Trainer:
    """One process's training state: a step of it, and writing it as a checkpoint (every process gives
    its random states, rank 0 writes). Mixed precision on CUDA."""

    args: argparse.Namespace
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler
    config: PatchConfig
    rank: int
    world_size: int
    criterion: nn.Module

    def step(self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimiser step of ``network`` (the model, or its DDP wrapper) on a batch; returns the loss."""
        with torch.autocast(images.device.type, dtype=torch.float16, enabled=self.scaler.is_enabled()):
            loss = self.criterion(as_logits(network(images)), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

    def save(self, progress: EpochProgress, record: Optional[dict] = None) -> None:
        """Write the checkpoint (and, at the end of an epoch, the weights and the log line ``record``)."""
        rng = rng_states(self.world_size)
        if self.rank != 0:
            return
        args = self.args
        state = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                     scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), epoch=progress.epoch,
                     progress=asdict(progress), rng=rng, config=self.config.describe(),
                     args={key: str(value) for key, value in vars(args).items() if key != "func"})
        save_atomic(state, args.out / CHECKPOINT)
        if record is not None:
            save_atomic(self.model.state_dict(), args.out / WEIGHTS)
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
