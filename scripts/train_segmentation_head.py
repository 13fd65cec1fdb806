"""Train the segmentation head of the cluttered reference ViT (CPU, seeded, resumable).

The backbone (``ats.reference.load_reference_cluttered``) stays frozen and unpatched: its normed token map
``forward_features`` [B, 197, 96] of --train-size training canvases (Fashion-MNIST's training images, Debian's
``dataset-fashion-mnist`` or --fashion-root) and of the first --val-size test canvases is computed once and cached
in --out-dir in chunks of 1000 (fp16; a rerun skips the chunks it has). The head
(``ats.models.segmentation_head.PatchSegmentationHead``) then trains on the cached maps with AdamW and a cosine
schedule; each epoch's test mIoU goes to ``log.jsonl`` and a checkpoint to ``last.pt``, from which a rerun of the
same command resumes. --export writes the head's fp16 state dict. See docs/reference-model.md for the command
and the measured mIoU.

    python scripts/train_segmentation_head.py --fashion-root /usr/share/datasets/fashion-mnist \
        --out-dir .train-ref/segmentation --export checkpoints/reference-cluttered-segmentation.pt
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ats.data.cluttered import TEST_SEED
from ats.data.cluttered_segmentation import ClutteredSegmentation, confusion, mean_iou
from ats.data.fashion_mnist import DEBIAN_FASHION_MNIST, bundled_test_set, read_fashion_mnist
from ats.reference import create_reference_segmentation_head, load_reference_cluttered
from ats.reference.checkpoints import save_atomic

CHUNK = 1000


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-root", type=Path, default=DEBIAN_FASHION_MNIST,
                        help="the folder of Fashion-MNIST's training files (train-images-idx3-ubyte.gz, ...)")
    parser.add_argument("--out-dir", type=Path, default=Path(".train-ref/segmentation"))
    parser.add_argument("--train-size", type=int, default=12000, help="training canvases (seed 0), a multiple of 1000")
    parser.add_argument("--val-size", type=int, default=1000, help="the first test canvases, for the per-epoch mIoU")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", type=Path, help="write the trained head's fp16 state dict here")
    return parser.parse_args(argv)


@torch.no_grad()
def cached_features(model: torch.nn.Module, data: Dataset, folder: Path, name: str) -> Tuple[torch.Tensor, ...]:
    """The token maps fp16 [N, 197, C] and patch labels [N, 14, 14] of ``data``, computed in chunks of CHUNK
    canvases, each saved once in ``folder`` (a rerun reads the chunks it has)."""
    features, labels = [], []
    for start in tqdm(range(0, len(data), CHUNK), desc=f"features ({name})", unit="chunk"):
        path = folder / f"{name}-{start // CHUNK:03d}.pt"
        if not path.is_file():
            chunk = Subset(data, range(start, min(start + CHUNK, len(data))))
            maps, masks = [], []
            for images, mask in DataLoader(chunk, batch_size=250):
                maps.append(model.forward_features(images).half())
                masks.append(mask.to(torch.uint8))
            save_atomic((torch.cat(maps), torch.cat(masks)), path)
        chunk_features, chunk_labels = torch.load(path)
        features.append(chunk_features)
        labels.append(chunk_labels.long())
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def evaluate(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """The head's mIoU (percent) on cached token maps."""
    head.eval()
    matrix = sum(confusion(head(features[i:i + 500].float()).argmax(dim=1), labels[i:i + 500])
                 for i in range(0, len(features), 500))
    return mean_iou(matrix)


def main(argv: Optional[list] = None) -> None:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = load_reference_cluttered()
    train_images, train_labels = read_fashion_mnist(args.fashion_root, "train")
    train = Subset(ClutteredSegmentation(train_images, train_labels, seed=0), range(args.train_size))
    test = bundled_test_set()
    val = Subset(ClutteredSegmentation(test.images, test.labels, seed=TEST_SEED), range(args.val_size))
    train_x, train_y = cached_features(model, train, args.out_dir, "train")
    val_x, val_y = cached_features(model, val, args.out_dir, "val")

    head = create_reference_segmentation_head()
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / (args.epochs * steps_per_epoch))))
    checkpoint, log = args.out_dir / "last.pt", args.out_dir / "log.jsonl"
    first_epoch = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        first_epoch = state["epoch"]
        torch.set_rng_state(state["rng"])
    for epoch in range(first_epoch, args.epochs):
        started = time.time()
        head.train()
        order = torch.randperm(len(train_x))
        total = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            loss = F.cross_entropy(head(train_x[batch].float()), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        miou = evaluate(head, val_x, val_y)
        record = dict(epoch=epoch, loss=total / len(train_x), val_miou=round(miou, 2),
                      seconds=round(time.time() - started, 1))
        print(json.dumps(record), flush=True)
        with log.open("a") as file:
            file.write(json.dumps(record) + "\n")
        save_atomic(dict(head=head.state_dict(), optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                         epoch=epoch + 1, rng=torch.get_rng_state()), checkpoint)
    if args.export is not None:
        save_atomic({name: value.half() for name, value in head.state_dict().items()}, args.export)
        print(f"exported {args.export}")


if __name__ == "__main__":
    main()
