"""
Inference inputs that would otherwise be lost or silently wrong (issue 29): images too small for
the trunk after resizing (one rule for the dataset check, IONPredictor and tools/predict.py),
the presets the stock DefaultPredictor runs at full size, and folder entries tools/predict.py
does not try.
"""

import glob
import os

import cv2
import numpy as np
import pytest
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from model_utils import load_cfg, load_script

from ion_d2.data.dataset_check import (
    DatasetCheckError,
    DatasetLimits,
    check_dataset_dicts,
    input_stride,
)
from ion_d2.engine.predictor import IONPredictor

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")  # MIN/MAX_SIZE_TEST 96 / 128


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A randomly initialised tiny model saved as a checkpoint (nothing is trained)."""
    cfg = load_cfg(TINY)
    folder = tmp_path_factory.mktemp("tiny_weights")
    DetectionCheckpointer(build_model(cfg), save_dir=str(folder)).save("tiny")
    return str(folder / "tiny.pth")


def _predictor(weights, min_size=96, max_size=128):
    cfg = load_cfg(TINY)
    cfg.MODEL.WEIGHTS = weights
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = min_size, max_size
    return IONPredictor(cfg)


def _image(height, width, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


def _predict(*argv):
    return load_script("tools/predict.py").main(["--config-file", TINY, *argv])


# --- IONPredictor: images too small for the trunk after resizing --------------------------------


def test_ion_predictor_refuses_an_image_too_small_after_resizing(tiny_weights):
    predictor = _predictor(tiny_weights)
    # 2x700 resizes to 0 px high (PIL used to fail on it); 16x3000 to 1 px (it used to run).
    for (h, w), resized in (((2, 700), "0x128"), ((16, 3000), "1x128")):
        with pytest.raises(ValueError) as exc:
            predictor(_image(h, w))
        assert str(exc.value) == (
            f"Image too small for the model: {h}x{w} (HxW) is {resized} after resizing "
            "(INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST), under the trunk's stride (16 px)."
        )
    # The smallest image that fits: 12x96 is 16x128 after resizing.
    assert predictor(_image(12, 96))["instances"].image_size == (12, 96)


# Sizes on both sides of the rule: (MIN_SIZE_TEST, MAX_SIZE_TEST) -> [(H, W), ...].
_SIZES = {
    (96, 128): [(2, 700), (16, 3000), (11, 96), (12, 96), (96, 12), (40, 56)],
    (0, 128): [(15, 40), (16, 40), (30, 300), (40, 300), (300, 40), (64, 64)],
}


@pytest.mark.parametrize("resize", sorted(_SIZES), ids=lambda r: f"min{r[0]}_max{r[1]}")
def test_dataset_check_predictor_and_predict_tool_apply_one_size_rule(
    resize, tiny_weights, tmp_path, capsys
):
    predictor = _predictor(tiny_weights, *resize)
    stride = input_stride(predictor.model.backbone)
    limits = DatasetLimits.from_config(predictor.cfg, min_side=stride, is_train=False)
    folder = tmp_path / "in"
    folder.mkdir()
    verdicts = {}
    for h, w in _SIZES[resize]:
        path = str(folder / f"{h}x{w}.png")
        cv2.imwrite(path, _image(h, w))
        # The size the predictor's resize gives the model.
        transform = predictor.aug.get_transform(_image(h, w))
        resized = (getattr(transform, "new_h", h), getattr(transform, "new_w", w))
        try:
            check_dataset_dicts([{"file_name": path, "height": h, "width": w}], "sizes", limits)
            dataset_ok = True
        except DatasetCheckError as e:
            assert "under the trunk's stride (16 px)" in str(e)
            dataset_ok = False
        problem = predictor.size_problem(h, w)
        assert problem is None or f"is {resized[0]}x{resized[1]} after resizing" in problem
        predictor_ok = problem is None
        assert predictor_ok == (min(resized) >= stride)
        verdicts[path] = (dataset_ok, predictor_ok)
    assert {v for v in verdicts.values()} == {(True, True), (False, False)}

    _predict(
        "--weights",
        tiny_weights,
        "--input",
        str(folder),
        "--output",
        str(tmp_path / "vis"),
        "INPUT.MIN_SIZE_TEST",
        str(resize[0]),
        "INPUT.MAX_SIZE_TEST",
        str(resize[1]),
    )
    out = capsys.readouterr().out
    written = {str(folder / n[: -len(".png")]) for n in os.listdir(tmp_path / "vis")}
    for path, (dataset_ok, _) in verdicts.items():
        assert (path in written) == dataset_ok, path
        assert (f"{path}: ValueError: too small: " in out) == (not dataset_ok), path


# --- The presets the stock DefaultPredictor runs at full size -------------------------------------


def _readme_first_screen():
    """README.md up to its first section heading."""
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read().split("\n## ", 1)[0]


def test_readme_first_screen_names_ion_predictor_for_every_unresized_preset():
    presets = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)):
        name = os.path.basename(path)
        if not name.startswith("Base-") and load_cfg(path).INPUT.MIN_SIZE_TEST == 0:
            presets.append(name)
    assert "ION_VGG16_synthetic.yaml" in presets
    screen = _readme_first_screen()
    assert len(screen.splitlines()) <= 40
    assert "`ion_d2.IONPredictor`" in screen and "MIN_SIZE_TEST: 0" in screen
    missing = [p for p in presets if f"`{p}`" not in screen]
    assert not missing, f"README's first screen does not name {missing}"


# --- tools/predict.py: every folder entry predicted or listed with its reason -------------------


def test_predict_lists_every_folder_entry_it_does_not_try(tiny_weights, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("good.png", ".hidden.png", os.path.join("sub", "inner.png")):
        cv2.imwrite(str(folder / name), _image(48, 64))
    os.symlink(str(tmp_path / "gone.png"), str(folder / "broken.png"))
    os.symlink(str(folder / "good.png"), str(folder / "link.png"))
    os.symlink(str(folder / "sub"), str(folder / "linked_dir"))
    os.mkfifo(str(folder / "pipe.png"))
    (folder / "notes.txt").write_text("not an image")

    code = _predict(
        "--weights", tiny_weights, "--input", str(folder), "--output", str(tmp_path / "vis")
    )
    out = capsys.readouterr().out
    assert code == 1
    assert sorted(os.listdir(tmp_path / "vis")) == ["good.png.png", "link.png.png"]
    assert "2 of 3 images written" in out
    listed = out.split("5 folder entries not tried:\n")[1].split("1 failed:\n")
    not_tried = dict(line.strip().split(": ", 1) for line in listed[0].strip().splitlines())
    failed = dict(line.strip().split(": ", 1) for line in listed[1].strip().splitlines())
    assert not_tried == {
        str(folder / ".hidden.png"): "hidden file",
        str(folder / "broken.png"): f"broken symlink (to {str(tmp_path / 'gone.png')!r})",
        str(folder / "linked_dir"): "a folder (not searched)",
        str(folder / "pipe.png"): "not a regular file",
        str(folder / "sub"): "a folder (not searched)",
    }
    assert list(failed) == [str(folder / "notes.txt")]
    assert failed[str(folder / "notes.txt")].startswith("UnidentifiedImageError")
    # Every entry of the folder is accounted for.
    done = {str(folder / n) for n in ("good.png", "link.png")}
    assert done | set(not_tried) | set(failed) == {str(folder / n) for n in os.listdir(folder)}

    # A folder with nothing to try is refused, naming what it holds.
    empty = tmp_path / "only_hidden"
    empty.mkdir()
    cv2.imwrite(str(empty / ".x.png"), _image(48, 64))
    with pytest.raises(SystemExit) as exc:
        _predict("--weights", tiny_weights, "--input", str(empty), "--output", str(tmp_path / "v2"))
    assert exc.value.code == 2
    assert f"{empty / '.x.png'}: hidden file" in capsys.readouterr().err
