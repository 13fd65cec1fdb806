"""Weight initialisation shared by the library's own architectures."""
from timm.layers import trunc_normal_
from torch import nn


def init_linear(module: nn.Module) -> None:
    """timm's ViT initialisation, for ``model.apply``: truncated-normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
