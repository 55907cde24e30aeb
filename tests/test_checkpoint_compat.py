"""Checkpoints written by ion_d2 0.1.0 (commit 18d178f) load into today's models unchanged.

The fixtures were produced by that commit's code: ``state_dict_keys_v0.1.0.json`` holds, for
every config then in configs/, the resolved config (built with ``shrink_cfg``) and its model's
state-dict keys and shapes; ``ion_tiny_v0.1.0.pt`` a tiny ION model's resolved config, weights and
the detections it gave on one image. Configs are rebuilt from the stored dumps, so later edits
of the YAML files do not change what is checked: the code that turns a config into a model.

The stored detections (of this file and of the ``ion_tiny_<commit>_detections.pt`` fixtures)
were recorded again, weights untouched, when max pooling stopped reading cells past each image's
valid cells (0.2.0, ``IONROIPool``'s ``image_sizes``): boxes at the image's right or bottom border
had read the size-divisibility padding's activations, which depend on the padding. The scores
moved by at most 0.04 (v0.1.0) and 0.012 (de485dc, 7bdb391); the boxes kept their count.
"""

import json
import os

import pytest
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from model_utils import ion_cfg

from ion_d2.engine.checkpoint import IONCheckpointer
from ion_d2.modeling.context.irnn import IRNN

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


def _rewire_as_stored(model, dump: str):
    # A config stored before MODEL.ION.CONTEXT.IRNN.WIRING existed meant "per_layer", the
    # default until 0.2.0; IONCheckpointer recognises it from a checkpoint's keys.
    if "WIRING" not in dump:
        for module in model.modules():
            if isinstance(module, IRNN):
                module.rewire("per_layer")
    return model


@pytest.mark.parametrize("config", sorted(OLD_MODELS))
def test_state_dict_keys_and_shapes_unchanged(config):
    old = OLD_MODELS[config]
    model = _rewire_as_stored(build_model(_cfg_from_dump(old["config"])), old["config"])
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


def test_old_checkpoint_loads_and_detects_the_same(tmp_path):
    blob = torch.load(os.path.join(FIXTURES, "ion_tiny_v0.1.0.pt"), weights_only=False)
    model = _rewire_as_stored(build_model(_cfg_from_dump(blob["config"])), blob["config"]).eval()
    incompatible = model.load_state_dict(blob["model"], strict=False)
    assert not incompatible.unexpected_keys
    assert set(incompatible.missing_keys) <= ADDED_KEYS
    _assert_same_detections(model, blob)
    # As a user loads it: the config stored with it (no WIRING: the default is now "paper"),
    # and the checkpointer, which recognises the "per_layer" wiring from the keys.
    path = str(tmp_path / "model_v0.1.0.pth")
    torch.save({"model": blob["model"]}, path)
    model = build_model(_cfg_from_dump(blob["config"])).eval()
    assert {m.wiring for m in model.modules() if isinstance(m, IRNN)} == {"paper"}
    IONCheckpointer(model).load(path)
    assert {m.wiring for m in model.modules() if isinstance(m, IRNN)} == {"per_layer"}
    _assert_same_detections(model, blob)


def test_a_checkpoint_of_the_other_wiring_is_not_rewired_for_training(tmp_path):
    blob = torch.load(os.path.join(FIXTURES, "ion_tiny_v0.1.0.pt"), weights_only=False)
    path = str(tmp_path / "model_v0.1.0.pth")
    torch.save({"model": blob["model"]}, path)
    model = build_model(_cfg_from_dump(blob["config"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'per_layer' wiring.*set WIRING to 'per_layer'"):
        IONCheckpointer(model, optimizer=optimizer).load(path)


@pytest.mark.parametrize("commit", ["de485dc", "7bdb391"])
def test_checkpoint_written_at_an_earlier_commit_loads_and_detects_the_same(commit):
    # Written by the trainer's checkpointer at that commit (de485dc: before the package moved
    # into ion_d2/modeling and ion_d2/engine; 7bdb391: before 0.2.0, whose default IRNN wiring
    # is the paper's) by fixtures/make_checkpoint_fixture.py, run with that commit's ion_d2 on
    # PYTHONPATH: a tiny ION model and its detections on one image (recorded again since, see the
    # module's docstring), loaded with its stored config.
    expected = torch.load(
        os.path.join(FIXTURES, f"ion_tiny_{commit}_detections.pt"), weights_only=False
    )
    model = build_model(_cfg_from_dump(expected["config"])).eval()
    IONCheckpointer(model).load(os.path.join(FIXTURES, f"ion_tiny_{commit}.pth"))
    _assert_same_detections(model, expected)
