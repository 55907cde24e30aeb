"""Pure-Python stand-in for ``detectron2._C``, installed by ion_d2's setup.

The detectron2 v0.6 sources from PyPI (``pb1-detectron2``) ship without ``layers/csrc``,
so the compiled extension ``detectron2._C`` cannot be built from them, yet v0.6 imports it at
import time (``layers/deform_conv.py``, ``layers/rotated_boxes.py``,
``layers/roi_align_rotated.py``, ``evaluation/fast_eval_api.py``).  ``install_detectron2.py``
(beside this file) copies this file into that installation as ``detectron2/_C.py``.  Everything
that ION and the stock Faster R-CNN / evaluators need is implemented by torchvision and
pycocotools; only the ops below are compiled-only, and each raises
:class:`CompiledOpUnavailableError` naming itself.

This file is never installed over a compiled detectron2.
"""

import torch

# Marker read by install_detectron2.py's probe, to recognise this file in an installation.
ION_D2_FALLBACK = True

_HOW_TO_FIX = (
    "This detectron2 was installed by ion_d2's setup from the Python-only v0.6 sources, without "
    "its compiled extension (detectron2._C). Install a full detectron2 build into the same "
    "environment, e.g. `ION_D2_DETECTRON2=/path/to/detectron2-source-or-wheel make setup` "
    "(see README.md, 'Installing on a GPU machine, with your own detectron2')."
)


class CompiledOpUnavailableError(NotImplementedError):
    """Raised when a compiled-only detectron2 op is called on the Python-only fallback."""


def _unavailable(op_name, hint=""):
    def op(*args, **kwargs):
        raise CompiledOpUnavailableError(
            f"detectron2 op '{op_name}' needs detectron2's compiled extension. {hint}{_HOW_TO_FIX}"
        )

    op.__name__ = op_name
    op.__qualname__ = op_name
    return op


_ROTATED = "Rotated boxes are not used by ION. "
_DEFORM = "Deformable convolution is not used by ION. "
_COCO_FAST = (
    "It backs COCOEvaluator's fast AP implementation, which ion_d2's setup replaces with the "
    "official pycocotools code in this install (detectron2/evaluation/fast_eval_api.py); pass "
    "`use_fast_impl=False` to COCOEvaluator to select that code explicitly. "
)

box_iou_rotated = _unavailable("box_iou_rotated", _ROTATED)
nms_rotated = _unavailable("nms_rotated", _ROTATED)
roi_align_rotated_forward = _unavailable("roi_align_rotated_forward", _ROTATED)
roi_align_rotated_backward = _unavailable("roi_align_rotated_backward", _ROTATED)
deform_conv_forward = _unavailable("deform_conv_forward", _DEFORM)
deform_conv_backward_input = _unavailable("deform_conv_backward_input", _DEFORM)
deform_conv_backward_filter = _unavailable("deform_conv_backward_filter", _DEFORM)
modulated_deform_conv_forward = _unavailable("modulated_deform_conv_forward", _DEFORM)
modulated_deform_conv_backward = _unavailable("modulated_deform_conv_backward", _DEFORM)
InstanceAnnotation = _unavailable("InstanceAnnotation", _COCO_FAST)
COCOevalEvaluateImages = _unavailable("COCOevalEvaluateImages", _COCO_FAST)
COCOevalAccumulate = _unavailable("COCOevalAccumulate", _COCO_FAST)


def get_compiler_version():
    return "none (ion_d2 Python-only fallback for detectron2._C)"


def get_cuda_version():
    return "none (ion_d2 Python-only fallback for detectron2._C)"


def has_cuda():
    return False


# detectron2.layers.nms.nms_rotated calls torch.ops.detectron2.nms_rotated, which the compiled
# extension registers; register the same schema so that call raises the clear error above
# instead of "No such operator detectron2::nms_rotated".
_LIB = torch.library.Library("detectron2", "DEF")
_LIB.define("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")
_LIB.impl("nms_rotated", nms_rotated, "CompositeExplicitAutograd")
