"""Convert the bundled reference model (a timm ViT) into a Hugging Face ViTForImageClassification.

    python scripts/convert_reference_to_hf.py --out /tmp/reference-hf
    ats eval --model hf:/tmp/reference-hf      # the same Table 1 as `ats eval`

Writes ``config.json``, the weights and ``preprocessor_config.json`` (28x28, Fashion-MNIST mean and
std) with ``save_pretrained``, then checks that both models give the same logits on the first bundled
test images. The directory is not committed: the fp16 timm checkpoint is the one source of the weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Optional

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from ats.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, bundled_test_set
from ats.reference import REFERENCE_KWARGS, load_reference_model

#: timm parameter names -> transformers' (per block; the fused qkv is split into three).
BLOCK_NAMES = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
TOP_NAMES = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
             "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
             "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
             "head.weight": "classifier.weight", "head.bias": "classifier.bias"}


def hf_config() -> ViTConfig:
    """The reference architecture as a transformers ViTConfig (timm's LayerNorm eps and exact GELU)."""
    kwargs = REFERENCE_KWARGS
    return ViTConfig(image_size=kwargs["img_size"], patch_size=kwargs["patch_size"], num_channels=kwargs["in_chans"],
                     hidden_size=kwargs["embed_dim"], num_hidden_layers=kwargs["depth"],
                     num_attention_heads=kwargs["num_heads"],
                     intermediate_size=int(kwargs["embed_dim"] * kwargs["mlp_ratio"]), hidden_act="gelu",
                     layer_norm_eps=1e-6, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
                     label2id={name: index for index, name in enumerate(FASHION_MNIST_CLASSES)})


def convert_state_dict(timm_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm VisionTransformer parameters -> ViTForImageClassification parameters."""
    converted = {}
    for name, tensor in timm_state.items():
        if name in TOP_NAMES:
            converted[TOP_NAMES[name]] = tensor
            continue
        _, index, rest = name.split(".", 2)
        prefix = f"vit.layers.{index}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"{prefix}attention.{projection}.{kind}"] = part.clone()
            continue
        module, kind = rest.rsplit(".", 1)
        converted[f"{prefix}{BLOCK_NAMES[module]}.{kind}"] = tensor
    return converted


def convert(out: Path, checkpoint: Optional[Path] = None) -> float:
    """Write the converted model to ``out``; returns the largest logit difference on 64 test images."""
    timm_model = load_reference_model(checkpoint)
    hf_model = ViTForImageClassification(hf_config()).eval()
    hf_model.load_state_dict(convert_state_dict(timm_model.state_dict()), strict=True)
    hf_model.save_pretrained(out)
    size = REFERENCE_KWARGS["img_size"]
    ViTImageProcessor(size={"height": size, "width": size}, resample=2, image_mean=list(FASHION_MNIST_MEAN),
                      image_std=list(FASHION_MNIST_STD)).save_pretrained(out)
    test_set = bundled_test_set()
    images = torch.stack([test_set[index][0] for index in range(64)])
    with torch.no_grad():
        return float((timm_model(images) - hf_model(images).logits).abs().max())


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write (save_pretrained format)")
    parser.add_argument("--checkpoint", type=Path, help="a reference checkpoint (default: the bundled one)")
    args = parser.parse_args(argv)
    difference = convert(args.out, args.checkpoint)
    print(f"wrote {args.out}; largest logit difference to the timm model on 64 test images: {difference:.2e}")
    return 0 if difference < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
