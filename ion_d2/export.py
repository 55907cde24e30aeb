"""
Export a trained ION model to TorchScript by tracing, with Detectron2's ``TracingAdapter``.

What is exported is the inference graph of :meth:`IONRCNN.inference` for one image (a
``(3, H, W)`` float tensor in ``INPUT.FORMAT``, already resized as the test loader resizes it):
backbone, context module, RPN, skip-pooling ROI heads and Fast R-CNN's per-class NMS, without
the rescaling to the original image size (``do_postprocess=False``) and without box voting
(``MODEL.ION.BOX_VOTING.ENABLED`` must be False: it is refused, see :func:`trace_ion_model`).
Nothing in ion_d2 bakes the traced input size into the graph: under ``torch.jit.is_tracing()``
the CPU sparse-table ROI pooling gives way to ``torchvision.ops.roi_pool``, the fused skip
pooling to the plain one, the IRNN's step loop to a scripted loop over the actual map size, and
the padding masks are computed from the traced image size. A trace at one size gives eager's
detections at any other size (``tests/test_export.py``).
"""

import importlib
import importlib.util
import logging
import os
import sys
from typing import Dict, List

import torch
from torch import nn

__all__ = ["get_tracing_adapter", "ion_inference_fn", "trace_ion_model"]

logger = logging.getLogger(__name__)


def get_tracing_adapter() -> type:
    """
    Detectron2's ``TracingAdapter`` class (``detectron2/export/flatten.py``).

    On upstream Detectron2 this is ``from detectron2.export import TracingAdapter``. On v0.6,
    ``detectron2/export/__init__.py`` first imports its Caffe2 exporter, which fails without
    Caffe2 (gone from PyTorch since 2.0): "No module named 'caffe2'". Then the module
    ``detectron2.export.flatten`` is imported on its own, its package's ``__init__`` skipped;
    ``detectron2.export`` itself is left unimported, as before.
    """
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("caffe2"):
            raise
    import detectron2

    package = "detectron2.export"
    spec = importlib.util.spec_from_file_location(
        package,
        os.path.join(os.path.dirname(detectron2.__file__), "export", "__init__.py"),
        submodule_search_locations=[os.path.join(os.path.dirname(detectron2.__file__), "export")],
    )
    # The package's module object without running its __init__, only while its submodule
    # (and flatten's own relative import, torchscript_patch) is imported.
    sys.modules[package] = importlib.util.module_from_spec(spec)
    try:
        flatten = importlib.import_module(package + ".flatten")
    finally:
        del sys.modules[package]
    return flatten.TracingAdapter


def ion_inference_fn(model: nn.Module, inputs: List[Dict[str, torch.Tensor]]):
    """
    The inference function :func:`trace_ion_model` traces: ``model.inference`` without
    postprocessing, its ``Instances`` returned as ``[{"instances": ...}]``.
    """
    instances = model.inference(inputs, do_postprocess=False)
    return [{"instances": i} for i in instances]


def trace_ion_model(model: nn.Module, image: torch.Tensor):
    """
    Trace ``model`` (an :class:`IONRCNN` or :class:`GeneralizedRCNN` in eval mode) on one image.

    Args:
        model (nn.Module): the model, in eval mode.
        image (Tensor): a (3, H, W) float tensor, as the test loader gives it ("image").

    Returns:
        tuple: the traced ``torch.jit.ScriptModule`` (call it with a (3, H, W) tensor of any
        size; save it with ``torch.jit.save``) and the ``TracingAdapter``, whose
        ``outputs_schema`` turns the traced module's flat outputs back into
        ``[{"instances": Instances}]``.
    """
    if model.training:
        raise ValueError("trace_ion_model traces inference: call model.eval() first.")
    roi_heads = getattr(model, "roi_heads", None)
    if getattr(roi_heads, "box_voting", False):
        raise ValueError(
            "MODEL.ION.BOX_VOTING.ENABLED is True, but box voting (section 4.2) is not part of "
            "the exported graph: its second round of regression and per-box vote loop over a "
            "data-dependent number of detections. Set MODEL.ION.BOX_VOTING.ENABLED False "
            "before building the model to export (the README's export section)."
        )
    adapter = get_tracing_adapter()(model, [{"image": image}], ion_inference_fn)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    return traced, adapter
