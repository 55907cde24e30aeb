"""Helpers shared by the model tests: configs, tiny configs and random inputs."""

import contextlib
import importlib.util
import os
from types import ModuleType
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from ion_d2 import get_ion_cfg
from ion_d2.data import register_ion_synthetic


def ion_cfg(overrides: Optional[Dict[str, Any]] = None, *, path: Optional[str] = None) -> CfgNode:
    """
    :func:`ion_d2.get_ion_cfg` of the YAML file at ``path`` with ``overrides`` (full key -> value,
    e.g. ``{"MODEL.ION.CONTEXT.NAME": "IRNN"}``) as its command-line options: a key that does
    not exist or a value of another type raises.
    """
    opts = [item for pair in (overrides or {}).items() for item in pair]
    return get_ion_cfg(path, opts)


def narrow_resnet(cfg: CfgNode) -> CfgNode:
    """A ResNet config at R50's depth but toy widths (multiples of 32 for GroupNorm; seconds per
    step on a CPU), in place."""
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 32
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    if cfg.MODEL.ION.SKIP_POOL.REDUCE_DIM == 256:
        cfg.MODEL.ION.SKIP_POOL.REDUCE_DIM = 32
    return cfg


def load_cfg(path: str, overrides: Optional[Dict[str, Any]] = None) -> CfgNode:
    """:func:`ion_cfg` of a YAML file."""
    return ion_cfg(overrides, path=path)


def flat_cfg(node, prefix: str = "") -> Dict[str, Any]:
    """A (nested) config as {"MODEL.ION.X": value}."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flat_cfg(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def shrink_cfg(cfg):
    """Keep a config's architecture but make it CPU-test sized, without pretrained weights."""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    ion = cfg.MODEL.ION
    ion.VGG16.WIDTH_MULT = min(ion.VGG16.WIDTH_MULT, 0.125)
    ion.CONTEXT.IRNN.HIDDEN_DIM = min(ion.CONTEXT.IRNN.HIDDEN_DIM, 16)
    ion.CONTEXT.CONV.CHANNELS = min(ion.CONTEXT.CONV.CHANNELS, 16)
    if ion.SKIP_POOL.REDUCE_DIM > 0:
        ion.SKIP_POOL.REDUCE_DIM = min(ion.SKIP_POOL.REDUCE_DIM, 32)
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = min(cfg.MODEL.ROI_BOX_HEAD.FC_DIM, 64)
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 300
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    if cfg.MODEL.BACKBONE.NAME != "build_ion_vgg16_backbone":
        # The ResNet presets: R50's depth at toy widths (multiples of 32 for GroupNorm).
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 32
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
        cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 32
        cfg.MODEL.FPN.OUT_CHANNELS = 32
        cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 32
    return cfg


def random_inputs(cfg, n=2, size=(96, 128), with_sem_seg=(True, False), seed=0):
    """Random images with one or two boxes each; sem_seg for the images flagged in with_sem_seg;
    random precomputed "proposals" when the config loads them (MODEL.LOAD_PROPOSALS)."""
    g = torch.Generator().manual_seed(seed)
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    inputs = []
    for i in range(n):
        h, w = size
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 90.0, 40.0]]))
        inst.gt_classes = torch.tensor([i % num_classes, (i + 1) % num_classes])
        x = {
            "image": torch.randint(0, 256, (3, h, w), generator=g).float(),
            "instances": inst,
            "height": h,
            "width": w,
        }
        if with_sem_seg[i % len(with_sem_seg)]:
            seg = torch.zeros(h, w, dtype=torch.long)
            seg[12:60, 10:50] = 1
            seg[0:4] = 255
            x["sem_seg"] = seg
        if cfg.MODEL.LOAD_PROPOSALS:
            x["proposals"] = random_proposals((h, w), 20, g)
        inputs.append(x)
    return inputs


def random_proposals(image_size, n, generator):
    """``n`` random boxes inside ``image_size`` as precomputed proposals (best-ranked first)."""
    h, w = image_size
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([w - 8.0, h - 8.0])
    wh = 4 + torch.rand(n, 2, generator=generator) * torch.tensor([w / 2.0, h / 2.0])
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=h)
    proposals = Instances((h, w))
    proposals.proposal_boxes = Boxes(boxes)
    proposals.objectness_logits = -torch.arange(n, dtype=torch.float32)
    return proposals


@contextlib.contextmanager
def synthetic_slice(root: str, **kwargs) -> Iterator[Tuple[str, str]]:
    """
    Register a slice of the bundled dataset under ``root`` (``register_ion_synthetic``'s
    arguments), yield its (train, val) names, and unregister them afterwards.
    """
    names = register_ion_synthetic(root, **kwargs)
    try:
        yield names
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str) -> ModuleType:
    """Import a script of the repository (tools/, benchmarks/, train_net.py) as a module."""
    path = os.path.join(REPO, relative_path)
    name = "_script_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def box_record(path, boxes=((1, 1, 20, 20),), size=(48, 64), mode=BoxMode.XYWH_ABS, category=0):
    """A dataset dict of the image at ``path`` (``size`` HxW) with one annotation per box."""
    return {
        "file_name": path,
        "height": size[0],
        "width": size[1],
        "image_id": os.path.basename(path),
        "annotations": [
            {"bbox": list(b), "bbox_mode": mode, "category_id": category, "iscrowd": 0}
            for b in boxes
        ],
    }


def check_cfg(train: str, test=()) -> CfgNode:
    """ION_VGG16_tiny_cpu.yaml training ``train`` (testing ``test``) at 64 px, no seg loss: the
    dataset checks' tests."""
    cfg = load_cfg(
        os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "..", "configs", "ION_VGG16_tiny_cpu.yaml"
        )
    )
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), tuple(test)
    cfg.MODEL.ION.SEG_LOSS_ON = False
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 128
    return cfg


def ref_dropout_mask(shape, p: float, dtype=torch.float32) -> torch.Tensor:
    """
    ion_d2's dropout mask (ion_d2/modeling/dropout.py) written out from its rule: the default
    generator's 64-bit integers, uniform over all 2**64 values, are cut into four signed 16-bit
    draws each, lowest bits first; element i takes draw i and is kept (scaled by
    ``1 / (1 - q)``, ``q = round(p * 2**16) / 2**16``) when the draw is at least
    ``-2**15 + q * 2**16``.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    lanes = torch.stack([(words >> (16 * j)) & 0xFFFF for j in range(4)], dim=1).flatten()
    draws = lanes[:numel]
    draws = torch.where(draws >= 2**15, draws - 2**16, draws)
    dropped = round(p * 2**16)
    keep = draws >= dropped - 2**15
    return (keep.to(torch.float64) * (2**16 / (2**16 - dropped))).to(dtype).view(tuple(shape))
