#!/usr/bin/env python
"""Convert ImageNet VGG16 weights into a Detectron2 checkpoint for ION.

The output loads with ``DetectionCheckpointer`` (``MODEL.WEIGHTS``) into a model whose backbone
is ``build_ion_vgg16_backbone`` (WIDTH_MULT 1.0, NORM "") and whose box head is ``IONFCHead``
(NUM_FC 2, FC_DIM 4096, POOLER_RESOLUTION 7, 512 input channels):

- ``conv1_1`` ... ``conv5_3`` -> ``backbone.conv1_1`` ... ``backbone.conv5_3``
- fc6 -> ``roi_heads.box_head.fc1``, fc7 -> ``roi_heads.box_head.fc2``
- fc8 (the ImageNet 1000-way classifier) is dropped.

Two input layouts are accepted (a ``.pth`` state dict, optionally wrapped in
``{"state_dict": ...}`` or ``{"model": ...}``):

- torchvision ``vgg16``: ``features.N.*`` and ``classifier.{0,3,6}.*``. These weights expect RGB
  input in 0-255 normalised by ImageNet's mean and std:
  ``INPUT.FORMAT "RGB"``, ``MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]``,
  ``MODEL.PIXEL_STD [58.395, 57.12, 57.375]``.
- Caffe VGG16 (e.g. Fast R-CNN's ``VGG16.v2.caffemodel`` converted to PyTorch):
  ``conv1_1.*`` ... ``conv5_3.*``, ``fc6.*``, ``fc7.*`` and optionally ``fc8.*``. These expect
  BGR input in 0-255 with only the mean subtracted:
  ``INPUT.FORMAT "BGR"``, ``MODEL.PIXEL_MEAN [103.939, 116.779, 123.68]``,
  ``MODEL.PIXEL_STD [1.0, 1.0, 1.0]``.

Usage::

    python tools/convert_vgg16_to_d2.py vgg16-397923af.pth vgg16_ion_d2.pth
"""

import argparse
import logging
from typing import Dict, List, Mapping, Optional, Tuple

import torch

logger = logging.getLogger("convert_vgg16_to_d2")

_CONV_NAMES = [
    f"conv{stage}_{idx}"
    for stage, num_convs in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for idx in range(1, num_convs + 1)
]
# Indices of the convolutions in torchvision's ``vgg16().features`` (ReLUs and pools between).
_TORCHVISION_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
_BOX_HEAD_PREFIX = "roi_heads.box_head."

# Source layer name -> Detectron2 module name; None drops the layer.
_TORCHVISION_LAYERS: Dict[str, Optional[str]] = {
    **{
        f"features.{i}": f"backbone.{name}"
        for i, name in zip(_TORCHVISION_CONV_INDICES, _CONV_NAMES)
    },
    "classifier.0": _BOX_HEAD_PREFIX + "fc1",
    "classifier.3": _BOX_HEAD_PREFIX + "fc2",
    "classifier.6": None,
}
_CAFFE_LAYERS: Dict[str, Optional[str]] = {
    **{name: f"backbone.{name}" for name in _CONV_NAMES},
    "fc6": _BOX_HEAD_PREFIX + "fc1",
    "fc7": _BOX_HEAD_PREFIX + "fc2",
    "fc8": None,
}
_OPTIONAL_LAYERS = {"classifier.6", "fc8"}

# Input settings each layout's weights were trained with: (INPUT.FORMAT, PIXEL_MEAN, PIXEL_STD).
INPUT_SETTINGS: Dict[str, Tuple[str, List[float], List[float]]] = {
    "torchvision": ("RGB", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]),
    "caffe": ("BGR", [103.939, 116.779, 123.68], [1.0, 1.0, 1.0]),
}


def detect_vgg16_layout(sd: Mapping[str, object]) -> str:
    """
    Tell which naming a VGG16 state dict uses.

    Args:
        sd (Mapping[str, Tensor]): the state dict.

    Returns:
        str: "torchvision" (``features.N.*``) or "caffe" (``conv1_1.*``).
    """
    if any(k.startswith("features.") or k.startswith("classifier.") for k in sd):
        return "torchvision"
    if any(k.startswith("conv1_1.") for k in sd):
        return "caffe"
    raise ValueError(
        "Not a VGG16 state dict: expected torchvision keys ('features.0.weight', ...) or Caffe "
        f"keys ('conv1_1.weight', ...); got keys {sorted(sd)[:8]}..."
    )


def convert_vgg16_state_dict(sd: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """
    Rename a VGG16 ImageNet state dict to ION's Detectron2 module names.

    Args:
        sd (Mapping[str, Tensor]): torchvision ``vgg16`` or Caffe-named VGG16 weights (tensors
            or numpy arrays), see the module docstring.

    Returns:
        dict[str, Tensor]: ``backbone.conv1_1.weight`` ... ``backbone.conv5_3.bias``,
        ``roi_heads.box_head.fc{1,2}.{weight,bias}``; fc8 is dropped.

    Raises:
        ValueError: when a key is not a VGG16 parameter, or a VGG16 parameter is missing.
    """
    layout = detect_vgg16_layout(sd)
    layers = _TORCHVISION_LAYERS if layout == "torchvision" else _CAFFE_LAYERS
    expected = {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")}

    unknown = sorted(k for k in sd if k not in expected)
    if unknown:
        raise ValueError(
            f"Unknown keys in the {layout} VGG16 state dict: {unknown}. Accepted keys: "
            f"{sorted(expected)} (batch-normalised VGG16 is not supported)."
        )
    missing = sorted(
        k for k in expected if k not in sd and k.rsplit(".", 1)[0] not in _OPTIONAL_LAYERS
    )
    if missing:
        raise ValueError(f"Missing keys in the {layout} VGG16 state dict: {missing}.")

    converted = {}
    for key, value in sd.items():
        layer, param = key.rsplit(".", 1)
        target = layers[layer]
        if target is None:
            continue
        converted[f"{target}.{param}"] = torch.as_tensor(value)
    return converted


def _unwrap(obj: object) -> Mapping[str, object]:
    """Return the state dict inside a checkpoint saved as ``{"state_dict": sd}`` or
    ``{"model": sd}``, or the object itself."""
    if isinstance(obj, Mapping):
        for wrapper_key in ("state_dict", "model"):
            if isinstance(obj.get(wrapper_key), Mapping):
                return obj[wrapper_key]
        return obj
    raise ValueError(f"Expected a state dict (a mapping), got a {type(obj).__name__}.")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision or Caffe-named VGG16 state dict (.pth)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pth)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not args.output.endswith((".pth", ".pt")):
        # DetectionCheckpointer reads ".pkl" as a pickle, not as torch.save's format.
        parser.error(f"output must end with .pth or .pt, got {args.output!r}")

    sd = _unwrap(torch.load(args.input, map_location="cpu", weights_only=True))
    layout = detect_vgg16_layout(sd)
    model = convert_vgg16_state_dict(sd)
    torch.save(
        {"model": model, "__author__": "ion_d2 convert_vgg16_to_d2", "matching_heuristics": False},
        args.output,
    )
    logger.info(
        "Wrote %d tensors from %s (%s layout) to %s", len(model), args.input, layout, args.output
    )

    input_format, pixel_mean, pixel_std = INPUT_SETTINGS[layout]
    logger.info(
        "These weights need, in your config:\n"
        '  INPUT:\n    FORMAT: "%s"\n'
        '  MODEL:\n    WEIGHTS: "%s"\n    PIXEL_MEAN: %s\n    PIXEL_STD: %s',
        input_format,
        args.output,
        pixel_mean,
        pixel_std,
    )


if __name__ == "__main__":
    main()
