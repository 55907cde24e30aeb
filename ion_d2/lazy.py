"""
LazyConfig support: what ``configs/lazy/*.py`` need beyond Detectron2's ``LazyCall``.

* :func:`build_ion_rcnn` builds :class:`IONRCNN` with every input shape inferred: the backbone
  is built first, and the heads (``heads.context``, ``heads.proposal_generator``,
  ``heads.roi_heads``, ``heads.sem_seg_head``) are built by it, in the order
  :meth:`IONRCNN.from_config` builds them, on the shapes of the features they read. No
  ``ShapeSpec``, channel count or stride is written in a config.
* :func:`clipped_optimizer` wraps an optimizer class with ``SOLVER.CLIP_GRADIENTS``' clipping,
  "full_model" included (section 4.1), for ``optimizer._target_``.
* :func:`ion_exponential_lr` is "IONExponentialLR" as an fvcore ``ParamScheduler`` for
  ``lr_multiplier``.
* :func:`measure_lazy_skip_pool_scale` is IONTrainer's skip-pooling scale measurement
  (``scale_init`` -1, section 5.2) for a model built from a LazyConfig.
* :func:`apply_lazy_overrides` and :func:`check_lazy_train_config` refuse a misspelt key, a
  number given as a word and a training length or period that cannot run, before anything
  is built (tools/lazyconfig_train_net.py).
"""

import difflib
import inspect
from collections import abc
from typing import Any, Dict, Optional, Sequence, Type, Union

import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.registry import locate
from fvcore.common.param_scheduler import ParamScheduler
from omegaconf import OmegaConf
from torch import nn

from .engine.skip_pool_scale import measure_skip_pool_scale, skip_pooler
from .engine.solver import CLIP_TYPES, _with_full_model_clipping, ion_exponential_param_scheduler
from .modeling.context import check_context_outputs_read
from .modeling.meta_arch import IONRCNN
from .modeling.skip_pooling import IONSkipPooler
from .modeling.vgg16 import IONVGG16

__all__ = [
    "apply_lazy_overrides",
    "build_ion_rcnn",
    "check_lazy_train_config",
    "clipped_optimizer",
    "ion_exponential_lr",
    "measure_lazy_skip_pool_scale",
]

# The heads build_ion_rcnn builds itself, in IONRCNN.from_config's order (the same random
# draws as the YAML path, so a seed gives the same initial weights).
HEAD_NAMES = ("context", "sem_seg_head", "proposal_generator", "roi_heads")


def _is_lazy(node: Any) -> bool:
    return isinstance(node, abc.Mapping) and "_target_" in node


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
            if value is not None and not _is_lazy(value) and value != inferred[key]:
                raise ValueError(
                    f"{where}.{key} is {value!r} in the config, but the features it reads give "
                    f"{inferred[key]!r}; leave it out (build_ion_rcnn infers it)."
                )
            continue
        kwargs[key] = _build(value, shapes, f"{where}.{key}") if _is_lazy(value) else value
    return instantiate({"_target_": target, **kwargs, **inferred})


def locate_target(node) -> Any:
    """The callable a LazyCall config's ``_target_`` names."""
    target = node["_target_"]
    return locate(target) if isinstance(target, str) else target


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


def _build_roi_heads(
    node, shapes: Dict[str, ShapeSpec], backbone: nn.Module, reference: Optional[str], where: str
):
    """ROI heads whose box branch is pooler -> box head -> predictor, each on the last's shape."""
    in_features = list(node["box_in_features"])
    feature_shapes = [_feature(shapes, f, f"{where}.box_in_features") for f in in_features]
    pooler_node = node["box_pooler"]
    resolution = pooler_node["output_size"]
    if locate_target(pooler_node) is IONSkipPooler:
        scale_init = pooler_node.get("scale_init", 0.0)
        if pooler_node.get("norm", "roi") != "none" and scale_init == 0:
            if not isinstance(backbone, IONVGG16):
                raise ValueError(
                    f"{where}.box_pooler.scale_init is 0, the paper's constant measured on "
                    f"Caffe VGG16's conv5 (section 5.2), but the backbone is "
                    f"{type(backbone).__name__}. Use -1 (measured on the training set) or a "
                    "value > 0."
                )
        # As build_ion_skip_pooler: the feature order is saved with the weights, and the
        # scale (scale_init -1) is measured on the context module's input feature.
        pooler_inferred = {"input_shapes": feature_shapes, "feature_names": in_features}
        if reference in in_features:
            pooler_inferred["scale_reference"] = in_features.index(reference)
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


def _check_context_outputs_read(context: nn.Module, heads, where: str) -> None:
    """:func:`check_context_outputs_read` with the LazyConfig heads' readers."""
    readers = {f"{where}.roi_heads.box_in_features": heads["roi_heads"]["box_in_features"]}
    if heads.get("sem_seg_head") is not None:
        readers[f"{where}.sem_seg_head.in_feature"] = [heads["sem_seg_head"]["in_feature"]]
    proposal_generator = heads.get("proposal_generator")
    if proposal_generator is not None and "in_features" in proposal_generator:
        readers[f"{where}.proposal_generator.in_features"] = proposal_generator["in_features"]
    check_context_outputs_read(context, readers, f"{where}.context")


def build_ion_rcnn(
    *,
    backbone: nn.Module,
    heads: Dict[str, Any],
    **kwargs,
) -> IONRCNN:
    """
    :class:`IONRCNN` from a LazyConfig, with the heads' input shapes inferred.

    ``instantiate`` builds ``backbone`` first; ``heads`` is a plain dict (no ``_target_``), so
    ``instantiate`` hands its LazyCall configs over unbuilt, and this function builds them on
    the backbone's (and the context module's) ``output_shape()``:

    * ``heads.context``: ``in_channels`` and ``stride`` of its ``in_feature``;
    * ``heads.sem_seg_head``: ``input_shape``, every feature's shape;
    * ``heads.proposal_generator`` (an RPN; None for precomputed proposals): the anchor
      generator's ``strides`` and the RPN head's ``in_channels`` and ``num_anchors``;
    * ``heads.roi_heads``: the box pooler's ``input_shapes`` (:class:`IONSkipPooler`) or
      ``scales`` (:class:`ROIPooler`), with ``feature_names`` and ``scale_reference`` (the
      index of the context module's ``in_feature``) as the YAML path gives them, then the box head's ``input_shape`` from the pooler's
      output and the predictor's from the box head's ``output_shape``.

    An inferred argument that the config also sets must agree (a ValueError says otherwise).

    Args:
        backbone (nn.Module): a built :class:`Backbone`.
        heads (dict): LazyCall configs under the names of :data:`HEAD_NAMES`; "context",
            "sem_seg_head" and "proposal_generator" may be None or absent.
        kwargs: the rest of :class:`IONRCNN`'s arguments (``pixel_mean``, ``input_format``,
            ``backbone_per_image``, ...).
    """
    unknown = sorted(set(heads) - set(HEAD_NAMES))
    if unknown:
        raise ValueError(f"model.heads has unknown keys {unknown}; accepted: {list(HEAD_NAMES)}.")
    if heads.get("roi_heads") is None:
        raise ValueError("model.heads.roi_heads is required (e.g. L(IONROIHeads)(...)).")
    shapes = dict(backbone.output_shape())
    built: Dict[str, Optional[nn.Module]] = {}
    context = heads.get("context")
    if context is not None:
        built["context"] = _build(context, shapes, "model.heads.context")
        _check_context_outputs_read(built["context"], heads, "model.heads")
        shapes.update(built["context"].output_shape())
    sem_seg_head = heads.get("sem_seg_head")
    if sem_seg_head is not None:
        built["sem_seg_head"] = _build(
            sem_seg_head, shapes, "model.heads.sem_seg_head", input_shape=dict(shapes)
        )
    built["proposal_generator"] = _build_proposal_generator(
        heads.get("proposal_generator"), shapes, "model.heads.proposal_generator"
    )
    reference = context["in_feature"] if context is not None else None
    built["roi_heads"] = _build_roi_heads(
        heads["roi_heads"], shapes, backbone, reference, "model.heads.roi_heads"
    )
    return IONRCNN(backbone=backbone, **built, **kwargs)


def clipped_optimizer(
    optimizer: Union[str, Type[torch.optim.Optimizer]] = "torch.optim.SGD",
    *,
    clip_type: str,
    clip_value: float,
    norm_type: float = 2.0,
) -> Type[torch.optim.Optimizer]:
    """
    ``optimizer`` (a class or its dotted name) with gradient clipping, as
    ``SOLVER.CLIP_GRADIENTS`` gives it to the YAML path: "full_model" clips the L2 norm of all
    parameters' gradients together (section 4.1; :func:`ion_d2.engine.solver.build_ion_optimizer`),
    "norm" and "value" each parameter tensor on its own (Detectron2's
    ``maybe_add_gradient_clipping``). Use it as ``optimizer._target_``::

        optimizer._target_ = L(clipped_optimizer)(clip_type="full_model", clip_value=20.0)
    """
    cls = locate(optimizer) if isinstance(optimizer, str) else optimizer
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"clipped_optimizer needs a torch.optim.Optimizer class; got {optimizer!r}."
        )
    if clip_type not in CLIP_TYPES:
        raise ValueError(f"Unknown clip_type {clip_type!r}; expected one of {CLIP_TYPES}.")
    if not clip_value > 0:
        raise ValueError(f"clip_value must be > 0; got {clip_value}.")
    if clip_type == "full_model":
        return _with_full_model_clipping(cls, clip_value, norm_type)
    cfg = CfgNode(
        {
            "SOLVER": {
                "CLIP_GRADIENTS": {
                    "ENABLED": True,
                    "CLIP_TYPE": clip_type,
                    "CLIP_VALUE": clip_value,
                    "NORM_TYPE": norm_type,
                }
            }
        }
    )
    return maybe_add_gradient_clipping(cfg, cls)


def ion_exponential_lr(
    *,
    base_lr: float,
    end_lr: float,
    max_iter: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    warmup_method: str = "linear",
) -> ParamScheduler:
    """
    Section 4.1's exponential decay from ``base_lr`` to ``end_lr`` over ``max_iter``
    iterations, after Detectron2's warmup: the multiplier "IONExponentialLR" gives the YAML
    path (:func:`ion_d2.engine.solver.ion_exponential_param_scheduler`), for ``lr_multiplier``. The
    configs set ``base_lr="${..optimizer.lr}"`` and ``max_iter="${..train.max_iter}"``.
    """
    return ion_exponential_param_scheduler(
        base_lr=base_lr,
        end_lr=end_lr,
        max_iter=max_iter,
        warmup_iters=warmup_iters,
        warmup_factor=warmup_factor,
        warmup_method=warmup_method,
        keys=("lr_multiplier.base_lr", "lr_multiplier.end_lr"),
    )


def measure_lazy_skip_pool_scale(cfg, model: nn.Module, *, start_iter: int = 0) -> Optional[float]:
    """
    :func:`ion_d2.engine.skip_pool_scale.measure_skip_pool_scale` for a LazyConfig ``cfg``: when
    the model's skip-pooling scale is pending (``box_pooler.scale_init`` -1 and not held by the
    loaded weights), measure it on the first ``train.ion_scale_measure_images`` (default 100)
    images of ``dataloader.train.dataset``, mapped by ``dataloader.train.mapper`` and batched by
    the per-process share of ``dataloader.train.total_batch_size``.

    Returns:
        float or None: the scale set, or None when nothing was measured.
    """
    pooler = skip_pooler(model)
    if pooler is None or not pooler.scale_pending:
        return None
    num_images = cfg.train.get("ion_scale_measure_images", 100)
    if num_images < 1:
        raise ValueError(f"train.ion_scale_measure_images must be >= 1; got {num_images}.")
    dicts = instantiate(cfg.dataloader.train.dataset)[:num_images]
    mapper = instantiate(cfg.dataloader.train.mapper)
    batch_size = max(cfg.dataloader.train.total_batch_size // comm.get_world_size(), 1)
    mapped = [mapper(d) for d in dicts]
    batches = [mapped[i : i + batch_size] for i in range(0, len(mapped), batch_size)]
    return measure_skip_pool_scale(model, batches, start_iter=start_iter)


def apply_lazy_overrides(cfg, overrides: Sequence[str]):
    """
    :meth:`LazyConfig.apply_overrides` (Hydra's "key=value" syntax), which adds any key it is
    given, after checking each override: a key the config does not have is refused with its
    close matches (in a LazyCall node, its target's parameters count as keys; write
    ``+key=value`` to add a new key on purpose), and so is a word where the config holds a
    number or a bool (``train.max_iter=abc``).

    Returns:
        the config, as :meth:`LazyConfig.apply_overrides`.

    Raises:
        ValueError: naming the key, the value and what is accepted.
    """
    # Detectron2 parses the overrides with Hydra in apply_overrides too.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not override.is_add():
            _check_override(cfg, override.key_or_group.split("."), override.value())
    return LazyConfig.apply_overrides(cfg, list(overrides))


def _check_override(cfg, parts: Sequence[str], value: Any) -> None:
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, abc.Mapping):
            return  # a list index, or a value that is no node (apply_overrides refuses it)
        if part not in node:
            last = i == len(parts) - 1
            if not (last and _is_lazy(node) and _accepts(locate_target(node), part)):
                raise ValueError(_unknown_key(parts, i, node))
            return
        if i < len(parts) - 1:
            node = node[part]
    key, last = ".".join(parts), parts[-1]
    if OmegaConf.is_config(node) and OmegaConf.is_interpolation(node, last):
        return
    old = node[last]
    if isinstance(old, (bool, int, float)) and isinstance(value, str) and "${" not in value:
        kind = {bool: "true or false", int: "an integer"}.get(type(old), "a number")
        raise ValueError(f"{key}={value!r}: {key} takes {kind} (the config has {old!r}).")


def _accepts(target: Any, name: str) -> bool:
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return True  # no signature to check against
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _unknown_key(parts: Sequence[str], i: int, node) -> str:
    parent, key = ".".join(parts[:i]), ".".join(parts)
    keys = [k for k in node.keys() if k != "_target_"]
    if _is_lazy(node):
        try:
            params = inspect.signature(locate_target(node)).parameters.values()
            keys += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            pass
    keys = sorted(set(keys))
    close = difflib.get_close_matches(parts[i], keys, n=3)
    prefix = parent + "." if parent else ""
    hint = f" Did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
    return (
        f"{key}: the config has no key {prefix}{parts[i]}.{hint} Keys of "
        f"{parent or 'the config'}: {', '.join(keys)}. To add a new key, write +{key}=..."
    )


def check_lazy_train_config(cfg) -> None:
    """
    Refuse a LazyConfig's training length, periods or batch size that would fail only later
    (a range over a word, a division by zero), before anything is built. Keys the config does
    not have are left to the training loop.

    Raises:
        ValueError: naming the key, its value and the accepted values.
    """
    missing = object()
    for key, low, what in (
        ("train.max_iter", 1, "training iterations"),
        ("train.checkpointer.period", 1, "iterations per checkpoint"),
        ("train.eval_period", 0, "iterations per evaluation; 0: at the end"),
        ("train.log_period", 1, "iterations per log line"),
        ("dataloader.train.total_batch_size", 1, "images per step, all processes"),
    ):
        value = OmegaConf.select(cfg, key, default=missing)
        if value is missing:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an integer >= {low} ({what}); got {value!r}.")
