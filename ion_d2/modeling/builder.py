"""
:func:`build_ion_rcnn`: :class:`IONRCNN` from a LazyConfig (``configs/lazy/*.py``), with every
input shape inferred. The backbone is built first (by ``instantiate``); the heads are built by
:func:`build_ion_heads`, the order :meth:`IONRCNN.from_config` builds them in too, each on the
shapes of the features it reads, so that no ``ShapeSpec``, channel count or stride is written
in a config. The checks are :class:`IONRCNN`'s and its parts' constructors', the same on both
paths.
"""

import inspect
from collections import abc
from typing import Any, Dict, Optional, Sequence

from detectron2.config import instantiate
from detectron2.layers import ShapeSpec
from detectron2.utils.registry import locate
from torch import nn

from .meta_arch import IONRCNN, build_ion_heads
from .skip_pooling import IONSkipPooler

__all__ = ["build_ion_rcnn", "is_lazy_call", "locate_target"]

# The heads build_ion_rcnn takes: build_ion_heads' keyword arguments without a default (its
# image_channels is not a head).
_HEADS = [
    p.name
    for p in inspect.signature(build_ion_heads).parameters.values()
    if p.kind is p.KEYWORD_ONLY and p.default is p.empty
]


def is_lazy_call(node: Any) -> bool:
    """Whether ``node`` is a LazyCall config (a mapping with a ``_target_``)."""
    return isinstance(node, abc.Mapping) and "_target_" in node


def locate_target(node) -> Any:
    """The callable a LazyCall config's ``_target_`` names."""
    target = node["_target_"]
    return locate(target) if isinstance(target, str) else target


def _build(node, shapes: Dict[str, ShapeSpec], where: str, **inferred):
    """
    Instantiate ``node`` (a LazyCall config) with the ``inferred`` arguments, after building
    its other lazy children the same way. A target that takes ``in_feature``, ``in_channels``
    and ``stride`` (a context module) gets that feature's channels and stride. An inferred
    argument that the config also sets (not to a LazyCall) must equal it.
    """
    target = locate_target(node)
    params = inspect.signature(target).parameters
    if isinstance(node.get("in_feature"), str) and {"in_channels", "stride"} <= set(params):
        shape = _feature(shapes, node["in_feature"], f"{where}.in_feature")
        inferred = {"in_channels": shape.channels, "stride": shape.stride, **inferred}
    kwargs = {}
    for key, value in node.items():
        if key == "_target_":
            continue
        if key in inferred:
            if value is not None and not is_lazy_call(value) and value != inferred[key]:
                raise ValueError(
                    f"{where}.{key} is {value!r} in the config, but the features it reads give "
                    f"{inferred[key]!r}; leave it out (build_ion_rcnn infers it)."
                )
            continue
        kwargs[key] = _build(value, shapes, f"{where}.{key}") if is_lazy_call(value) else value
    return instantiate({"_target_": target, **kwargs, **inferred})


def _context_in_feature(node) -> Optional[str]:
    """The feature a context module's LazyCall reads, through wrappers of another ("context")."""
    while node is not None and "in_feature" not in node and is_lazy_call(node.get("context")):
        node = node["context"]
    return None if node is None else node.get("in_feature")


def _feature(shapes: Dict[str, ShapeSpec], name: str, where: str) -> ShapeSpec:
    if name not in shapes:
        raise ValueError(
            f"{where} reads feature {name!r}, which the model does not produce; available "
            f"features: {sorted(shapes)}."
        )
    return shapes[name]


def _unique(values: Sequence[Any], what: str, where: str):
    if len(set(values)) != 1:
        raise ValueError(f"{where} needs one {what} over its input features; got {list(values)}.")
    return values[0]


def _build_proposal_generator(node, shapes: Dict[str, ShapeSpec], where: str):
    """An RPN: the anchor strides, the head's input channels and anchors per location."""
    if node is None:
        return None
    if "head" not in node or "anchor_generator" not in node:
        return _build(node, shapes, where)
    in_features = list(node["in_features"])
    feature_shapes = [_feature(shapes, f, f"{where}.in_features") for f in in_features]
    anchor_generator = _build(
        node["anchor_generator"],
        shapes,
        f"{where}.anchor_generator",
        strides=[s.stride for s in feature_shapes],
    )
    head = _build(
        node["head"],
        shapes,
        f"{where}.head",
        in_channels=_unique([s.channels for s in feature_shapes], "channel count", where),
        num_anchors=_unique(
            list(anchor_generator.num_anchors), "number of anchors", f"{where}.anchor_generator"
        ),
    )
    return _build(node, shapes, where, anchor_generator=anchor_generator, head=head)


def _build_roi_heads(node, shapes: Dict[str, ShapeSpec], reference: Optional[str], where: str):
    """ROI heads whose box branch is pooler -> box head -> predictor, each on the last's shape."""
    in_features = list(node["box_in_features"])
    feature_shapes = [_feature(shapes, f, f"{where}.box_in_features") for f in in_features]
    pooler_node = node["box_pooler"]
    resolution = pooler_node["output_size"]
    if locate_target(pooler_node) is IONSkipPooler:
        # As build_ion_skip_pooler: the feature order is saved with the weights, and a measured
        # scale (scale_init -1) is the mean pooled norm of the context module's input feature.
        pooler_inferred = {"input_shapes": feature_shapes, "feature_names": in_features}
        if reference is not None and pooler_node.get("scale_reference") is None:
            pooler_inferred["scale_reference"] = reference
        box_pooler = _build(pooler_node, shapes, f"{where}.box_pooler", **pooler_inferred)
        channels = box_pooler.out_channels
    else:
        strides = [s.stride for s in feature_shapes]
        box_pooler = _build(
            pooler_node, shapes, f"{where}.box_pooler", scales=tuple(1.0 / s for s in strides)
        )
        channels = _unique([s.channels for s in feature_shapes], "channel count", where)
    box_head = _build(
        node["box_head"],
        shapes,
        f"{where}.box_head",
        input_shape=ShapeSpec(channels=channels, height=resolution, width=resolution),
    )
    box_predictor = _build(
        node["box_predictor"],
        shapes,
        f"{where}.box_predictor",
        input_shape=box_head.output_shape,
    )
    return _build(
        node,
        shapes,
        where,
        box_pooler=box_pooler,
        box_head=box_head,
        box_predictor=box_predictor,
    )


def build_ion_rcnn(
    *,
    backbone: nn.Module,
    heads: Dict[str, Any],
    **kwargs,
) -> IONRCNN:
    """
    :class:`IONRCNN` from a LazyConfig, with the heads' input shapes inferred.

    ``instantiate`` builds ``backbone`` first; ``heads`` is a plain dict (no ``_target_``), so
    ``instantiate`` hands its LazyCall configs over unbuilt, and this function builds them
    through :func:`build_ion_heads` on the backbone's (and the context module's)
    ``output_shape()``:

    * ``heads.context``: ``in_channels`` and ``stride`` of its ``in_feature``;
    * ``heads.sem_seg_head``: ``input_shape``, every feature's shape;
    * ``heads.proposal_generator`` (an RPN; None for precomputed proposals): the anchor
      generator's ``strides`` and the RPN head's ``in_channels`` and ``num_anchors``;
    * ``heads.roi_heads``: the box pooler's ``input_shapes`` (:class:`IONSkipPooler`) or
      ``scales`` (:class:`ROIPooler`), with ``feature_names`` and, unless the config sets it,
      ``scale_reference`` (the context module's ``in_feature``) as the YAML path gives them;
      then the box head's ``input_shape`` from the pooler's output and the predictor's from
      the box head's ``output_shape``.

    An inferred argument that the config also sets must agree (a ValueError says otherwise).

    Args:
        backbone (nn.Module): a built :class:`Backbone`.
        heads (dict): LazyCall configs under :func:`build_ion_heads`' argument names;
            "context", "sem_seg_head" and "proposal_generator" may be None or absent.
        kwargs: the rest of :class:`IONRCNN`'s arguments (``pixel_mean``, ``input_format``,
            ``backbone_per_image``, ...).
    """
    where = "model.heads"
    unknown = sorted(set(heads) - set(_HEADS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; accepted: {_HEADS}.")
    if heads.get("roi_heads") is None:
        raise ValueError(f"{where}.roi_heads is required (e.g. L(IONROIHeads)(...)).")
    context = heads.get("context")
    sem_seg_head = heads.get("sem_seg_head")
    reference = _context_in_feature(context)

    def build_context(shapes):
        if context is None:
            return None
        # A wrapper such as IONContextIntoLevels reads the shapes of every feature.
        takes_shapes = "input_shape" in inspect.signature(locate_target(context)).parameters
        inferred = {"input_shape": dict(shapes)} if takes_shapes else {}
        return _build(context, shapes, f"{where}.context", **inferred)

    def build_sem_seg_head(shapes):
        if sem_seg_head is None:
            return None
        return _build(sem_seg_head, shapes, f"{where}.sem_seg_head", input_shape=shapes)

    built = build_ion_heads(
        backbone,
        context=build_context,
        sem_seg_head=build_sem_seg_head,
        proposal_generator=lambda shapes: _build_proposal_generator(
            heads.get("proposal_generator"), shapes, f"{where}.proposal_generator"
        ),
        roi_heads=lambda shapes: _build_roi_heads(
            heads["roi_heads"], shapes, reference, f"{where}.roi_heads"
        ),
    )
    return IONRCNN(backbone=backbone, **built, **kwargs)
