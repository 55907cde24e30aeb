"""tools/measure_roi_norms.py (section 5.2's measurement, printed) as a user runs it: on the
VGG16 preset and on the C4 preset (whose skip pooler is Res5ROIHeads' ``pooler``), against
:func:`measure_pooled_norms` on the same model and images."""

import re
import sys

import pytest
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from model_utils import load_script, synthetic_slice

from ion_d2 import get_ion_cfg
from ion_d2.engine.skip_pool_scale import measure_pooled_norms, training_batches

# Toy widths (seconds on a CPU): the same keys tests/test_resnet_ion.py shrinks.
_R50_TOY = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 32,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 32,
    "MODEL.ION.SKIP_POOL.REDUCE_DIM", 32,
    "MODEL.ROI_HEADS.NUM_CLASSES", 6,
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", 96,
]  # fmt: skip
PRESETS = {
    "configs/ION_VGG16_synthetic.yaml": (["MODEL.ION.VGG16.WIDTH_MULT", 0.125], "conv5"),
    "configs/ION_R50_C4_1x.yaml": (_R50_TOY, "res4"),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_measure_roi_norms_prints_each_feature_and_the_scale(preset, tmp_path, monkeypatch, capsys):
    shrink, reference = PRESETS[preset]
    tool = load_script("tools/measure_roi_norms.py")
    with synthetic_slice(str(tmp_path), num_train=3, num_val=1, seed=5, name_prefix="norms") as (
        train,
        _,
    ):
        opts = [
            "MODEL.DEVICE", "cpu",
            "MODEL.WEIGHTS", "",
            "MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM", 16,
            "DATASETS.TRAIN", f"('{train}',)",
            "DATALOADER.NUM_WORKERS", 0,
            *shrink,
        ]  # fmt: skip
        opts = [str(o) for o in opts]
        argv = ["measure_roi_norms.py", "--config-file", preset, "--num-images", "2", *opts]
        monkeypatch.setattr(sys, "argv", argv)
        seed_all_rng(0)  # the model's initialisation and the loader's flips
        tool.main()
        printed = capsys.readouterr().out

        cfg = get_ion_cfg(preset, opts)
        cfg.freeze()
        seed_all_rng(0)
        model = build_model(cfg)
        norms = measure_pooled_norms(model, training_batches(cfg, 2))

    assert f"proposals pooled on {norms.num_images} training images" in printed
    assert norms.num_images == 2 and f"Mean L2 norm of {norms.num_rois} " in printed
    assert reference in norms.per_roi and len(norms.per_roi) == len(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    for name, value in norms.per_roi.items():
        row = re.search(rf"^{re.escape(name)}\s+(\S+)\s+(\S+)$", printed, re.M)
        assert row, f"no row for {name} in:\n{printed}"
        assert float(row.group(1)) == pytest.approx(value, abs=0.051)
        assert float(row.group(2)) == pytest.approx(norms.per_location[name], abs=0.0051)
        assert value > 0
    scale = re.search(r"SCALE_INIT -1 would set the scale to (\S+) \((\S+), NORM 'roi'\)", printed)
    assert scale and scale.group(2) == reference
    assert float(scale.group(1)) == pytest.approx(norms.per_roi[reference], rel=1e-3)
