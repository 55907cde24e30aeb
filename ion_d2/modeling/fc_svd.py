"""
Fast R-CNN's truncated SVD of fully connected layers (Girshick, "Fast R-CNN", ICCV 2015, section
3.1), for ``IONFCHead`` (``MODEL.ION.FC_SVD_RANKS``) and ``tools/compress_fc_svd.py``.

A layer ``y = W x + b`` with a (out, in) weight ``W = U S V^T`` becomes two layers without a
non-linearity between them: ``svd_v`` (in -> t, no bias, weight ``S_t V_t^T``) and ``svd_u``
(t -> out, weight ``U_t``, the original bias), where ``t`` is the number of kept singular
values. ``U_t S_t V_t^T`` is the best rank-t approximation of ``W`` in the Frobenius norm, and
the parameters fall from ``in * out`` to ``t * (in + out)``.
"""

import logging
import math
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
from fvcore.nn import weight_init
from torch import nn

__all__ = [
    "FC_SVD_RANKS_KEY",
    "SVDFactors",
    "truncated_svd",
    "factor_linear_state_dict",
    "check_fc_svd_ranks",
    "IONFactoredLinear",
]

logger = logging.getLogger(__name__)

FC_SVD_RANKS_KEY = "MODEL.ION.FC_SVD_RANKS"


class SVDFactors(NamedTuple):
    """The two factors of a rank-t truncated SVD of a (out, in) weight ``W``."""

    v_weight: torch.Tensor
    """(t, in): ``S_t V_t^T``, the weight of the first layer (no bias)."""
    u_weight: torch.Tensor
    """(out, t): ``U_t``, the weight of the second layer (with the original bias)."""
    relative_error: float
    """``||W - u_weight @ v_weight||_F / ||W||_F`` (0 for a zero ``W``)."""


def truncated_svd(weight: torch.Tensor, rank: int) -> SVDFactors:
    """
    Factor a fully connected layer's weight with its ``rank`` largest singular values.

    Args:
        weight (Tensor): (out, in) weight of an ``nn.Linear``.
        rank (int): singular values to keep, in [1, min(out, in)].

    Returns:
        SVDFactors: the factors, in ``weight``'s dtype and device.
    """
    if weight.dim() != 2:
        raise ValueError(f"Expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}.")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(
            f"rank {rank} for a {tuple(weight.shape)} weight; accepted: 1..{min(weight.shape)}."
        )
    w = weight.detach()
    # LAPACK has no half-precision SVD; float32 is what Fast R-CNN's compress_net.py used.
    u, s, vh = torch.linalg.svd(w if w.dtype == torch.float64 else w.float(), full_matrices=False)
    total = float(s.square().sum())
    discarded = float(s[rank:].square().sum())
    return SVDFactors(
        v_weight=(s[:rank, None] * vh[:rank]).to(w.dtype).contiguous(),
        u_weight=u[:, :rank].to(w.dtype).contiguous(),
        relative_error=math.sqrt(discarded / total) if total > 0 else 0.0,
    )


def factor_linear_state_dict(
    state_dict: Dict[str, torch.Tensor],
    prefix: str,
    *,
    rank: int,
    in_features: int,
    out_features: int,
) -> float:
    """
    Replace, in place, an ``nn.Linear``'s entries ``<prefix>weight`` and ``<prefix>bias`` of a
    state dict by those of an :class:`IONFactoredLinear` of rank ``rank``:
    ``<prefix>svd_v.weight``, ``<prefix>svd_u.weight`` and ``<prefix>svd_u.bias``.

    Returns:
        float: the relative Frobenius error of the approximation (:class:`SVDFactors`).
    """
    weight_key, bias_key = prefix + "weight", prefix + "bias"
    expected = (out_features, in_features)
    if weight_key not in state_dict or bias_key not in state_dict:
        raise KeyError(
            f"Cannot factor {prefix[:-1]!r}: the state dict lacks {weight_key!r} or {bias_key!r}."
        )
    weight, bias = state_dict[weight_key], state_dict[bias_key]
    if tuple(weight.shape) != expected or tuple(bias.shape) != (out_features,):
        raise ValueError(
            f"Cannot factor {prefix[:-1]!r}: the checkpoint's weight has shape "
            f"{tuple(weight.shape)} and bias {tuple(bias.shape)}; the model's layer is "
            f"{in_features} -> {out_features}, i.e. weight {expected} and bias ({out_features},)."
        )
    factors = truncated_svd(weight, rank)
    del state_dict[weight_key], state_dict[bias_key]
    state_dict[prefix + "svd_v.weight"] = factors.v_weight
    state_dict[prefix + "svd_u.weight"] = factors.u_weight
    state_dict[prefix + "svd_u.bias"] = bias
    return factors.relative_error


def check_fc_svd_ranks(ranks: Sequence[int], fc_shapes: Sequence[Tuple[int, int]]) -> List[int]:
    """
    Check ``MODEL.ION.FC_SVD_RANKS`` against the fc layers it applies to.

    Args:
        ranks (list[int]): [] (factor nothing) or one rank per fc layer, 0 keeping that layer.
        fc_shapes (list[tuple[int, int]]): (in_features, out_features) of each fc layer.

    Returns:
        list[int]: one rank per fc layer (0 = unfactored).
    """
    ranks = list(ranks)
    if not ranks:
        return [0] * len(fc_shapes)
    if len(ranks) != len(fc_shapes):
        raise ValueError(
            f"{FC_SVD_RANKS_KEY} = {ranks}: accepted [] (no factoring) or one rank per fc layer of "
            f"the box head, i.e. {len(fc_shapes)} ranks (MODEL.ROI_BOX_HEAD.NUM_FC)."
        )
    for k, (rank, (in_features, out_features)) in enumerate(zip(ranks, fc_shapes)):
        full = min(in_features, out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= full:
            raise ValueError(
                f"{FC_SVD_RANKS_KEY}[{k}] = {rank!r} for fc{k + 1} ({in_features} -> "
                f"{out_features}): accepted 0 (keep the layer unfactored) or an integer rank in "
                f"[1, {full}]."
            )
        if rank > 0 and rank * (in_features + out_features) >= in_features * out_features:
            logger.warning(
                f"{FC_SVD_RANKS_KEY}[{k}] = {rank} does not reduce fc{k + 1}'s weights "
                f"({in_features} x {out_features} = {in_features * out_features}; factored: "
                f"{rank * (in_features + out_features)}): the two layers cost more than one."
            )
    return ranks


class IONFactoredLinear(nn.Module):
    """
    ``nn.Linear(in_features, out_features)`` factored at rank ``rank``: ``svd_u(svd_v(x))``
    (the module docstring gives the factors).

    Built without weights, each factor gets Xavier initialisation; the layer is meant to receive
    trained weights: a checkpoint of the same factored layer, or an unfactored ``nn.Linear``'s
    ``weight`` and ``bias``, which loading factors (truncated SVD) on the fly.
    """

    def __init__(self, in_features: int, out_features: int, rank: int):
        """
        Args:
            in_features (int): input dimension.
            out_features (int): output dimension.
            rank (int): inner dimension, in [1, min(in_features, out_features)].
        """
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"IONFactoredLinear({in_features} -> {out_features}) got rank {rank}; accepted: "
                f"1..{min(in_features, out_features)}."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.svd_v = nn.Linear(in_features, rank, bias=False)
        self.svd_u = nn.Linear(rank, out_features)
        weight_init.c2_xavier_fill(self.svd_v)
        weight_init.c2_xavier_fill(self.svd_u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.svd_u(self.svd_v(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        factor_keys = [prefix + k for k in ("svd_v.weight", "svd_u.weight", "svd_u.bias")]
        if prefix + "weight" in state_dict:
            if any(k in state_dict for k in factor_keys):
                raise ValueError(
                    f"The state dict holds both {prefix}weight (an unfactored layer) and "
                    f"{prefix}svd_* (a factored one); expected one of the two."
                )
            error = factor_linear_state_dict(
                state_dict,
                prefix,
                rank=self.rank,
                in_features=self.in_features,
                out_features=self.out_features,
            )
            logger.info(
                f"Factored the checkpoint's unfactored {prefix}weight ({self.out_features} x "
                f"{self.in_features}) at rank {self.rank} while loading ({FC_SVD_RANKS_KEY}, "
                f"truncated SVD): relative Frobenius error {error:.4g}."
            )
        elif factor_keys[2] in state_dict and not all(k in state_dict for k in factor_keys[:2]):
            # Detectron2's checkpointer drops entries whose shape differs from the model's and
            # only warns; here the factors' shapes depend on the rank, so that means another rank.
            raise ValueError(
                f"The checkpoint holds {factor_keys[2]} but not both of {factor_keys[:2]} with "
                f"this layer's shapes (rank {self.rank}: ({self.rank}, {self.in_features}) and "
                f"({self.out_features}, {self.rank})): it was factored at another rank. Set "
                f"{FC_SVD_RANKS_KEY} to the checkpoint's ranks, or factor the uncompressed "
                "checkpoint at these ranks."
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
