"""
The order of the features an :class:`~ion_d2.modeling.skip_pooling.IONSkipPooler` concatenates,
as saved with its weights (its buffer "feature_order"; why: its ``feature_names`` argument).
"""

import logging
from typing import Dict, List

import torch

__all__ = ["encode_feature_order", "decode_feature_order", "check_stored_feature_order"]

logger = logging.getLogger(__name__)

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


def check_stored_feature_order(
    state_dict: Dict[str, torch.Tensor],
    prefix: str,
    feature_names: List[str],
    feature_order: torch.Tensor,
) -> None:
    """
    Refuse weights of a skip pooler (under ``prefix``) trained on features in another order
    than ``feature_names``; weights without a stored order get ``feature_order`` and a warning.
    """
    key = prefix + "feature_order"
    where = prefix[:-1] or "the skip pooler"
    if key in state_dict:
        stored = decode_feature_order(state_dict[key])
        if stored != feature_names:
            raise ValueError(
                f"The weights of {where} were trained pooling the features {stored} in this "
                f"order, but this model pools {feature_names} (MODEL.ROI_HEADS.IN_FEATURES, then "
                "MODEL.ION.SKIP_POOL.ENLARGED.IN_FEATURES as '<name>@x<FACTOR>'). The 1x1 "
                f"reduction's input channels follow that order: set those keys to give {stored}."
            )
    elif any(k.startswith(prefix) for k in state_dict):
        # This pooler's weights without their order (e.g. converted ImageNet weights hold no
        # pooler at all, and need no warning).
        logger.warning(
            f"The checkpoint stores no feature order for {where} (written before ion_d2 recorded "
            "it), so it cannot be checked: make sure MODEL.ROI_HEADS.IN_FEATURES is in the order "
            f"it was trained with; this model pools {feature_names}."
        )
        state_dict[key] = feature_order
