"""configs/lazy/*.py: each LazyConfig builds with inferred shapes, trains a step and infers;
the synthetic one matches its YAML preset; the lazy LR schedule and clipping match the YAML's;
tools/lazyconfig_train_net.py trains and evaluates."""

import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage
from model_utils import REPO, load_cfg, random_inputs, synthetic_slice

from ion_d2 import IONROIHeads
from ion_d2.engine import SkipPoolScaleHook
from ion_d2.engine.skip_pool_scale import skip_pooler, training_batches
from ion_d2.engine.solver import build_ion_lr_scheduler, build_ion_optimizer, clipped_optimizer
from ion_d2.modeling.builder import build_ion_rcnn
from ion_d2.modeling.context.into_levels import IONContextIntoLevels
from ion_d2.modeling.skip_pooling import IONSkipPooler

LAZY = os.path.join(REPO, "configs", "lazy")
VGG16_CONFIGS = ["ION_VGG16_synthetic", "ION_VGG16_VOC0712_stage1", "ION_VGG16_COCO_stage1"]

# The tiny widths of tests/model_utils.shrink_cfg, as LazyConfig overrides.
TINY_HEADS = [
    "model.heads.context.hidden_dim=16",
    "model.heads.roi_heads.box_pooler.out_channels=32",
    "model.heads.roi_heads.box_head.fc_dims=[64,64]",
    "model.heads.roi_heads.batch_size_per_image=32",
    "model.heads.proposal_generator.pre_nms_topk=[300,300]",
    "model.heads.proposal_generator.post_nms_topk=[100,100]",
    "model.heads.roi_heads.box_predictor.test_score_thresh=0.0",
]
TINY_VGG16 = ["model.backbone.width_mult=0.125", "model.backbone.freeze_at=0"]
# R50's depth at a toy FPN width (its stages' widths are fixed by make_default_stages), with
# ION-FPN's context (added into the levels) and the zoo's box branch at tiny widths.
TINY_R50 = [
    "model.backbone.out_channels=32",
    "model.heads.context.context.hidden_dim=16",
    *(o for o in TINY_HEADS if "context" not in o and "box_pooler" not in o),
]


def load(name, overrides=()):
    cfg = LazyConfig.load(os.path.join(LAZY, name + ".py"))
    return LazyConfig.apply_overrides(cfg, list(overrides))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    with synthetic_slice(root, num_train=4, num_val=2, seed=3, name_prefix="lazy") as names:
        yield root, names


def tiny_data(cfg, names, *, sem_seg: bool):
    """Two synthetic images per batch at 96-128 px, loaded in this process."""
    train, val = names
    resize = {"_target_": "detectron2.data.transforms.ResizeShortestEdge"}
    cfg.dataloader.train.dataset.names = train
    cfg.dataloader.train.mapper.augmentations = [
        dict(resize, short_edge_length=(96,), max_size=128, sample_style="choice")
    ]
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = 0
    cfg.dataloader.test.dataset.names = val
    cfg.dataloader.test.mapper.augmentations = [dict(resize, short_edge_length=96, max_size=128)]
    cfg.dataloader.test.num_workers = 0
    cfg.model.heads.roi_heads.num_classes = 6
    if sem_seg:
        cfg.model.heads.sem_seg_head.num_classes = 10
    cfg.train.device = "cpu"
    cfg.train.ion_scale_measure_images = 2


def measure_as_before_training(cfg, model):
    """The scale after tools/lazyconfig_train_net.py's SkipPoolScaleHook, None if it was set."""
    pooler = skip_pooler(model)
    pending = pooler is not None and pooler.scale_pending
    hook = SkipPoolScaleHook(cfg)
    hook.trainer = SimpleNamespace(model=model, start_iter=0)
    hook.before_train()
    return pooler.scale[0].item() if pending else None


def train_step_and_infer(cfg):
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    measured = measure_as_before_training(cfg, model)
    batch = next(iter(instantiate(cfg.dataloader.train)))
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    model.eval()
    test_batch = next(iter(instantiate(cfg.dataloader.test)))
    with torch.no_grad():
        outputs = model(test_batch)
    assert len(outputs) == len(test_batch)
    instances = outputs[0]["instances"]
    assert isinstance(instances, Instances) and instances.has("pred_boxes")
    assert len(instances) > 0  # score threshold 0: every surviving box is kept
    return model, losses, measured


@pytest.mark.parametrize("name", VGG16_CONFIGS)
def test_vgg16_lazy_config_trains_and_infers(name, synth):
    _, names = synth
    cfg = load(name, TINY_VGG16 + TINY_HEADS)
    tiny_data(cfg, names, sem_seg=True)
    model, losses, measured = train_step_and_infer(cfg)
    assert "loss_sem_seg" in losses and "loss_rpn_cls" in losses
    pooler = model.roi_heads.box_pooler
    if name == "ION_VGG16_synthetic":
        # scale_init 100 (fixed in the config): nothing measured; one step moved it a little.
        assert measured is None
        torch.testing.assert_close(
            pooler.scale, torch.full_like(pooler.scale, 100.0), atol=0.01, rtol=0
        )
    else:  # scale_init -1: measured before the step, as IONTrainer does (section 5.2)
        assert measured is not None and measured > 0 and not pooler.scale_pending


def test_r50_fpn_lazy_config_trains_and_infers(synth):
    _, names = synth
    overrides = TINY_R50
    # GroupNorm: untrained FrozenBN layers would let R50's activations grow without bound.
    norms = ["model.backbone.bottom_up.stem.norm=GN", "model.backbone.bottom_up.stages.norm=GN"]
    cfg = load("ION_R50_FPN_1x", overrides + norms)
    tiny_data(cfg, names, sem_seg=False)
    cfg.dataloader.train.mapper.image_format = "BGR"
    model, losses, measured = train_step_and_infer(cfg)
    # Shapes inferred from the FPN: the RPN head, the IRNN and the added term's 1x1 conv read
    # 32 channels; the zoo's box head takes 32 x 7 x 7.
    assert model.proposal_generator.rpn_head.conv.in_channels == 32
    assert isinstance(model.context, IONContextIntoLevels) and model.context.detach_input
    assert model.context.context.layers[0].input_to_hidden.in_channels == 32
    assert model.context.proj.out_channels == 32
    assert model.roi_heads.box_in_features == ["p2", "p3", "p4", "p5"]
    assert model.roi_heads.box_head.fc1.in_features == 32 * 7 * 7
    assert measured is None  # no skip pooler, no scale


def test_r50_fpn_lazy_model_equals_yaml_preset():
    """configs/lazy/ION_R50_FPN_1x.py and configs/ION_R50_FPN_1x.yaml: the same parameter names
    and shapes (checkpoints interchange) and the same context options."""
    lazy = instantiate(load("ION_R50_FPN_1x").model)
    preset = os.path.join(REPO, "configs", "ION_R50_FPN_1x.yaml")
    yaml_model = build_model(load_cfg(preset, {"MODEL.DEVICE": "cpu"}))
    assert {k: v.shape for k, v in lazy.state_dict().items()} == {
        k: v.shape for k, v in yaml_model.state_dict().items()
    }
    for attribute in ("targets", "detach_input", "context_stride"):
        assert getattr(lazy.context, attribute) == getattr(yaml_model.context, attribute)


def test_synthetic_lazy_model_equals_yaml_preset():
    """Same parameter names and shapes (checkpoints interchange), same initial weights for a
    seed, and the same losses and detections with the same weights."""
    yaml_cfg = load_cfg(
        os.path.join(REPO, "configs", "ION_VGG16_synthetic.yaml"),
        {
            "MODEL.ION.VGG16.WIDTH_MULT": 0.125,
            "MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM": 16,
            "MODEL.ION.SKIP_POOL.REDUCE_DIM": 32,
            "MODEL.ROI_BOX_HEAD.FC_DIM": 64,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32,
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 300,
            "MODEL.RPN.PRE_NMS_TOPK_TEST": 300,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN": 100,
            "MODEL.RPN.POST_NMS_TOPK_TEST": 100,
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
        },
    )
    lazy_cfg = load("ION_VGG16_synthetic", ["model.backbone.width_mult=0.125"] + TINY_HEADS)
    torch.manual_seed(0)
    yaml_model = build_model(yaml_cfg)
    torch.manual_seed(0)
    lazy_model = instantiate(lazy_cfg.model)
    yaml_state, lazy_state = yaml_model.state_dict(), lazy_model.state_dict()
    assert list(lazy_state) == list(yaml_state)
    for key, value in yaml_state.items():
        assert lazy_state[key].shape == value.shape, key
        torch.testing.assert_close(lazy_state[key], value, rtol=0, atol=0, msg=key)

    inputs = random_inputs(yaml_cfg, n=2, size=(96, 128))
    results = []
    for model in (yaml_model, lazy_model):
        torch.manual_seed(1)
        model.train()
        with EventStorage():
            losses = model(copy.deepcopy(inputs))
        model.eval()
        with torch.no_grad():
            detections = model(copy.deepcopy(inputs))
        results.append((losses, detections))
    (yaml_losses, yaml_dets), (lazy_losses, lazy_dets) = results
    assert sorted(lazy_losses) == sorted(yaml_losses)
    for key in yaml_losses:
        torch.testing.assert_close(lazy_losses[key], yaml_losses[key], msg=key)
    for y, z in zip(yaml_dets, lazy_dets):
        y, z = y["instances"], z["instances"]
        assert len(y) == len(z) > 0
        torch.testing.assert_close(z.pred_boxes.tensor, y.pred_boxes.tensor)
        torch.testing.assert_close(z.scores, y.scores)


@pytest.mark.parametrize(
    "name, yaml_name",
    [
        ("ION_VGG16_synthetic", "ION_VGG16_synthetic"),
        ("ION_VGG16_VOC0712_stage1", "ION_VGG16_VOC0712_stage1"),
    ],
)
def test_lazy_lr_schedule_equals_yaml(name, yaml_name):
    yaml_cfg = load_cfg(os.path.join(REPO, "configs", yaml_name + ".yaml"))
    cfg = load(name)
    max_iter = cfg.train.max_iter
    assert max_iter == yaml_cfg.SOLVER.MAX_ITER
    params = [torch.nn.Parameter(torch.zeros(1))]
    yaml_opt = torch.optim.SGD(params, lr=yaml_cfg.SOLVER.BASE_LR)
    lazy_opt = torch.optim.SGD(params, lr=cfg.optimizer.lr)
    yaml_sched = build_ion_lr_scheduler(yaml_cfg, yaml_opt)
    from detectron2.solver import LRMultiplier

    lazy_sched = LRMultiplier(lazy_opt, instantiate(cfg.lr_multiplier), max_iter)
    checkpoints = {0, 1, 25, 49, 50, 51, max_iter // 2, max_iter - 1}
    seen = 0
    for it in range(max_iter):
        if it in checkpoints:
            lazy_lr, yaml_lr = lazy_opt.param_groups[0]["lr"], yaml_opt.param_groups[0]["lr"]
            assert lazy_lr == pytest.approx(yaml_lr, rel=1e-12, abs=0), it
            seen += 1
        yaml_sched.step()
        lazy_sched.step()
    assert seen == len(checkpoints)
    # The decay reaches ION_END_LR at the last iteration.
    assert lazy_opt.param_groups[0]["lr"] == pytest.approx(yaml_cfg.SOLVER.ION_END_LR, rel=1e-3)


@pytest.mark.parametrize("name", ["ION_VGG16_synthetic", "ION_VGG16_VOC0712_stage1"])
def test_lazy_optimizer_clips_as_yaml(name):
    """Per-tensor "norm" at 80 (synthetic) and section 4.1's "full_model" at 20 (VOC)."""
    yaml_cfg = load_cfg(os.path.join(REPO, "configs", name + ".yaml"))
    cfg = load(name)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    twin = copy.deepcopy(net)
    cfg.optimizer.params.model = twin
    lazy_opt = instantiate(cfg.optimizer)
    yaml_opt = build_ion_optimizer(yaml_cfg, net)
    assert [g["lr"] for g in lazy_opt.param_groups] == [g["lr"] for g in yaml_opt.param_groups]
    for module in (net, twin):
        for i, p in enumerate(module.parameters()):
            p.grad = torch.full_like(p, 100.0 * (i + 1))
    yaml_opt.step()
    lazy_opt.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)


def test_inferred_shape_written_differently_is_refused():
    cfg = load("ION_VGG16_synthetic", ["model.backbone.width_mult=0.125"] + TINY_HEADS)
    cfg.model.heads.context.in_channels = 7
    with pytest.raises(ValueError, match=r"model\.heads\.context\.in_channels is 7 in the config"):
        instantiate(cfg.model)


def test_constructor_checks_refuse_on_both_paths():
    """IONRCNN's and IONSkipPooler's checks, which the YAML path has too (tests/
    test_fault_injection.py, tests/test_resnet_ion.py, tests/test_skip_pool_scale.py)."""
    cfg = load("ION_VGG16_synthetic", ["model.backbone.width_mult=0.125"] + TINY_HEADS)
    cfg.model.heads.roi_heads.box_in_features = ["conv3", "conv4", "conv5"]
    cfg.model.heads.sem_seg_head = None
    with pytest.raises(
        ValueError,
        match=r"IRNN \(MODEL\.ION\.CONTEXT\.NAME\) outputs \['context'\], which no head reads "
        r"\(roi_heads\.box_in_features \(MODEL\.ROI_HEADS\.IN_FEATURES\) = \['conv3', 'conv4', "
        r"'conv5'\], proposal_generator\.in_features \(MODEL\.RPN\.IN_FEATURES\) = \['conv5'\]; "
        r"no sem_seg_head: MODEL\.ION\.SEG_LOSS_ON is False\)\. .* add them to roi_heads\."
        r"box_in_features",
    ):
        instantiate(cfg.model)
    # A measured scale needs the context's input feature pooled.
    cfg = load("ION_VGG16_VOC0712_stage1", TINY_VGG16 + TINY_HEADS)
    cfg.model.heads.roi_heads.box_in_features = ["conv3", "conv4", "context"]
    with pytest.raises(ValueError, match=r"scale_reference 'conv5' .* does not pool"):
        instantiate(cfg.model)
    # The paper's constant scale on a backbone it was not measured on: skip pooling on FPN.
    cfg = load("ION_R50_FPN_1x", TINY_R50)
    heads = cfg.model.heads
    heads.context = heads.context.context
    heads.roi_heads._target_ = IONROIHeads
    heads.roi_heads.box_in_features = ["p2", "p3", "p4", "p5", "context"]
    heads.roi_heads.box_pooler = L(IONSkipPooler)(
        output_size=7, sampling_ratio=0, pooler_type="ROIAlignV2", scale_init=0.0, out_channels=32
    )
    with pytest.raises(ValueError, match=r"scale_init .* is 0.* the backbone is FPN"):
        instantiate(cfg.model)


def test_lazy_training_batches_follow_the_config(synth):
    _, names = synth
    cfg = load("ION_VGG16_VOC0712_stage1", TINY_VGG16 + TINY_HEADS)
    tiny_data(cfg, names, sem_seg=True)
    batches = training_batches(cfg)  # train.ion_scale_measure_images (2) in batches of 2
    assert [len(b) for b in batches] == [2]
    assert all(max(x["image"].shape[-2:]) <= 128 and "instances" in x for x in batches[0])
    cfg.train.ion_scale_measure_images = 0
    with pytest.raises(ValueError, match=r"train\.ion_scale_measure_images must be >= 1; got 0"):
        training_batches(cfg)


def test_unknown_head_and_bad_clip_type_are_refused():
    # The heads build_ion_heads builds, the YAML path's order (not a list kept beside it).
    accepted = r"accepted: \['context', 'sem_seg_head', 'proposal_generator', 'roi_heads'\]"
    with pytest.raises(ValueError, match=r"unknown keys \['mask_head'\]; " + accepted):
        build_ion_rcnn(backbone=torch.nn.Identity(), heads={"mask_head": None})
    with pytest.raises(ValueError, match=r"Unknown clip_type 'global'; expected one of"):
        clipped_optimizer(clip_type="global", clip_value=1.0)


def test_lazyconfig_train_net_trains_and_evaluates(synth, tmp_path):
    root, (train, val) = synth
    out = tmp_path / "run"
    opts = (
        TINY_VGG16
        + TINY_HEADS
        + [
            f"dataloader.train.dataset.names={train}",
            f"dataloader.test.dataset.names={val}",
            "dataloader.train.total_batch_size=2",
            "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0",
            "train.max_iter=2",
            # Section 5.2's scale measured before the first step by SkipPoolScaleHook.
            "model.heads.roi_heads.box_pooler.scale_init=-1.0",
            "train.ion_scale_measure_images=2",
            "train.log_period=1",
            "train.checkpointer.period=1000",
            f"train.output_dir={out}",
        ]
    )
    # The slice is registered in the child as the fixture did here, then the tool runs as
    # __main__ with these arguments.
    code = (
        "import runpy, sys\n"
        "from ion_d2.data import register_ion_synthetic\n"
        f"register_ion_synthetic({root!r}, num_train=4, num_val=2, seed=3, name_prefix='lazy')\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    cmd = [sys.executable, "-c", code, os.path.join(REPO, "tools", "lazyconfig_train_net.py")]
    cmd += ["--config-file", os.path.join(LAZY, "ION_VGG16_synthetic.py"), *opts]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "model_final.pth").is_file()
    assert (out / "metrics.json").is_file()
    log = proc.stdout + proc.stderr
    assert "Evaluation results for bbox" in log
    assert "on 2 training images" in log and "Skip-pooling scale set to" in log
    # train.ion_keep_freed_cpu_memory (True in the config) set the process's allocator.
    assert "ION_KEEP_FREED_CPU_MEMORY: glibc's malloc keeps freed memory" in log or (
        "ION_KEEP_FREED_CPU_MEMORY: not applied" in log
    )
    # --eval-only on the written weights.
    cmd_eval = cmd[:4] + ["--eval-only"] + cmd[4:]
    cmd_eval += [f"train.init_checkpoint={out / 'model_final.pth'}"]
    proc = subprocess.run(cmd_eval, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Evaluation results for bbox" in proc.stdout + proc.stderr
