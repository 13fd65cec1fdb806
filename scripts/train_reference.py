"""Train a reference model (the ViT; --arch cvt, psvit, video or xvit) on Fashion-MNIST (CPU, seeded, resumable).

Phases of ordinary supervised training (progressive resizing): most epochs at 14x14 input (a quarter
of the tokens, cheap; PS-ViT samples a 7x7 grid of points from its 7x7 feature map, a quarter of its tokens too),
then a few at the full 28x28, the ViT's position embedding resampled in between (CvT has none; PS-ViT's position
encoding is a linear map of the sampled points, so its weights fit both grids). The video models (TimeSformer,
XViT) train on moving-garment clips at its own size, rendered batch by batch with fresh motion and clutter every epoch
(1000 * --seed + the epoch is the clips' seed); it is tested on the first --test-limit test clips.
--reverse-twins and --time-sincos are the TimeSformer's recipe for reading the frames' order. A checkpoint is
written every --checkpoint-minutes and at the end of every epoch; rerunning the same command resumes from it,
mid-epoch included. See docs/reference-model.md for the exact commands and the measured accuracy.

    python scripts/train_reference.py --img-size 14 --epochs 10 --out-dir .train-ref/low
    python scripts/train_reference.py --img-size 28 --epochs 2 --init .train-ref/low/last.pt \
        --out-dir .train-ref/full --export src/ats/reference/weights/reference_vit_fmnist.pt
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple

import numpy
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.layers import resample_abs_pos_embed
from tqdm import tqdm

from ats.adapters import data_config
from ats.data.build import clip_spec
from ats.data.cluttered import cluttered_test, render_canvas
from ats.data.fashion_mnist import bundled_test_set, fashion_mnist_train, normalise
from ats.data.moving_garments import TEST_SEED, ClipSpec, render_clip, split_labels
from ats.reference import (
    create_reference_cluttered,
    create_reference_cvt,
    create_reference_model,
    create_reference_psvit,
    create_reference_video,
    create_reference_xvit,
)
from ats.reference.checkpoints import save_atomic

ARCHITECTURES = ("vit", "cluttered", "cvt", "psvit", "video", "xvit")
VIDEO_ARCHITECTURES = ("video", "xvit")


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="vit",
                        help="the reference ViT, the ViT on cluttered canvases, CvT, PS-ViT, TimeSformer (video) or "
                             "XViT")
    parser.add_argument("--img-size", type=int, default=28,
                        help="training resolution (images: 14 or 28; cluttered canvases: 28 or 56)")
    parser.add_argument("--heads", type=int, help="attention heads of the ViTs (default: the model's own, 3 or 6)")
    parser.add_argument("--conv-stem", action="store_true",
                        help="--arch cluttered: a convolutional stem instead of the linear patch embedding")
    parser.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the ViTs")
    parser.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (timm's Mixup; 0: off)")
    parser.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (timm's Mixup; 0: off)")
    parser.add_argument("--erase", type=float, default=0.0, help="random erasing probability (timm's; 0: off)")
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
    parser.add_argument("--limit", type=int, help="train on the first N images (or clips) only")
    parser.add_argument("--test-limit", type=int, help="test on the first N test images or clips (default: all "
                                                        "images, 2,000 clips)")
    parser.add_argument("--checkpoint-minutes", type=float, default=15.0,
                        help="also write a checkpoint inside an epoch this often")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reverse-twins", action="store_true",
                        help="video models: train on every clip and on its frames played backwards (the direction "
                             "label flipped), so twins that differ only in the frames' order share each step (the "
                             "batch doubles)")
    parser.add_argument("--time-sincos", type=float, metavar="AMPLITUDE",
                        help="--arch video: after --init, set the TimeSformer's time embeddings to a sinusoid table of "
                             "this amplitude (zeros at transformers' initialisation, and still ~0.3 in norm after "
                             "training, against ~2.5 for a patch embedding: too faint for attention to tell frames "
                             "apart by position, so the model stays blind to their order)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds shuffling and augmentation; canvases and clips are rendered with seed "
                             "1000 * SEED + epoch, so another seed (a further phase) draws fresh ones")
    return parser.parse_args(argv)


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, S, S] (images or canvases) -> normalised float [N, 1, size, size]."""
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


class ImageData:
    """Fashion-MNIST at ``size`` (augmented in training), held in memory."""

    def __init__(self, size: int, limit: Optional[int], test_limit: Optional[int]) -> None:
        train, test = fashion_mnist_train(), bundled_test_set()
        self.images, self.labels = resized(train.images[:limit], size), train.labels[:limit]
        self.test_images, self.test_labels = resized(test.images[:test_limit], size), test.labels[:test_limit]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, render_seed: int,
              generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        return augment(self.images[index], generator), self.labels[index]

    def test_batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return zip(self.test_images.split(500), self.test_labels.split(500))


class CanvasData:
    """Cluttered Fashion-MNIST canvases (``ats.data.cluttered``) at ``size``: training canvases of Fashion-MNIST's
    training images rendered per batch with ``render_seed`` (1000 * --seed + the epoch: fresh positions and clutter
    every epoch) and flipped at random; the test canvases of the bundled test images, rendered once."""

    def __init__(self, size: int, limit: Optional[int], test_limit: Optional[int]) -> None:
        train, test = fashion_mnist_train(), cluttered_test()
        self.size, self.images, self.labels = size, train.images[:limit], train.labels[:limit]
        count = min(test_limit or len(test), len(test))
        canvases = torch.stack([render_canvas(test.images, test.labels, index, test.spec, test.seed)[0]
                                for index in range(count)])
        self.test_images, self.test_labels = resized(canvases, size), test.labels[:count]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, render_seed: int,
              generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        canvases = torch.stack([render_canvas(self.images, self.labels, int(i), seed=render_seed)[0] for i in index])
        images = resized(canvases, self.size)
        flip = torch.rand(len(images), generator=generator) < 0.5
        return torch.where(flip[:, None, None, None], images.flip(-1), images), self.labels[index]

    def test_batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return zip(self.test_images.split(500), self.test_labels.split(500))


class ClipData:
    """Moving-garment clips of Fashion-MNIST's training images, rendered per batch with ``render_seed`` (1000 *
    --seed + the epoch), each with its reversal when ``reverse_twins``; the test clips of the bundled test images."""

    def __init__(self, spec: ClipSpec, limit: Optional[int], test_limit: Optional[int],
                 reverse_twins: bool = False) -> None:
        train, test = fashion_mnist_train(), bundled_test_set()
        self.spec, self.images, self.labels = spec, train.images[:limit], train.labels[:limit]
        self.reverse_twins = reverse_twins
        self.test_images, self.test_labels = test.images, test.labels
        self.test_count = min(test_limit or 2000, len(test.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def clips(self, images: torch.Tensor, labels: torch.Tensor, indices: Iterable[int],
              seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Clips [N, T, 1, H, W] normalised and their labels [N]."""
        rendered = [render_clip(images, labels, int(index), self.spec, seed) for index in indices]
        clips = normalise(torch.stack([clip for clip, _ in rendered])[:, :, None])
        return clips, torch.tensor([label for _, label in rendered])

    def batch(self, index: torch.Tensor, render_seed: int,
              generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Clips [B, T, 1, H, W] and labels [B]; with ``reverse_twins`` [2B, ...]: the clips, then each played
        backwards (a clip of the same garment moving the other way: label ^ 1 flips the direction bit)."""
        clips, labels = self.clips(self.images, self.labels, index, render_seed)
        if not self.reverse_twins:
            return clips, labels
        return torch.cat([clips, clips.flip(1)]), torch.cat([labels, labels ^ 1])

    def test_batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.test_count, 100):
            indices = range(start, min(start + 100, self.test_count))
            yield self.clips(self.test_images, self.test_labels, indices, TEST_SEED)


def create(arch: str, img_size: int, heads: Optional[int], drop_path: float, conv_stem: bool) -> torch.nn.Module:
    vit_options = dict(drop_path_rate=drop_path, **(dict(num_heads=heads) if heads else {}))
    if conv_stem and arch != "cluttered":
        raise SystemExit("--conv-stem is an option of --arch cluttered only")
    if arch == "cluttered":
        return create_reference_cluttered(conv_stem, img_size=img_size, **vit_options)
    if arch == "cvt":
        return create_reference_cvt()
    if arch == "video":
        return create_reference_video()
    if arch == "xvit":
        return create_reference_xvit()
    if arch == "psvit":
        return create_reference_psvit(img_size=img_size, num_points=img_size // 2)
    return create_reference_model(img_size=img_size, **vit_options)


def model_classes(model: torch.nn.Module) -> int:
    return model.num_classes if hasattr(model, "num_classes") else model.config.num_labels


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    output = model(images)
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.inference_mode()
def test_accuracy(model: torch.nn.Module, data) -> dict:
    """Test top-1 in percent; for clips also the garment's and the direction's accuracy (label = garment * 2 +
    direction), which show whether a video model uses the frames' order (direction alone: 50% by chance)."""
    model.eval()
    predictions, targets = [], []
    for inputs, labels in data.test_batches():
        predictions.append(logits_of(model, inputs).argmax(-1))
        targets.append(labels)
    model.train()
    predicted, labels = torch.cat(predictions), torch.cat(targets)
    accuracy = dict(test_top1=100.0 * float((predicted == labels).float().mean()))
    if isinstance(data, ClipData):
        (garment, direction), (true_garment, true_direction) = split_labels(predicted), split_labels(labels)
        accuracy.update(test_garment=100.0 * float((garment == true_garment).float().mean()),
                        test_direction=100.0 * float((direction == true_direction).float().mean()))
    return accuracy


def load_init(model: torch.nn.Module, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = {name: tensor.float() for name, tensor in state.get("model", state).items()}
    if "pos_embed" in state:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid), num_prefix_tokens=1)
    model.load_state_dict(state)


def sincos_table(positions: int, width: int) -> torch.Tensor:
    """The Transformer's sinusoid position table [positions, width]: sin and cos of position / 10000^(2i/width)."""
    angles = torch.arange(positions)[:, None] / 10000 ** (torch.arange(0, width, 2) / width)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :width]


def main(argv: Optional[list] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    numpy.random.seed(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    if args.reverse_twins and args.arch not in VIDEO_ARCHITECTURES:
        raise SystemExit(f"--reverse-twins is an option of the video models ({', '.join(VIDEO_ARCHITECTURES)}) only")
    if args.time_sincos is not None and args.arch != "video":
        raise SystemExit("--time-sincos is an option of --arch video (the TimeSformer) only")
    model = create(args.arch, args.img_size, args.heads, args.drop_path, args.conv_stem)
    if args.arch in VIDEO_ARCHITECTURES:
        data = ClipData(clip_spec(data_config(model)), args.limit, args.test_limit, args.reverse_twins)
    elif args.arch == "cluttered":
        data = CanvasData(args.img_size, args.limit, args.test_limit)
    else:
        data = ImageData(args.img_size, args.limit, args.test_limit)
    if args.init:
        load_init(model, args.init)
    if args.time_sincos is not None:
        time_embeddings = model.timesformer.embeddings.time_embeddings
        with torch.no_grad():
            time_embeddings.copy_(args.time_sincos * sincos_table(*time_embeddings.shape[1:])[None])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(data) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return (args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / args.lr

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing,
                  num_classes=model_classes(model)) if args.mixup or args.cutmix else None
    erase = RandomErasing(args.erase, mode="pixel", device="cpu") if args.erase else None
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
            position = dict(epoch=epoch, step=0, order=torch.randperm(len(data), generator=generator),
                            losses=[], seconds=0.0)
        order, losses = position["order"], position["losses"]
        for step in tqdm(range(position["step"], steps_per_epoch), desc=f"epoch {epoch}", mininterval=30,
                         initial=position["step"], total=steps_per_epoch):
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            inputs, labels = data.batch(index, 1000 * args.seed + epoch, generator)
            if erase is not None:
                inputs = erase(inputs)
            targets = labels
            if mixup is not None:
                even = len(labels) // 2 * 2  # mixup pairs the batch with its reverse
                inputs, targets = mixup(inputs[:even], labels[:even])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = logits_of(model, inputs)
            loss = F.cross_entropy(logits.float(), targets,
                                   label_smoothing=0.0 if mixup is not None else args.label_smoothing)
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
        record = dict(epoch=epoch, img_size=args.img_size, train_loss=sum(losses) / len(losses),
                      **test_accuracy(model, data), lr=scheduler.get_last_lr()[0],
                      seconds=round(position["seconds"] + time.time() - started, 1))
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
