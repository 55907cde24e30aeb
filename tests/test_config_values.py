"""Config values that cannot train are refused before any model is built, naming the key and the
accepted values: train_net.py's YAML keys and config file, tools/lazyconfig_train_net.py's
overrides."""

import os

import pytest
from detectron2.engine import default_argument_parser
from model_utils import REPO, load_script

from ion_d2.engine.trainer import IONTrainer

TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")
LAZY = os.path.join(REPO, "configs", "lazy", "ION_VGG16_synthetic.py")


def _never(*args, **kwargs):
    raise AssertionError("a model was built")


@pytest.fixture
def train_net(monkeypatch):
    script = load_script("train_net.py")
    # default_setup and setup_logger would attach file loggers to the test process.
    monkeypatch.setattr(script, "default_setup", lambda cfg, args: None)
    monkeypatch.setattr(script, "setup_logger", lambda *args, **kwargs: None)
    monkeypatch.setattr(IONTrainer, "build_model", classmethod(_never))
    return script


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("SOLVER.MAX_ITER", "0", "SOLVER.MAX_ITER must be an integer >= 1 (training iterations)"),
        (
            "SOLVER.CHECKPOINT_PERIOD",
            "0",
            "SOLVER.CHECKPOINT_PERIOD must be an integer >= 1 (iterations per checkpoint)",
        ),
        (
            "SOLVER.IMS_PER_BATCH",
            "0",
            "SOLVER.IMS_PER_BATCH must be an integer >= 1 (images per step, all processes)",
        ),
        ("INPUT.MIN_SIZE_TRAIN", "()", "INPUT.MIN_SIZE_TRAIN must list one or more integers >= 0"),
    ],
)
def test_train_net_refuses_values_that_cannot_train(train_net, tmp_path, key, value, message):
    argv = ["--config-file", TINY, key, value, "OUTPUT_DIR", str(tmp_path)]
    with pytest.raises(ValueError) as refused:
        train_net.main(train_net.argument_parser().parse_args(argv))
    assert str(refused.value).startswith(message)
    assert str(refused.value).endswith(f"got {value}.")


def test_train_net_refuses_an_empty_config_file(train_net, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n")
    argv = ["--config-file", str(empty), "OUTPUT_DIR", str(tmp_path / "out")]
    with pytest.raises(ValueError) as refused:
        train_net.main(train_net.argument_parser().parse_args(argv))
    assert str(refused.value).startswith(f"{empty} is empty. A config file sets keys, e.g. _BASE_")


@pytest.fixture
def lazy_train_net(monkeypatch):
    script = load_script(os.path.join("tools", "lazyconfig_train_net.py"))
    monkeypatch.setattr(script, "default_setup", lambda cfg, args: None)
    monkeypatch.setattr(script, "instantiate", _never)
    return script


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.max_itr=10",
            "train.max_itr: the config has no key train.max_itr. Did you mean train.max_iter? "
            "Keys of train: amp, checkpointer, ddp, device, eval_period,",
        ),
        (
            "model.heads.roi_heads.box_predictor.test_score_trhesh=0.0",
            "model.heads.roi_heads.box_predictor.test_score_trhesh: the config has no key "
            "model.heads.roi_heads.box_predictor.test_score_trhesh. Did you mean "
            "model.heads.roi_heads.box_predictor.test_score_thresh",
        ),
        (
            "train.max_iter=abc",
            "train.max_iter='abc': train.max_iter takes an integer (the config has 1000).",
        ),
        (
            "train.max_iter=0",
            "train.max_iter must be an integer >= 1 (training iterations); got 0.",
        ),
        (
            "train.checkpointer.period=0",
            "train.checkpointer.period must be an integer >= 1 (iterations per checkpoint)",
        ),
    ],
)
def test_lazyconfig_train_net_refuses_misspelt_keys_and_bad_values(
    lazy_train_net, tmp_path, override, message
):
    argv = ["--config-file", LAZY, f"train.output_dir={tmp_path}", override]
    with pytest.raises(ValueError) as refused:
        lazy_train_net.main(default_argument_parser().parse_args(argv))
    assert str(refused.value).startswith(message)


def test_lazy_overrides_accept_target_arguments_and_added_keys():
    from detectron2.config import LazyConfig

    from ion_d2.engine.overrides import apply_lazy_overrides, check_lazy_train_config

    # A LazyCall's argument that the file leaves at its default, and a key added with "+".
    cfg = apply_lazy_overrides(
        LazyConfig.load(LAZY),
        ["model.heads.roi_heads.box_predictor.box_reg_loss_type=giou", "+train.note=x"],
    )
    check_lazy_train_config(cfg)
    assert cfg.model.heads.roi_heads.box_predictor.box_reg_loss_type == "giou"
    assert cfg.train.note == "x"
