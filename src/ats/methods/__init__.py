"""The token-reduction methods ``ats.patch`` takes, one module each (its config, a ``Method``, and its block), and
``METHODS``, the registry: ``ats.patch``'s check and message, the package's exports (``__all__`` here, which
``ats`` re-exports) and the command line's help all read it. A new method is one module here and one entry in
``METHODS`` (docs/method.md, "Adding a method")."""
from typing import Tuple, Type

from ..method import Method
from .adaptive_sampling import ATSConfig, TokenBudget
from .evit import EViTConfig
from .keep_all import KeepAllConfig
from .saint import SAINTConfig
from .stacked import StackedConfig
from .token_merging import MergeConfig

#: Every method ``ats.patch`` takes, in the order messages and help list them.
METHODS: Tuple[Type[Method], ...] = (ATSConfig, EViTConfig, StackedConfig, MergeConfig, SAINTConfig, KeepAllConfig)
#: What ``ats.patch`` takes: any method of ``METHODS``.
PatchConfig = Method

__all__ = [*(method.__name__ for method in METHODS), "PatchConfig", "TokenBudget"]


def method_list(prefix: str = "") -> str:
    """The registered methods by name, each with its summary, e.g. for help and error messages."""
    return "; ".join(f"{prefix}{method.__name__} ({method.summary})" for method in METHODS)
