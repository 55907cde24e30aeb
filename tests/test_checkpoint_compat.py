"""Checkpoints written by ion_d2 0.1.0 (commit 18d178f) load into today's models unchanged.

The fixtures were produced by that commit's code: ``state_dict_keys_v0.1.0.json`` holds, for
every config then in configs/, the resolved config (built with ``shrink_cfg``) and its model's
state-dict keys and shapes; ``ion_tiny_v0.1.0.pt`` a tiny ION model's resolved config, weights and
the detections it gave on one image. Configs are rebuilt from the stored dumps, so later edits
of the YAML files do not change what is checked: the code that turns a config into a model.
"""

import json
import os

import pytest
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from model_utils import ion_cfg

from ion_d2.engine.checkpoint import IONCheckpointer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
with open(os.path.join(FIXTURES, "state_dict_keys_v0.1.0.json")) as f:
    OLD_MODELS = json.load(f)


def _cfg_from_dump(dump: str) -> CfgNode:
    cfg = ion_cfg()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(dump))
    return cfg


# Entries added since 0.1.0 that old checkpoints lack: the skip pooler's feature order, which a
# checkpoint without it loads around with a warning (ion_d2.modeling.skip_pooling).
ADDED_KEYS = {"roi_heads.box_pooler.feature_order"}


@pytest.mark.parametrize("config", sorted(OLD_MODELS))
def test_state_dict_keys_and_shapes_unchanged(config):
    old = OLD_MODELS[config]
    model = build_model(_cfg_from_dump(old["config"]))
    new = {k: list(v.shape) for k, v in model.state_dict().items() if k not in ADDED_KEYS}
    assert new == old["state_dict"]


def _assert_same_detections(model, expected):
    """``model``'s detections on ``expected["image"]`` are the stored ones."""
    image = expected["image"]
    with torch.no_grad():
        out = model([{"image": image.float(), "height": image.shape[1], "width": image.shape[2]}])
    instances = out[0]["instances"]
    assert len(instances) == len(expected["scores"]) > 0
    torch.testing.assert_close(instances.pred_boxes.tensor, expected["pred_boxes"])
    torch.testing.assert_close(instances.scores, expected["scores"])
    assert torch.equal(instances.pred_classes, expected["pred_classes"])


def test_old_checkpoint_loads_and_detects_the_same():
    blob = torch.load(os.path.join(FIXTURES, "ion_tiny_v0.1.0.pt"), weights_only=False)
    model = build_model(_cfg_from_dump(blob["config"])).eval()
    incompatible = model.load_state_dict(blob["model"], strict=False)
    assert not incompatible.unexpected_keys
    assert set(incompatible.missing_keys) <= ADDED_KEYS
    _assert_same_detections(model, blob)


def test_checkpoint_written_by_de485dc_loads_and_detects_the_same():
    # Written by the trainer's checkpointer at commit de485dc, before the package moved into
    # ion_d2/modeling and ion_d2/engine (fixtures/make_de485dc_fixture.py, run with that
    # commit's ion_d2 on PYTHONPATH): a tiny ION model and its detections on one image.
    expected = torch.load(
        os.path.join(FIXTURES, "ion_tiny_de485dc_detections.pt"), weights_only=False
    )
    model = build_model(_cfg_from_dump(expected["config"])).eval()
    IONCheckpointer(model).load(os.path.join(FIXTURES, "ion_tiny_de485dc.pth"))
    _assert_same_detections(model, expected)
