"""timm's transforms for a model's data config (``ats.adapters.data_config``), which also carries keys timm's
``create_transform`` does not take (class names, frames, the declared test set)."""
from typing import Any, Callable, Dict

#: The keys of a data config that timm's ``create_transform`` reads.
TRANSFORM_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def timm_transform(config: Dict[str, Any], is_training: bool = False) -> Callable:
    """timm's transform for images of the model of data config ``config`` (its evaluation transform by default)."""
    import timm.data

    return timm.data.create_transform(**{key: config[key] for key in TRANSFORM_KEYS if key in config},
                                      is_training=is_training)
