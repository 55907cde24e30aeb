"""ION_CONTEXT_REGISTRY, its builder, and the base of the context modules."""

from typing import Dict, Iterable, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from ..padding import valid_cell_counts_of
from .into_levels import IONContextIntoLevels

__all__ = [
    "ION_CONTEXT_REGISTRY",
    "IONContextModule",
    "build_ion_context",
    "check_context_outputs_read",
    "context_input_shape",
    "context_input",
]

ION_CONTEXT_REGISTRY = Registry("ION_CONTEXT")
ION_CONTEXT_REGISTRY.__doc__ = """
Registry for ION's context modules (section 3.2, Table 7), selected by
``cfg.MODEL.ION.CONTEXT.NAME``.

The registered object is called with ``(cfg, input_shape)``, where ``input_shape`` is a
``dict[str, ShapeSpec]`` of the backbone's features, and must return an ``nn.Module`` that reads
``cfg.MODEL.ION.CONTEXT.IN_FEATURE`` and has:

* ``forward(features: dict[str, Tensor], image_sizes: list[tuple[int, int]] | None = None)
  -> dict[str, Tensor]``: reads ``features[in_feature]`` of shape (N, C, H, W) and returns at
  least ``{"context": Tensor}`` of shape (N, C', H, W). ``image_sizes`` are the images' (h, w)
  before the batch was padded (``ImageList.image_sizes``; None: every image fills the tensor).
  The output must not depend on the batch's padding: at stride ``s`` image ``i`` owns its
  top-left ``ceil(h_i / s) x ceil(w_i / s)`` cells (:mod:`ion_d2.modeling.padding`); the module
  neither reads the other cells nor writes anything but 0 there, so an image's context is the same
  alone and in any batch;
* ``output_shape() -> dict[str, ShapeSpec]``: channels and stride (the input feature's) of
  every returned feature.
"""


def build_ion_context(cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Optional[nn.Module]:
    """
    Build the context module named by ``cfg.MODEL.ION.CONTEXT.NAME``.

    Args:
        cfg (CfgNode): a config with ION's keys (see :func:`ion_d2.config.add_ion_config`).
        input_shape (dict[str, ShapeSpec]): the backbone's output shapes.

    Returns:
        nn.Module or None: the context module, or None when the name is "" (no context).
    """
    name = cfg.MODEL.ION.CONTEXT.NAME
    if name == "":
        return None
    if name not in ION_CONTEXT_REGISTRY:
        registered = sorted(k for k, _ in ION_CONTEXT_REGISTRY)
        raise KeyError(
            f"cfg.MODEL.ION.CONTEXT.NAME={name!r} is not in the ION_CONTEXT registry; "
            f'registered names: {registered} (or "" for no context module).'
        )
    context = ION_CONTEXT_REGISTRY.get(name)(cfg, input_shape)
    targets = list(cfg.MODEL.ION.CONTEXT.ADD_TO_FEATURES)
    detach = cfg.MODEL.ION.CONTEXT.DETACH_INPUT
    if targets:
        context = IONContextIntoLevels(
            context, input_shape=input_shape, targets=targets, detach_input=detach
        )
    elif detach:
        raise ValueError(
            "MODEL.ION.CONTEXT.DETACH_INPUT True acts only on the context added into levels; "
            "MODEL.ION.CONTEXT.ADD_TO_FEATURES is []. Name the levels (e.g. ['p2', 'p3', 'p4', "
            "'p5']) or set DETACH_INPUT False."
        )
    return context


def check_context_outputs_read(
    context: nn.Module, readers: Dict[str, Iterable[str]], name: str, note: str = ""
) -> None:
    """
    Refuse a context module whose outputs are not all read by a head: an output nobody pools
    is a switch that does nothing, and a branch nobody reads (Table 10c's "context_conv", or a
    whole context module with no pooling and no segmentation loss) never trains in one process
    and makes DistributedDataParallel fail at the second iteration ("Expected to have finished
    reduction ..."). :class:`IONRCNN`'s constructor calls it, so the YAML path and the LazyConfig
    path (:func:`ion_d2.modeling.builder.build_ion_rcnn`) both get it.

    Args:
        context: the context module (its ``output_shape()`` names its outputs).
        readers: for each setting that lists features a head reads (the first is where to add
            an output), those features.
        name: what the error calls the context module.
        note: appended to the readers in the error (e.g. why a head does not read).

    Raises:
        ValueError: naming the unread outputs and the settings that could read them.
    """
    read = {feature for features in readers.values() for feature in features}
    read |= set(getattr(context, "features_read_by_self", ()))
    unread = [feature for feature in context.output_shape() if feature not in read]
    if unread:
        listed = ", ".join(f"{key} = {list(features)}" for key, features in readers.items())
        raise ValueError(
            f"{name} outputs {unread}, which no head reads ({listed}{note}). Their weights "
            f"would never train (and DistributedDataParallel would fail): add them to "
            f"{next(iter(readers))}, or change the context module."
        )


def context_input_shape(cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Tuple[str, ShapeSpec]:
    """Return ``(IN_FEATURE, its ShapeSpec)``, with a clear error when it is missing."""
    in_feature = cfg.MODEL.ION.CONTEXT.IN_FEATURE
    if in_feature not in input_shape:
        raise ValueError(
            f"cfg.MODEL.ION.CONTEXT.IN_FEATURE={in_feature!r} is not among the input features "
            f"{sorted(input_shape)}."
        )
    return in_feature, input_shape[in_feature]


def context_input(features: Dict[str, Tensor], in_feature: str) -> Tensor:
    """Return ``features[in_feature]``, with an error naming the given features when missing."""
    if in_feature not in features:
        raise KeyError(
            f"The context module reads feature {in_feature!r}, which is not among the given "
            f"features {sorted(features)}."
        )
    return features[in_feature]


class IONContextModule(nn.Module):
    """
    The part every context module shares: it reads the feature ``in_feature`` of stride
    ``stride`` and returns ``"context"`` with ``out_channels`` channels at that stride
    (:meth:`output_shape`); :meth:`input_and_valid_counts` gives its input and each image's valid
    cells (:mod:`ion_d2.modeling.padding`), outside which the output must be 0.
    """

    def __init__(self, *, in_feature: str, stride: int, out_channels: int):
        super().__init__()
        self.in_feature = in_feature
        self._stride = stride
        self._out_channels = out_channels

    def input_and_valid_counts(
        self, features: Dict[str, Tensor], image_sizes: Optional[Sequence[Tuple[int, int]]]
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``features[in_feature]`` and :func:`valid_cell_counts_of` it (None: no padding)."""
        x = context_input(features, self.in_feature)
        return x, valid_cell_counts_of(image_sizes, self._stride, x)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {"context": ShapeSpec(channels=self._out_channels, stride=self._stride)}
