"""Context just outside the box (issue 26): the bundled local-context data (ion_synth_local:
kite and bird, one glyph, told apart only by a thin string) and the skip pooler's enlarged
boxes (MODEL.ION.SKIP_POOL.ENLARGED)."""

import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from model_utils import load_cfg, load_script, random_inputs, shrink_cfg
from PIL import Image
from torchvision.ops import roi_pool

from ion_d2.data.synthetic import generate_synthetic_dataset, render, variant_spec
from ion_d2.data.synthetic.glyphs import render_glyph
from ion_d2.data.synthetic.meta import (
    LOCAL_GLYPH,
    LOCAL_TRAIN_DATASET_NAME,
    LOCAL_VAL_DATASET_NAME,
    PALETTE,
    ROAD_ID,
    WATER_ID,
)
from ion_d2.modeling.enlarged_boxes import enlarge_boxes
from ion_d2.modeling.skip_pooling import IONSkipPooler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(REPO, "configs", "ION_VGG16_synthetic_local.yaml")
NUM_IMAGES = 12
SPEC = variant_spec("local")
KITE, BIRD = (SPEC.thing_classes.index(c) + 1 for c in ("kite", "bird"))


@pytest.fixture(scope="module")
def local_split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth_local"))
    json_file = generate_synthetic_dataset(
        root, split="train", num_images=NUM_IMAGES, seed=0, variant="local"
    )
    with open(json_file) as f:
        coco = json.load(f)
    base = os.path.join(root, "ion_synth_local", "train")
    images = {
        im["id"]: np.asarray(Image.open(os.path.join(base, "images", im["file_name"])))
        for im in coco["images"]
    }
    labels = {
        im["id"]: np.asarray(Image.open(os.path.join(base, "sem_seg", im["file_name"])))
        for im in coco["images"]
    }
    return {"root": root, "coco": coco, "images": images, "labels": labels}


def _string_mask(image, label):
    """Pixels of the string colour labelled background (strings; nothing else is that colour)."""
    return np.all(image == np.array(PALETTE["string"], dtype=np.uint8), axis=2) & (label == 0)


def _zone(bbox, shape):
    x, y, w, h = bbox
    side = max(w, h)
    y0, x0 = max(0, y - side), max(0, x - side)
    zone = np.zeros(shape, dtype=bool)
    zone[y0 : y + h + side, x0 : x + w + side] = True
    return zone


def test_kite_and_bird_are_identical_inside_the_box_and_told_apart_by_a_string(local_split):
    coco = local_split["coco"]
    assert [c["name"] for c in coco["categories"]] == list(SPEC.thing_classes)
    seen = {KITE: 0, BIRD: 0}
    for ann in coco["annotations"]:
        if ann["category_id"] not in seen:
            continue
        image, label = (
            local_split["images"][ann["image_id"]],
            local_split["labels"][ann["image_id"]],
        )
        x, y, w, h = ann["bbox"]
        # Nothing hides a flyer: the crop is exactly the shared glyph at this size.
        rgb, mask = render_glyph(LOCAL_GLYPH, w, h)
        assert mask.all() and ann["area"] == w * h
        np.testing.assert_array_equal(image[y : y + h, x : x + w], rgb)
        strings = _string_mask(image, label)
        near = strings & _zone(ann["bbox"], label.shape)
        if ann["category_id"] == BIRD:
            assert not near.any()  # no string within one box side of a bird
        else:
            # The kite's string starts on the row under its box, at the box's middle, and
            # stays within one box side.
            assert near.any()
            assert near[y + h, x : x + w].any() and not near[y : y + h].any()
            cols = np.nonzero(near[y + h])[0]
            assert abs(cols.mean() - (x + w / 2)) <= 1.5
        seen[ann["category_id"]] += 1
    assert seen[KITE] > 0 and seen[BIRD] > 0, seen
    # Free strings elsewhere: more string pixels than the kites' strings, on road or water.
    for image_id, image in local_split["images"].items():
        label = local_split["labels"][image_id]
        strings = _string_mask(image, label)
        kites = [
            a for a in coco["annotations"] if a["image_id"] == image_id and a["category_id"] == KITE
        ]
        own = np.zeros_like(strings)
        for a in kites:
            own |= strings & _zone(a["bbox"], strings.shape)
        assert (strings & ~own).any(), image_id


def test_local_label_maps_use_the_variant_ids_and_base_objects_stay(local_split):
    allowed = set(range(len(SPEC.sem_seg_classes)))
    for ann in local_split["coco"]["annotations"]:
        label = local_split["labels"][ann["image_id"]]
        mask = mask_util.decode(ann["segmentation"]).astype(bool)
        name = SPEC.thing_classes[ann["category_id"] - 1]
        assert np.all(label[mask] == SPEC.sem_seg_classes.index(name))
    for label in local_split["labels"].values():
        assert set(np.unique(label).tolist()) <= allowed
        assert {ROAD_ID, WATER_ID} & set(np.unique(label).tolist())
    # The base dataset's images are drawn first, by the same random stream: the local image's
    # base objects are the base image's, in the same places (flyers may hide parts of them).
    base = render.render_sample("train", 0, 1)
    local = render.render_sample("train", 0, 1, variant="local")
    assert [o.bbox for o in local.objects[: len(base.objects)]] == [o.bbox for o in base.objects]
    assert len(local.objects) > len(base.objects)


def test_local_variant_is_registered_with_its_pairs():
    for name in (LOCAL_TRAIN_DATASET_NAME, LOCAL_VAL_DATASET_NAME):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes[-2:] == ["kite", "bird"] and len(meta.thing_classes) == 8
        assert meta.context_pairs[-1] == ["kite", "bird"]
        assert meta.num_sem_seg_classes == 12
        assert os.path.join("ion_synth_local", "annotations") in meta.json_file
    with pytest.raises(ValueError, match="variant='near'.*'base', 'local'"):
        variant_spec("near")


# ------------------------------------------------------------------------------------------
# The skip pooler's enlarged boxes.
# ------------------------------------------------------------------------------------------
SHAPES = [ShapeSpec(channels=3, stride=4), ShapeSpec(channels=5, stride=8)]


def test_enlarge_boxes_scales_around_the_centre():
    boxes = [Boxes(torch.tensor([[10.0, 20.0, 30.0, 60.0]])), Boxes(torch.zeros(0, 4))]
    out = enlarge_boxes(boxes, 3.0)
    assert out[0].tensor.tolist() == [[-10.0, -20.0, 50.0, 100.0]]
    assert out[1].tensor.shape == (0, 4)


def test_enlarged_descriptor_is_the_pooling_of_the_enlarged_box():
    """conv3/conv4 over the boxes, then conv3 over the boxes enlarged 3x: the reference pools
    the enlarged boxes by hand, in both the training and the inference path."""
    pooler = IONSkipPooler(
        input_shapes=SHAPES + SHAPES[:1],
        output_size=7,
        sampling_ratio=0,
        pooler_type="ROIPool",
        scale_init=2.0,
        out_channels=4,
        dropout=0.0,
        feature_names=["conv3", "conv4", "conv3@x3"],
        box_factors=[1.0, 1.0, 3.0],
    )
    g = torch.Generator().manual_seed(0)
    feats = [
        torch.relu(torch.randn(2, s.channels, 64 // s.stride, 64 // s.stride, generator=g))
        for s in SHAPES
    ]
    boxes = [
        Boxes(torch.tensor([[20.0, 20.0, 30.0, 36.0], [0.0, 0.0, 12.0, 12.0]])),
        Boxes(torch.tensor([[30.0, 8.0, 50.0, 20.0]])),
    ]
    sizes = [(64, 64), (64, 64)]
    out = pooler(feats + feats[:1], boxes, sizes)

    def rois(box_lists):
        return torch.cat(
            [
                torch.cat([torch.full((len(b), 1), float(i)), b.tensor], 1)
                for i, b in enumerate(box_lists)
            ]
        )

    big = [Boxes(b.tensor.clone()) for b in boxes]
    for b in big:
        c = (b.tensor[:, :2] + b.tensor[:, 2:]) / 2
        half = 1.5 * (b.tensor[:, 2:] - b.tensor[:, :2])
        b.tensor = torch.cat([c - half, c + half], 1)
    parts = [
        roi_pool(feats[0], rois(boxes), 7, 1 / 4),
        roi_pool(feats[1], rois(boxes), 7, 1 / 8),
        # Bins wholly outside the image read nothing: 0 (IONROIPool's rule).
        roi_pool(feats[0], rois(big), 7, 1 / 4),
    ]
    ref = torch.cat([p / p.flatten(1).norm(dim=1)[:, None, None, None] for p in parts], 1)
    ref = F.conv2d(
        ref * pooler.scale[None, :, None, None], pooler.reduce.weight, pooler.reduce.bias
    )
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert pooler.scale.grad[-3:].abs().sum() > 0
    pooler.eval()
    with torch.no_grad():
        fast = pooler(feats + feats[:1], boxes, sizes)
    assert torch.allclose(fast, ref, atol=1e-5)
    with pytest.raises(ValueError, match="one factor >= 1 per pooled feature"):
        IONSkipPooler(
            input_shapes=SHAPES, output_size=7, sampling_ratio=0, pooler_type="ROIPool",
            box_factors=[1.0, 0.5],
        )  # fmt: skip


# The enlarged boxes on conv3 and conv4, as the local preset had them before the local-context
# branch replaced them (docs/BENCHMARKS.md, "Context just outside the box").
ENLARGED = {
    "MODEL.ION.SKIP_POOL.ENLARGED.IN_FEATURES": ["conv3", "conv4"],
    "MODEL.ION.LOCAL_CONTEXT.IN_FEATURE": "",
}


def test_preset_builds_the_enlarged_descriptors_and_the_keys_are_checked():
    cfg = shrink_cfg(load_cfg(PRESET, ENLARGED))
    model = build_model(cfg)
    heads = model.roi_heads
    pooler = heads.box_pooler
    assert heads.box_in_features == ["conv3", "conv4", "conv5", "context", "conv3", "conv4"]
    assert pooler.feature_names[-2:] == ["conv3@x3", "conv4@x3"]
    assert pooler.box_factors == (1.0, 1.0, 1.0, 1.0, 3.0, 3.0)
    channels = sum(model.backbone.output_shape()[f].channels for f in ("conv3", "conv4"))
    off = build_model(
        shrink_cfg(load_cfg(PRESET, {**ENLARGED, "MODEL.ION.SKIP_POOL.ENLARGED.IN_FEATURES": []}))
    )
    assert pooler.reduce.in_channels == off.roi_heads.box_pooler.reduce.in_channels + channels
    # It trains: the enlarged descriptors' channels get gradients.
    model.train()
    from detectron2.utils.events import EventStorage

    with EventStorage():
        losses = model(random_inputs(cfg))
    sum(losses.values()).backward()
    assert pooler.reduce.weight.grad[:, -channels:].abs().sum() > 0

    with pytest.raises(ValueError, match=r"ENLARGED.FACTOR=1.0 must be > 1"):
        build_model(
            shrink_cfg(load_cfg(PRESET, {**ENLARGED, "MODEL.ION.SKIP_POOL.ENLARGED.FACTOR": 1.0}))
        )
    with pytest.raises(ValueError, match=r"ENLARGED.IN_FEATURES name \['conv9'\]"):
        build_model(
            shrink_cfg(
                load_cfg(
                    PRESET, {**ENLARGED, "MODEL.ION.SKIP_POOL.ENLARGED.IN_FEATURES": ["conv9"]}
                )
            )
        )
    # Weights trained without the option do not load into a model with it, naming the keys.
    with pytest.raises(ValueError, match="ENLARGED.IN_FEATURES"):
        model.roi_heads.box_pooler.load_state_dict(off.roi_heads.box_pooler.state_dict())


def test_gate_reports_the_pairs_of_the_local_pair(monkeypatch, tmp_path, capsys):
    gate = load_script("benchmarks/accuracy_gate.py")
    assert gate.PAIRS["local"]["ion"][0] == os.path.basename(PRESET)
    assert gate.PAIRS["local"]["baseline"][1] == ["MODEL.ION.LOCAL_CONTEXT.IN_FEATURE", ""]

    def run_one(args, model, seed):
        right = {"baseline": 60.0, "ion": 90.0}[model] + seed
        return {
            "AP": 10.0 + seed, "APs": 1.0, "AP_context": 2.0,
            "pairs": {"kite/bird found": 80.0, "kite/bird right class": right},
        }  # fmt: skip

    monkeypatch.setattr(gate, "run_one", run_one)
    assert gate.main(["--pair", "local", "--output-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert summary["pairs"]["ion"]["kite/bird right class"] == pytest.approx([92.0, 1.0])
    assert summary["pairs"]["baseline"]["kite/bird right class"][0] == pytest.approx(62.0)
    assert "kite/bird right class 92.0 ± 1.0" in capsys.readouterr().out
