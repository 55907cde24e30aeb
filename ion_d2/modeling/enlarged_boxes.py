"""
Context just outside the box (beyond the paper): ROIs enlarged around their centres, which
:class:`~ion_d2.modeling.skip_pooling.IONSkipPooler` pools from the features named in
``MODEL.ION.SKIP_POOL.ENLARGED`` beside the boxes themselves, as MR-CNN's contextual regions
(Gidaris and Komodakis, ICCV 2015).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.structures import Boxes

__all__ = ["check_box_factors", "enlarge_boxes", "enlarged_feature_name"]


def check_box_factors(factors: Optional[Sequence[float]], num_features: int) -> Tuple[float, ...]:
    """
    Check the per-feature enlargement factors of a skip pooler (None: 1 for each feature).

    Returns:
        tuple[float]: one factor >= 1 per feature.
    """
    factors = [1.0] * num_features if factors is None else list(factors)
    if len(factors) != num_features or not all(f >= 1.0 for f in factors):
        raise ValueError(
            f"box_factors must hold one factor >= 1 per pooled feature ({num_features}); "
            f"got {factors}."
        )
    return tuple(float(f) for f in factors)


def enlarge_boxes(box_lists: List[Boxes], factor: float) -> List[Boxes]:
    """
    Each box scaled by ``factor`` around its centre: 3 adds one box width on the left and on
    the right and one box height above and below. Boxes may then extend past the image:
    :class:`~ion_d2.modeling.roi_pool.IONROIPool` reads only each image's valid cells.
    """
    out = []
    for boxes in box_lists:
        t = boxes.tensor
        centre = 0.5 * (t[:, :2] + t[:, 2:])
        half = (0.5 * factor) * (t[:, 2:] - t[:, :2])
        out.append(Boxes(torch.cat([centre - half, centre + half], dim=1)))
    return out


def enlarged_feature_name(name: str, factor: float) -> str:
    """How a feature pooled over enlarged boxes is named in the pooler's "feature_order"."""
    return f"{name}@x{factor:g}"
