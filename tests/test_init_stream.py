"""ION's added modules draw their initial weights from their own random streams (issue 25)."""

import contextlib

import pytest
import torch
from detectron2.modeling import build_model
from model_utils import load_cfg, narrow_resnet

import ion_d2.modeling.meta_arch as meta_arch
import ion_d2.modeling.skip_pooling as skip_pooling
from ion_d2.modeling.init_stream import own_init_stream

STOCK = "configs/FasterRCNN_R50_FPN_synthetic.yaml"
ION = "configs/ION_R50_FPN_synthetic.yaml"
INTO_LEVELS = {
    "MODEL.ION.CONTEXT.ADD_TO_FEATURES": ["p2", "p3", "p4", "p5"],
    "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
    "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
}


def test_the_stream_leaves_the_generator_where_it_was():
    torch.manual_seed(7)
    before, seed = torch.get_rng_state(), torch.initial_seed()
    with own_init_stream("a"):
        first = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), before) and torch.initial_seed() == seed
    outside = torch.rand(5)
    torch.manual_seed(7)
    with own_init_stream("a"):
        again = torch.rand(5)
    with own_init_stream("b"):
        other = torch.rand(5)
    assert torch.equal(first, again)  # reproducible under one seed
    assert not torch.equal(first, other)  # each name its own stream
    assert not torch.equal(first, outside)  # not the draws the global stream goes on with
    assert torch.equal(torch.rand(5), outside)


def _built(path, overrides=None):
    cfg = narrow_resnet(
        load_cfg(path, {"MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM": 16, **(overrides or {})})
    )
    torch.manual_seed(3)
    model = build_model(cfg)
    return model.state_dict(), torch.get_rng_state()


def _shared_differing(a, b):
    shared = [k for k in a if k in b and a[k].shape == b[k].shape]
    return shared, [k for k in shared if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("overrides", [None, INTO_LEVELS], ids=["skip_pooling", "into_levels"])
def test_ion_r50_fpn_starts_as_the_stock_model(overrides, monkeypatch):
    stock, stock_rng = _built(STOCK)
    ion, ion_rng = _built(ION, overrides)
    shared, differing = _shared_differing(stock, ion)
    # Backbone, RPN and box head (fc6 and fc7 take 256 x 7 x 7 either way) and the predictor.
    assert any(k.startswith("proposal_generator.") for k in shared)
    assert any(k.startswith("roi_heads.box_head.") for k in shared)
    assert any(k.startswith("roi_heads.box_predictor.") for k in shared)
    assert differing == []
    assert torch.equal(stock_rng, ion_rng)  # the same ROI sampling draws follow

    # Without the streams the same comparison fails: the check can tell.
    monkeypatch.setattr(meta_arch, "own_init_stream", lambda name: contextlib.nullcontext())
    monkeypatch.setattr(skip_pooling, "own_init_stream", lambda name: contextlib.nullcontext())
    plain, _ = _built(ION, overrides)
    assert _shared_differing(stock, plain)[1]
