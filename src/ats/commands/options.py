"""Flags shared by the commands: which model to load and which ATS configs to run."""
from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import List, Optional, Tuple, Union
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from ..adapters import data_config, unwrapped
from ..data.build import knows_bundled_classes
from ..data.skipped import DEFAULT_MAX_BAD
from ..methods import (
    ATSConfig,
    EViTConfig,
    KeepAllConfig,
    MergeConfig,
    PatchConfig,
    SAINTConfig,
    StackedConfig,
    TokenBudget,
    method_list,
)
from ..methods.adaptive_sampling import PAPER_KS, PAPER_RHOS, SAMPLERS, SCORES
from ..methods.evit import EVIT_BLOCKS
from ..methods.saint import SAINT_GAMMA, SAINT_K

REFERENCE = "reference"
#: The models trained here on Fashion-MNIST, by --model name; they load their bundled weights and run on the
#: bundled test set.
REFERENCE_MODELS = (REFERENCE, "reference-cluttered", "reference-cvt", "reference-psvit", "reference-video",
                    "reference-xvit")
#: ``--model hf:DIR`` names a transformers model saved with save_pretrained (or, with --pretrained, a hub name).
HF_PREFIX = "hf:"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=REFERENCE,
                       help="a timm model name (e.g. deit_small_patch16_224); hf:DIR, a Hugging Face ViT, DeiT, "
                            "DINOv2, CvT or TimeSformer saved with save_pretrained; 'reference' for the bundled "
                            "Fashion-MNIST ViT (default), 'reference-cluttered' for the ViT on cluttered Fashion-MNIST "
                            "(checkpoints/ in the repository), 'reference-cvt' or 'reference-psvit' for the bundled "
                            "CvT or PS-ViT, 'reference-video' or 'reference-xvit' for the TimeSformer or XViT on "
                            "moving-garment clips; open_clip:NAME[:TAG] for the image tower of an open_clip model "
                            "(e.g. open_clip:ViT-B-16, its weights with :TAG, e.g. :openai), torchvision:NAME for a "
                            "torchvision ViT (e.g. torchvision:vit_b_16)")
    group.add_argument("--pretrained", action="store_true",
                       help="load timm's pretrained weights, or with hf:NAME the model NAME from the Hugging Face "
                            "hub (downloads them on first use)")
    group.add_argument("--checkpoint", type=Path, help="load weights from this checkpoint file")
    group.add_argument("--num-classes", type=int, metavar="N",
                       help="the classifier's outputs, for a checkpoint fine-tuned with another head (a timm name or "
                            "hf:DIR; default: the model's own)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (default: cuda if available, else cpu)")


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model the flags name, in eval mode on ``args.device``."""
    from ..reference import (
        load_reference_cluttered,
        load_reference_cvt,
        load_reference_model,
        load_reference_psvit,
        load_reference_video,
        load_reference_xvit,
    )
    from ..reference.checkpoints import load_weights

    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint file {args.checkpoint} does not exist; pass the path of a "
                                "saved state dict or training checkpoint")
    num_classes = getattr(args, "num_classes", None)
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"--num-classes must be at least 1, got {num_classes}")
    if args.model.startswith(HF_PREFIX):
        if args.pretrained:
            require_hub(args.model[len(HF_PREFIX):])
        model = load_hf_model(args.model[len(HF_PREFIX):], download=args.pretrained, num_classes=num_classes)
    elif args.model.startswith(("open_clip:", "torchvision:")):
        model = load_package_model(args.model, args.pretrained)
    elif args.model in REFERENCE_MODELS:
        if args.pretrained:
            raise ValueError("--pretrained needs a timm model name (--model deit_small_patch16_224); the "
                             "reference models always load their bundled weights")
        if num_classes is not None:
            raise ValueError("--num-classes applies to a timm name or hf:DIR; the reference models have their "
                             "bundled heads (10 classes)")
        loaders = dict(zip(REFERENCE_MODELS, (load_reference_model, load_reference_cluttered, load_reference_cvt,
                                              load_reference_psvit, load_reference_video, load_reference_xvit)))
        model = loaders[args.model](args.checkpoint)
    else:
        if args.model not in timm.list_models():
            raise ValueError(f"unknown timm model {args.model!r}; see timm.list_models('deit*') or "
                             "timm.list_models('vit*') for names")
        if args.pretrained:
            require_hub(args.model)
        try:
            model = timm.create_model(args.model, pretrained=args.pretrained,
                                      **({} if num_classes is None else dict(num_classes=num_classes)))
        except FileNotFoundError as error:  # what huggingface_hub raises for weights neither cached nor fetched
            raise ValueError(f"--pretrained: {args.model}'s weights are not in the local Hugging Face cache and "
                             "cannot be downloaded (HF_HUB_OFFLINE is set); unset it on a machine with network "
                             "access, or pass --checkpoint FILE") from error
    if args.checkpoint is not None and args.model not in REFERENCE_MODELS:
        load_weights(model, args.checkpoint)
    return model.to(args.device).eval()


def load_package_model(spec: str, pretrained: bool) -> nn.Module:
    """``open_clip:NAME[:TAG]``: the image tower of open_clip's model NAME (with TAG's weights, downloaded on first
    use; a tower that wraps a timm model, as SigLIP's, gives its trunk, which runs all but the wrapper's projection);
    ``torchvision:NAME``: torchvision's model NAME (its default weights with ``pretrained``)."""
    package, _, name = spec.partition(":")
    if package == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model {name!r}; e.g. torchvision:vit_b_16")
        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    try:
        import open_clip
    except ImportError:
        raise ValueError("--model open_clip:... needs open_clip: pip install 'ats-vit[open_clip]'") from None
    name, _, tag = name.partition(":")
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models(), e.g. open_clip:ViT-B-16")
    return unwrapped(open_clip.create_model(name, pretrained=tag or None).visual)[0]


#: How long ``require_hub`` waits for the Hugging Face hub to answer before saying it cannot be reached.
HUB_PROBE_SECONDS = 3.0


def require_hub(name: str) -> None:
    """A ValueError within HUB_PROBE_SECONDS when ``--pretrained`` would download ``name`` and the Hugging Face hub
    cannot be reached (downloads would otherwise retry for about a minute). With HF_HUB_OFFLINE set, nothing is
    probed: the weights come from the local cache, where ``load_model`` says when they are missing."""
    if hub_offline():
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError as error:
        raise ValueError(f"--pretrained downloads {name}'s weights from {host}, which cannot be reached ({error}); "
                         "connect to the network, set HF_HUB_OFFLINE=1 to use weights already in the local cache, "
                         "or pass --checkpoint FILE without --pretrained") from None


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE tells huggingface_hub to read its cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def random_weights(args: argparse.Namespace) -> bool:
    """Whether the flags give a model with random weights: a timm name with neither --pretrained nor --checkpoint."""
    return (args.model not in REFERENCE_MODELS and not args.model.startswith(HF_PREFIX) and not args.pretrained
            and args.checkpoint is None)


def load_hf_model(name: str, download: bool = False, num_classes: Optional[int] = None) -> nn.Module:
    """A transformers model from a save_pretrained directory ``name``, or with ``download`` from the hub; with
    ``num_classes``, its classifier re-made with that many outputs (for a checkpoint loaded next).

    The class is the one the config names when ATS supports it (so DeiT keeps its distillation head),
    else transformers' AutoModelForImageClassification.
    """
    try:
        import transformers
        from transformers.image_processing_utils import ImageProcessingMixin
    except ImportError:
        raise ValueError("--model hf:... needs Hugging Face transformers: pip install 'ats-vit[hf]'") from None
    from ..adapters import FAMILIES
    from ..adapters.family import owns

    local = Path(name).is_dir()
    if local and not (Path(name) / "config.json").is_file():
        raise FileNotFoundError(f"{name} holds no config.json; pass a folder written by model.save_pretrained(...)")
    if not local and not download:
        raise FileNotFoundError(f"hf:{name}: no such directory; pass a folder written by save_pretrained, or add "
                                f"--pretrained to download {name} from the Hugging Face hub")
    config = transformers.AutoConfig.from_pretrained(name, local_files_only=local)
    architecture = (config.architectures or [""])[0]
    named = getattr(transformers, architecture, None)
    supported = isinstance(named, type) and any(owns(family, named) for family in FAMILIES)
    model_class = named if supported else transformers.AutoModelForImageClassification
    head = {} if num_classes is None else dict(num_labels=num_classes, ignore_mismatched_sizes=True)
    model = model_class.from_pretrained(name, local_files_only=local, **head)
    if not local:
        try:  # fetch the preprocessing config into the cache, where data_config finds it
            ImageProcessingMixin.get_image_processor_dict(name)
        except OSError:
            pass
    return model


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "ATS configs (with none given: the paper's three multi-stage rho "
        f"{', '.join(map(str, PAPER_RHOS))} and single-stage K {', '.join(map(str, PAPER_KS))} at block 3)",
        description=f"The methods: {method_list()}.")
    group.add_argument("--multi-stage", type=float, action="append", default=[], metavar="RHO",
                       help="multi-stage ATS from block 3 to the last, K = max(floor(RHO * tokens_in), 8); "
                            "repeatable")
    group.add_argument("--stage-every", type=int, default=1, metavar="N",
                       help="--multi-stage configs sample in every N-th block from block 3 (default 1: every block)")
    group.add_argument("--single-stage", type=int, action="append", default=[], metavar="K",
                       help="single-stage ATS with K samples in block --stage-block; repeatable")
    group.add_argument("--stage-block", type=int, default=3, metavar="N",
                       help="the block of --single-stage configs (default 3)")
    group.add_argument("--blocks", action="append", default=[], metavar="SPEC",
                       help="a custom config: comma-separated BLOCK:K or FIRST-LAST:RHO, e.g. '3:108,6:56' "
                            "or '0-11:0.9'; repeatable")
    group.add_argument("--sampler", choices=SAMPLERS, default="inverse_transform",
                       help="inverse_transform (the paper's), topk (keep the K highest scores) or released (the "
                            "rule of the authors' released code, docs/method.md)")
    group.add_argument("--topk", action="store_true", help="the same as --sampler topk")
    group.add_argument("--score", choices=SCORES, default="auto",
                       help="what ATS scores tokens by (default auto: the class token's attention where the model "
                            "has one, else self-attention)")
    group.add_argument("--no-keep-cls", action="store_true", help="let the class token be dropped")
    group.add_argument("--min-kept", type=count_or_fraction, default=0, metavar="N",
                       help="a floor on the unique patch tokens each ATS block keeps, topped up by score: a count "
                            "(e.g. 64; 0: off) or a fraction of the patch tokens entering the block (e.g. 0.85)")
    group.add_argument("--fuse", action="store_true",
                       help="fold each dropped patch token into its most similar kept one (sizes carried)")
    group.add_argument("--distinct", type=float, default=0.0, metavar="COS",
                       help="also keep each dropped patch token less similar than COS (cosine of keys, e.g. 0.95) "
                            "to every kept one; use with --fuse (default 0: off)")
    group.add_argument("--packing", choices=("rows", "padded"), default="rows")
    add_static_argument(group)
    group.add_argument("--evit", type=float, action="append", default=[], metavar="KEEP_RATE",
                       help="EViT in the --evit-blocks, keeping ceil(KEEP_RATE * patch tokens) and fusing the rest "
                            "into one token; repeatable. With ATS flags too, each EViT config is stacked with each "
                            "ATS config (their blocks must not overlap, e.g. --evit 0.7 --blocks "
                            "4-5:0.7,7-8:0.7,10-11:0.7)")
    group.add_argument("--evit-blocks", type=block_list, default=EVIT_BLOCKS, metavar="I,J,..",
                       help=f"the blocks of --evit (default {','.join(map(str, EVIT_BLOCKS))})")
    group.add_argument("--merge", type=int, action="append", default=[], metavar="R",
                       help="the token-merging baseline (ToMe), R tokens merged in every block; repeatable; runs "
                            "alone (not stacked with --evit)")
    group.add_argument("--saint", type=float, action="append", default=[], metavar="THRESHOLD",
                       help="the SAINT baseline (similarity-aware token pruning): in the --saint-blocks, each image "
                            "drops as many tokens of the alternating set A as have at least --saint-k tokens of set B "
                            "THRESHOLD similar or more (cosine of keys, in (0, 1], e.g. 0.9), the most redundant; "
                            "repeatable; runs alone (not stacked)")
    group.add_argument("--saint-k", type=int, default=SAINT_K, metavar="K",
                       help=f"the similar set-B tokens that make a set-A token droppable (default {SAINT_K})")
    group.add_argument("--saint-gamma", type=float, default=SAINT_GAMMA, metavar="GAMMA",
                       help="how much closer matches outrank more matches when SAINT picks which tokens drop "
                            f"(default {SAINT_GAMMA:g})")
    group.add_argument("--saint-blocks", type=block_list, metavar="I,J,..",
                       help="the blocks of --saint (default: the first half of the model's blocks)")
    group.add_argument("--keep-all", type=int, action="append", default=[], metavar="FIRST",
                       help="patch the model but drop no token from block FIRST on; on CvT the linear-projection "
                            "model ATS runs on, without sampling (the baseline of fine-tuning); repeatable")


def add_static_argument(group) -> None:
    group.add_argument("--static", action="store_true",
                       help="run every config in static mode: each block at a width fixed in advance (the most "
                            "tokens it can keep), no host sync, one graph under torch.compile; GFLOPs are the "
                            "capacity's (docs/method.md, 'Static mode')")


def block_list(text: str) -> Tuple[int, ...]:
    """'3,6,9' -> (3, 6, 9)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of block indices, e.g. 3,6,9") \
            from None


def count_or_fraction(text: str) -> Union[int, float]:
    """'64' -> 64 (a count), '0.85' -> 0.85 (a fraction), as ATSConfig's budgets and min_kept read them."""
    return float(text) if "." in text else int(text)


def config_flags_given(args: argparse.Namespace) -> bool:
    """Whether the flags name any config (else a command runs its defaults)."""
    return bool(args.multi_stage or args.single_stage or args.blocks or args.evit or args.merge or args.saint
                or args.keep_all)


def configs_from_arguments(args: argparse.Namespace, depth: int) -> List[PatchConfig]:
    """The configs the flags ask for, for a model of ``depth`` blocks: the keep-all configs; ATS configs,
    EViT configs, or each EViT config stacked with each ATS config; then the merging and SAINT configs."""
    options = dict(sampler="topk" if args.topk else args.sampler, score=args.score,
                   keep_cls=not args.no_keep_cls, min_kept=args.min_kept, fuse=args.fuse, distinct=args.distinct,
                   packing=args.packing)
    rhos, ks = args.multi_stage, args.single_stage
    merging = [MergeConfig(r) for r in args.merge]
    keep_all = [KeepAllConfig(first) for first in args.keep_all]
    if not config_flags_given(args):
        rhos, ks = list(PAPER_RHOS), list(PAPER_KS)
    configs = [ATSConfig.multi_stage(rho, depth=depth, every=args.stage_every, **options) for rho in rhos]
    configs += [ATSConfig.single_stage(k, block=args.stage_block, **options) for k in ks]
    configs += [ATSConfig(blocks=parse_blocks(spec), **options) for spec in args.blocks]
    evits = [EViTConfig(keep_rate, args.evit_blocks) for keep_rate in args.evit]
    if evits and configs:
        configs = [StackedConfig(evit, config) for evit in evits for config in configs]
    return keep_all + (configs or evits) + merging + saint_configs(args, depth)


def saint_configs(args: argparse.Namespace, depth: int) -> List[SAINTConfig]:
    """The SAINT configs of ``--saint``, in the ``--saint-blocks`` or the first half of ``depth`` blocks."""
    options = dict(k=args.saint_k, gamma=args.saint_gamma)
    if args.saint_blocks is not None:
        return [SAINTConfig(threshold, blocks=args.saint_blocks, **options) for threshold in args.saint]
    return [SAINTConfig.first_half(threshold, depth, **options) for threshold in args.saint]


def parse_blocks(spec: str) -> dict:
    """'3:108,6:56' -> {3: TokenBudget(k=108), 6: TokenBudget(k=56)}; '3-11:0.7' -> rho for blocks 3..11."""
    blocks = {}
    for part in spec.split(","):
        where, sep, budget = part.strip().partition(":")
        if not sep:
            raise ValueError(f"block spec {part!r} needs the form BLOCK:K or FIRST-LAST:RHO, e.g. 3:108")
        try:
            first, _, last = where.partition("-")
            indices = range(int(first), int(last or first) + 1)
            parsed = count_or_fraction(budget)
            value = TokenBudget(rho=parsed) if isinstance(parsed, float) else TokenBudget(k=parsed)
        except ValueError as error:
            raise ValueError(f"cannot read block spec {part!r} ({error}); use BLOCK:K or FIRST-LAST:RHO") from None
        blocks.update({index: value for index in indices})
    return blocks


def require_data(args: argparse.Namespace, model: nn.Module, command: str) -> None:
    """A ValueError, before any work, when ``command`` would run ``model`` without ``--data`` on bundled images
    whose labels are not its classes."""
    if args.data is None and not knows_bundled_classes(data_config(model)):
        raise ValueError(f"ats {command} --model {args.model} needs --data DIR: the bundled images are Fashion-MNIST "
                         "garments, not this model's classes (pass an ImageFolder of its classes, e.g. ImageNet's "
                         "val folder; `ats eval` and `ats bench` run without one)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", help="an ImageFolder directory (root/<class>/<image>); default: the bundled "
                                      "Fashion-MNIST test set")
    group.add_argument("--limit", type=int, help="evaluate the first N images")
    group.add_argument("--batch-size", type=int, default=250)
    group.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    add_max_bad_argument(group)


def add_max_bad_argument(group) -> None:
    group.add_argument("--max-bad", type=float, default=DEFAULT_MAX_BAD, metavar="SHARE",
                       help="unreadable images (or non-finite ones) are skipped with a warning; stop when more than "
                            f"this share of them is (default {DEFAULT_MAX_BAD})")
