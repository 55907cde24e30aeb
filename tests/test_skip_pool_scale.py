"""Section 5.2's measured skip-pooling scale (MODEL.ION.SKIP_POOL.SCALE_INIT -1)."""

import copy
import logging
import math
import os
from types import SimpleNamespace

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from model_utils import load_cfg, random_inputs, shrink_cfg, synthetic_slice
from torchvision.ops import roi_pool

import ion_d2.engine.skip_pool_scale as skip_pool_scale
from ion_d2.engine import IONTrainer, SkipPoolScaleHook
from ion_d2.engine.skip_pool_scale import (
    measure_pooled_norms,
    measure_skip_pool_scale,
    training_batches,
)
from ion_d2.modeling.skip_pooling import PENDING_SCALE_FIX

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "ION_VGG16_tiny_cpu.yaml")
FEATURES = ["conv3", "conv4", "conv5", "context"]


def _cfg(**vgg16):
    cfg = shrink_cfg(load_cfg(TINY))
    cfg.MODEL.ION.SKIP_POOL.SCALE_INIT = -1.0
    cfg.MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES = 3
    for key, value in vgg16.items():
        setattr(cfg.MODEL.ION.VGG16, key, value)
    return cfg


def _reference_norms(model, inputs, backbone_mode_train=False):
    """Pooled-norm means computed directly with torchvision's roi_pool."""
    model.eval()
    model.backbone.train(backbone_mode_train)
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features.update(model.context(features))
        proposals, _ = model.proposal_generator(images, features, None)
    shapes = dict(model.backbone.output_shape())
    shapes.update(model.context.output_shape())
    rois = torch.cat(
        [
            torch.cat([torch.full((len(p), 1), float(i)), p.proposal_boxes.tensor], dim=1)
            for i, p in enumerate(proposals)
        ]
    )
    per_roi, per_location = {}, {}
    for name in FEATURES:
        pooled = roi_pool(features[name], rois, 7, 1.0 / shapes[name].stride)
        per_roi[name] = pooled.flatten(1).norm(dim=1).mean().item()
        per_location[name] = pooled.norm(dim=1).mean().item()
    return per_roi, per_location, len(rois)


def test_measured_norms_match_a_direct_computation():
    cfg = _cfg()
    model = build_model(cfg)
    model.train()
    inputs = random_inputs(cfg)
    norms = measure_pooled_norms(model, [inputs[:1], inputs[1:]])
    assert model.training  # mode restored
    per_roi, per_location, num_rois = _reference_norms(model, inputs)
    assert norms.num_rois == num_rois > 0 and norms.num_images == 2
    assert list(norms.per_roi) == FEATURES
    for name in FEATURES:
        assert norms.per_roi[name] == pytest.approx(per_roi[name], rel=1e-4)
        assert norms.per_location[name] == pytest.approx(per_location[name], rel=1e-4)
    # Different layers have different amplitudes: the reason for L2 normalisation (Table 4).
    assert len({round(v, 3) for v in norms.per_roi.values()}) == len(FEATURES)


def test_batch_norm_uses_batch_statistics_without_updating_them():
    cfg = _cfg(NORM="BN")
    model = build_model(cfg)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn
    before = copy.deepcopy([m.state_dict() for m in bn])
    inputs = random_inputs(cfg)
    norms = measure_pooled_norms(model, [inputs])
    for m, state in zip(bn, before):
        for key, value in state.items():
            assert torch.equal(m.state_dict()[key], value)
    # As a training step's features: BN with the batch's statistics.
    per_roi, _, _ = _reference_norms(copy.deepcopy(model), inputs, backbone_mode_train=True)
    assert norms.per_roi["conv5"] == pytest.approx(per_roi["conv5"], rel=1e-4)
    eval_roi, _, _ = _reference_norms(copy.deepcopy(model), inputs)
    assert abs(eval_roi["conv5"] / per_roi["conv5"] - 1) > 0.05


def test_a_pending_scale_refuses_to_run_and_bad_settings_raise():
    cfg = _cfg()
    model = build_model(cfg)
    pooler = model.roi_heads.box_pooler
    assert pooler.scale_pending and torch.isnan(pooler.scale).all()
    model.eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="scale is not set.*SCALE_INIT -1"):
        model(random_inputs(cfg))

    bad = cfg.clone()
    bad.MODEL.ION.SKIP_POOL.SCALE_INIT = -2.0
    with pytest.raises(ValueError, match=r"-1 \(measure it\).*got -2.0"):
        build_model(bad)
    bad = cfg.clone()
    bad.MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES = 0
    with pytest.raises(ValueError, match="SCALE_MEASURE_IMAGES must be >= 1.*got 0"):
        training_batches(bad, bad.MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES)
    bad = cfg.clone()
    bad.MODEL.ROI_HEADS.IN_FEATURES = ["conv3", "conv4", "context"]
    with pytest.raises(ValueError, match="'conv5'.*does not pool"):
        build_model(bad)


@pytest.mark.parametrize("norm,expected", [("roi", 3.0), ("location", 0.3)])
def test_every_channel_gets_the_reference_features_norm(norm, expected, monkeypatch):
    # conv5 (MODEL.ION.CONTEXT.IN_FEATURE), measured the way SKIP_POOL.NORM normalises.
    fake = skip_pool_scale.PooledNorms(
        per_roi={"conv3": 1.0, "conv4": 2.0, "conv5": 3.0, "context": 4.0},
        per_location={"conv3": 0.1, "conv4": 0.2, "conv5": 0.3, "context": 0.4},
        num_rois=10,
        num_images=2,
    )
    monkeypatch.setattr(skip_pool_scale, "measure_pooled_norms", lambda model, batches: fake)
    cfg = _cfg()
    cfg.MODEL.ION.SKIP_POOL.NORM = norm
    model = build_model(cfg)
    assert measure_skip_pool_scale(model, []) == expected
    pooler = model.roi_heads.box_pooler
    assert not pooler.scale_pending
    assert torch.equal(pooler.scale, torch.full_like(pooler.scale, expected))
    # Set once: the scale is no longer pending, and measuring again is refused.
    with pytest.raises(ValueError, match="scale is pending"):
        measure_skip_pool_scale(model, [])


# --- IONTrainer: measured before the first step, not when the loaded weights hold it ---------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    with synthetic_slice(root, num_train=4, num_val=1, seed=5, name_prefix="skipscale") as names:
        yield names[0]


def _trainer_cfg(synth, tmp_path):
    cfg = _cfg()
    cfg.DATASETS.TRAIN = (synth,)
    cfg.DATASETS.TEST = ()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 6
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = MetadataCatalog.get(synth).num_sem_seg_classes
    cfg.INPUT.RANDOM_FLIP = "none"  # the same images when measured again below
    cfg.SOLVER.MAX_ITER = 1
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    return cfg


class _ScaleAtFirstStep(HookBase):
    """Records the scale as the first step starts (and section 5.2's measurement, redone)."""

    def __init__(self, cfg=None):
        self.cfg, self.seen = cfg, {}

    def before_step(self):
        if self.trainer.iter == self.trainer.start_iter:
            model = self.trainer.model
            self.seen["scale"] = model.roi_heads.box_pooler.scale.detach().clone()
            if self.cfg is not None:
                self.seen["norms"] = measure_pooled_norms(model, training_batches(self.cfg))


def test_trainer_measures_the_scale_before_the_first_step(synth, tmp_path, caplog):
    cfg = _trainer_cfg(synth, tmp_path)
    trainer = IONTrainer(cfg)
    pooler = trainer.model.roi_heads.box_pooler
    # IONTrainer registers the one procedure itself, first.
    assert isinstance(trainer._hooks[0], SkipPoolScaleHook)
    trainer.resume_or_load(resume=False)
    assert pooler.scale_pending  # measured by train(), before the first step
    spy = _ScaleAtFirstStep(cfg)
    trainer.register_hooks([spy])
    with caplog.at_level(logging.INFO, logger="ion_d2.engine.skip_pool_scale"):
        trainer.train()
    expected = spy.seen["norms"]
    assert expected.num_images == 3  # SCALE_MEASURE_IMAGES
    assert torch.allclose(spy.seen["scale"], torch.tensor(expected.per_roi["conv5"]), rtol=1e-5)
    log = caplog.text
    assert "on 3 training images" in log
    for name in FEATURES:
        assert f"  {name}" in log
    assert f"set to {expected.per_roi['conv5']:.4g}" in log
    assert math.isfinite(trainer.storage.history("total_loss").latest())


def test_trainer_keeps_a_scale_the_loaded_weights_hold(synth, tmp_path, monkeypatch):
    cfg = _trainer_cfg(synth, tmp_path)
    source_cfg = cfg.clone()
    source_cfg.MODEL.ION.SKIP_POOL.SCALE_INIT = 123.0
    source = build_model(source_cfg)
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("stage1")
    cfg.MODEL.WEIGHTS = str(tmp_path / "stage1.pth")

    def fail(*args, **kwargs):
        raise AssertionError("measured although the weights hold the scale")

    monkeypatch.setattr(skip_pool_scale, "measure_pooled_norms", fail)
    trainer = IONTrainer(cfg)
    trainer.resume_or_load(resume=False)
    pooler = trainer.model.roi_heads.box_pooler
    assert not pooler.scale_pending
    spy = _ScaleAtFirstStep()
    trainer.register_hooks([spy])
    trainer.train()
    assert torch.all(spy.seen["scale"] == 123.0)


def test_ddp_wrapped_model_is_measured_through_its_module(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        cfg = _cfg()
        model = build_model(cfg)
        wrapped = DistributedDataParallel(model)
        inputs = random_inputs(cfg)
        value = measure_skip_pool_scale(wrapped, [inputs])
        assert value == pytest.approx(measure_pooled_norms(model, [inputs]).per_roi["conv5"])
        assert torch.allclose(model.roi_heads.box_pooler.scale, torch.tensor(value))
    finally:
        dist.destroy_process_group()


def test_a_trainer_without_the_hook_fails_fast_naming_the_line_to_add():
    # Detectron2's own DefaultTrainer measures nothing: the first training forward with the
    # scale pending stops, naming the one line the docs give for that trainer.
    cfg = _cfg()
    model = build_model(cfg)
    model.train()
    with EventStorage(), pytest.raises(RuntimeError, match="scale is not set") as error:
        model(random_inputs(cfg))
    assert PENDING_SCALE_FIX in str(error.value)
    with open(os.path.join(os.path.dirname(TINY), "..", "docs", "USAGE.md")) as f:
        assert PENDING_SCALE_FIX in f.read()
    assert model.roi_heads.box_pooler.scale_pending


def test_the_hook_measures_only_a_pending_scale(monkeypatch):
    cfg = _cfg()
    model = build_model(cfg)
    inputs = random_inputs(cfg)
    loaded = []
    monkeypatch.setattr(skip_pool_scale, "training_batches", lambda c: loaded.append(c) or [inputs])
    hook = SkipPoolScaleHook(cfg)
    hook.trainer = SimpleNamespace(model=model, start_iter=0)
    hook.before_train()
    assert loaded == [cfg]
    expected = measure_pooled_norms(model, [inputs]).per_roi["conv5"]
    assert torch.allclose(model.roi_heads.box_pooler.scale, torch.tensor(expected))
    hook.before_train()  # set: nothing loaded, nothing measured
    assert loaded == [cfg]
