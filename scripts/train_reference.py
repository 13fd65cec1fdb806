"""Train a reference model (the ViT; --arch cvt or psvit) on Fashion-MNIST (CPU, seeded, resumable).

Phases of ordinary supervised training (progressive resizing): most epochs at 14x14 input (a quarter
of the tokens, or for PS-ViT a quarter of the feature map, cheap), then a few at the full 28x28, the
ViT's position embedding resampled in between (CvT and PS-ViT have none). A checkpoint is written
every --checkpoint-minutes and at the end of every epoch; rerunning the same command resumes from it,
mid-epoch included. See docs/reference-model.md for the exact commands and the measured accuracy.

    python scripts/train_reference.py --img-size 14 --epochs 10 --out-dir .train-ref/low
    python scripts/train_reference.py --img-size 28 --epochs 2 --init .train-ref/low/last.pt \
        --out-dir .train-ref/full --export src/ats/assets/reference_vit_fmnist.pt
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from tqdm import tqdm

from ats.checkpoints import save_atomic
from ats.datasets import bundled_test_set, fashion_mnist_train, normalise
from ats.reference import create_reference_cvt, create_reference_model, create_reference_psvit

ARCHITECTURES = ("vit", "cvt", "psvit")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="vit", help="the reference ViT, CvT or PS-ViT")
    parser.add_argument("--img-size", type=int, default=28, help="training resolution (14 or 28)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=1e-5)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--init", type=Path, help="start from this checkpoint (position embedding resampled)")
    parser.add_argument("--out-dir", type=Path, required=True, help="checkpoints and log; resumes from last.pt")
    parser.add_argument("--export", type=Path, help="write the final fp16 state dict here")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster on CPUs with AMX)")
    parser.add_argument("--limit", type=int, help="train on the first N images only")
    parser.add_argument("--checkpoint-minutes", type=float, default=15.0,
                        help="also write a checkpoint inside an epoch this often")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 28, 28] -> normalised float [N, 1, size, size]."""
    images = normalise(images)[:, None]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (1/14 of the side) and horizontal flip. images: [B, 1, S, S]."""
    batch, _, size, _ = images.shape
    pad = max(1, size // 14)
    padded = F.pad(images, (pad, pad, pad, pad), value=float(images.min()))
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator)
    steps = torch.arange(size)
    rows = (offsets[0][:, None] + steps)[:, :, None]
    cols = (offsets[1][:, None] + steps)[:, None, :]
    crops = padded[torch.arange(batch)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(batch, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


def create(arch: str, img_size: int) -> torch.nn.Module:
    if arch == "cvt":
        return create_reference_cvt()
    return (create_reference_psvit if arch == "psvit" else create_reference_model)(img_size=img_size)


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    output = model(images)
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.inference_mode()
def test_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((logits_of(model, chunk).argmax(-1) == target).sum())
                  for chunk, target in zip(images.split(500), labels.split(500)))
    model.train()
    return 100.0 * correct / len(labels)


def load_init(model: torch.nn.Module, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = {name: tensor.float() for name, tensor in state.get("model", state).items()}
    if "pos_embed" in state:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid), num_prefix_tokens=1)
    model.load_state_dict(state)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    train = fashion_mnist_train()
    train_images, train_labels = resized(train.images, args.img_size), train.labels
    if args.limit:
        train_images, train_labels = train_images[:args.limit], train_labels[:args.limit]
    test = bundled_test_set()
    test_images, test_labels = resized(test.images, args.img_size), test.labels

    model = create(args.arch, args.img_size)
    if args.init:
        load_init(model, args.init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_labels) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return (args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / args.lr

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(args.seed)
    last = args.out_dir / "last.pt"
    position = dict(epoch=0, step=0, order=None, losses=[], seconds=0.0)
    if last.is_file():
        checkpoint = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        generator.set_state(checkpoint["generator"])
        torch.set_rng_state(checkpoint["torch_rng"])
        position = checkpoint["position"] if "position" in checkpoint else dict(position, epoch=checkpoint["epoch"] + 1)
        print(f"resumed from {last} at epoch {position['epoch']}, step {position['step']}")

    def save(position: dict) -> None:
        save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         generator=generator.get_state(), torch_rng=torch.get_rng_state(), position=position,
                         args=vars(args)), last)

    model.train()
    for epoch in range(position["epoch"], args.epochs):
        started, saved = time.time(), time.time()
        if position["order"] is None:
            position = dict(epoch=epoch, step=0, order=torch.randperm(len(train_labels), generator=generator),
                            losses=[], seconds=0.0)
        order, losses = position["order"], position["losses"]
        for step in tqdm(range(position["step"], steps_per_epoch), desc=f"epoch {epoch}", mininterval=30,
                         initial=position["step"], total=steps_per_epoch):
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            images = augment(train_images[index], generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = logits_of(model, images)
            loss = F.cross_entropy(logits.float(), train_labels[index], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if time.time() - saved > 60 * args.checkpoint_minutes and step + 1 < steps_per_epoch:
                save(dict(epoch=epoch, step=step + 1, order=order, losses=losses,
                          seconds=position["seconds"] + time.time() - started))
                saved = time.time()
        top1 = test_accuracy(model, test_images, test_labels)
        record = dict(epoch=epoch, img_size=args.img_size, train_loss=sum(losses) / len(losses), test_top1=top1,
                      lr=scheduler.get_last_lr()[0], seconds=round(position["seconds"] + time.time() - started, 1))
        print(json.dumps(record), flush=True)
        with open(args.out_dir / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        position = dict(epoch=epoch + 1, step=0, order=None, losses=[], seconds=0.0)
        save(position)

    if args.export:
        args.export.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({name: tensor.half() for name, tensor in model.state_dict().items()}, args.export)
        print(f"wrote {args.export}")


if __name__ == "__main__":
    main()
