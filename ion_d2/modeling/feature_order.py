"""
The order of the features an :class:`~ion_d2.modeling.skip_pooling.IONSkipPooler` concatenates,
as saved with its weights (its buffer "feature_order"; why: its ``feature_names`` argument).
"""

from typing import List

import torch

__all__ = ["encode_feature_order", "decode_feature_order"]

# Bytes of the "feature_order" buffer: a fixed size, so that fvcore's checkpointer (which drops
# entries whose shape differs from the model's) always hands it to _load_from_state_dict.
_FEATURE_ORDER_BYTES = 256


def encode_feature_order(names: List[str]) -> torch.Tensor:
    """
    Returns:
        Tensor: uint8 (256,) holding ``",".join(names)`` in UTF-8, zero-padded.
    """
    data = ",".join(names).encode("utf-8")
    if len(data) > _FEATURE_ORDER_BYTES or any("," in n for n in names):
        raise ValueError(
            f"Feature names {names} must not contain ',' and must join to at most "
            f"{_FEATURE_ORDER_BYTES} bytes."
        )
    out = torch.zeros(_FEATURE_ORDER_BYTES, dtype=torch.uint8)
    out[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return out


def decode_feature_order(encoded: torch.Tensor) -> List[str]:
    """Inverse of :func:`encode_feature_order`."""
    data = bytes(encoded.cpu().tolist()).rstrip(b"\0").decode("utf-8")
    return data.split(",") if data else []
