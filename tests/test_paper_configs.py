"""The paper presets (configs/paper, docs/PAPER_EXPERIMENTS.md): each trained row is one file
whose two stages (SOLVER.ION_STAGE2) are section 4.1's; each test-time row changes only test-time
keys of the model it evaluates; the rows the doc calls the same model are the same config; the
"D", "W" and section-5 settings hold; each row on selective-search proposals
(MODEL.ION.PROPOSALS) is the row with only its proposals and folders changed, and no config file
stores what those rules derive."""

import glob
import os
import re

import pytest
from model_utils import flat_cfg, load_cfg

from ion_d2.data import ION_SEG_SUFFIX
from ion_d2.engine.stages import training_stages

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PAPER = os.path.join(REPO, "configs", "paper")
DOC = os.path.join(REPO, "docs", "PAPER_EXPERIMENTS.md")
LEAVES = sorted(glob.glob(os.path.join(PAPER, "table*", "*.yaml")))
STAGE2_KEYS = {
    "MODEL.WEIGHTS",
    "MODEL.BACKBONE.FREEZE_AT",
    "SOLVER.MAX_ITER",
    "SOLVER.BASE_LR",
    "SOLVER.ION_END_LR",
    "OUTPUT_DIR",
}
TEST_TIME_PREFIXES = ("MODEL.WEIGHTS", "OUTPUT_DIR", "MODEL.ION.BOX_VOTING.", "TEST.AUG.")


def _row(path):
    """'table4/c5_1x1' for configs/paper/table4/c5_1x1.yaml."""
    return os.path.relpath(path, PAPER)[: -len(".yaml")]


def _cfg(path, overrides=None):
    return flat_cfg(load_cfg(path, overrides))


def _diff(a, b):
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def _stages(path, overrides=None):
    cfg = load_cfg(path, overrides)
    cfg.freeze()
    return [flat_cfg(stage) for stage in training_stages(cfg)]


# A test-time row evaluates another row's trained model; the others train from ImageNet weights.
EVAL_ONLY = [p for p in LEAVES if _cfg(p)["MODEL.WEIGHTS"].startswith("output/paper/")]
TRAINED = [p for p in LEAVES if p not in EVAL_ONLY]


def _preset_stage(name, stage):
    """Stage 1 or 2 of section 4.1 that SOLVER.ION_STAGE2 derives from configs/<name>."""
    path = os.path.join(REPO, "configs", name)
    return _stages(path, {"SOLVER.ION_STAGE2.ENABLED": True})[stage - 1]


def _reference(cfg, stage):
    dataset = "COCO" if any("coco" in d for d in cfg["DATASETS.TRAIN"]) else "VOC0712"
    return _preset_stage(f"ION_VGG16_{dataset}_stage1.yaml", stage)


def test_every_table_has_rows_and_one_file_per_row():
    assert {os.path.basename(os.path.dirname(p)) for p in LEAVES} == {
        f"table{i}" for i in range(1, 11)
    }
    # Both stages come from the row's file: no per-stage copies.
    assert not glob.glob(os.path.join(PAPER, "**", "stage[12]"), recursive=True)


@pytest.mark.parametrize("path", TRAINED, ids=_row)
def test_trained_row_runs_section_4_1s_two_stages(path):
    stage1, stage2 = _stages(path)
    assert _diff(stage1, stage2) <= STAGE2_KEYS
    for stage, cfg in ((1, stage1), (2, stage2)):
        reference = _reference(cfg, stage)
        for key in STAGE2_KEYS - {"OUTPUT_DIR"} - ({"MODEL.WEIGHTS"} if stage == 2 else set()):
            assert cfg[key] == reference[key], (stage, key)
        assert cfg["OUTPUT_DIR"] == f"output/paper/{_row(path)}/stage{stage}"
        assert cfg["SOLVER.ION_STAGE2.ENABLED"] is False  # each stage's stored config is one stage
    assert stage2["MODEL.WEIGHTS"] == stage1["OUTPUT_DIR"] + "/model_final.pth"


def test_no_config_file_stores_what_a_rule_derives():
    """Stage 2 is SOLVER.ION_STAGE2's, selective search MODEL.ION.PROPOSALS's: no stored copies
    (tests/test_derived_configs.py checks the derived ones against those removed)."""
    configs = glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    names = [os.path.relpath(p, REPO) for p in configs]
    assert not [n for n in names if "/ss/" in n or "_SS" in n or n.endswith("_stage2.yaml")]
    for name in ("ION_VGG16_VOC0712", "ION_VGG16_COCO", "FastRCNN_VGG16_VOC0712"):
        # The top-level presets are stage 1 alone; SOLVER.ION_STAGE2.ENABLED adds stage 2.
        cfg = _cfg(os.path.join(REPO, "configs", f"{name}_stage1.yaml"))
        assert cfg["SOLVER.ION_STAGE2.ENABLED"] is False


@pytest.mark.parametrize("path", EVAL_ONLY, ids=_row)
def test_test_time_row_evaluates_a_trained_row_changing_only_test_time_keys(path):
    cfg = _cfg(path)
    match = re.fullmatch(
        r"output/paper/(table\d+/\w+)/stage2/model_final.pth", cfg["MODEL.WEIGHTS"]
    )
    assert match, cfg["MODEL.WEIGHTS"]
    trained = os.path.join(PAPER, match.group(1) + ".yaml")
    assert trained in TRAINED
    changed = _diff(_cfg(trained), cfg) - {"DATASETS.TEST"}
    assert changed and all(k.startswith(TEST_TIME_PREFIXES) for k in changed), changed
    assert cfg["OUTPUT_DIR"] == f"output/paper/{_row(path)}"


# Rows that are the same model (docs/PAPER_EXPERIMENTS.md says so: train one, reuse its weights).
SAME_MODEL = [
    [
        "table1/r_s",
        "table5/all_entries_learned",
        "table6/c3_c4_c5_irnn_seg",
        "table7/d_irnn_seg",
        "table8/c3_c4_c5_irnn_2_layers",
        "table9/h512_whh_learned",
        "table10/our_method",
    ],
    ["table1/r", "table6/c3_c4_c5_irnn_no_seg", "table7/d_irnn"],
    ["table1/ion", "table4/c3_c4_c5_l2_scale_1x1"],
    ["table6/c2_c3_c4_c5_irnn_seg", "table8/c2_c3_c4_c5_irnn_2_layers"],
]


@pytest.mark.parametrize("group", SAME_MODEL, ids=lambda g: g[0])
def test_rows_called_the_same_model_are_the_same_config(group):
    cfgs = [_cfg(os.path.join(PAPER, row + ".yaml")) for row in group]
    for cfg in cfgs[1:]:
        assert _diff(cfgs[0], cfg) == {"OUTPUT_DIR"}


def test_fast_rcnn_rows_are_the_fast_rcnn_baseline():
    baseline = _preset_stage("FastRCNN_VGG16_VOC0712_stage1.yaml", 2)
    row = _stages(os.path.join(PAPER, "table4", "c5_1x1.yaml"))[1]
    # The baseline trains on the builtin names, the row (like every paper row) on their
    # "_ionseg" copies: the same images and boxes, with segmentation labels it does not use.
    assert _diff(baseline, row) == {"MODEL.WEIGHTS", "OUTPUT_DIR", "DATASETS.TRAIN"}
    assert [d + ION_SEG_SUFFIX for d in baseline["DATASETS.TRAIN"]] == list(row["DATASETS.TRAIN"])
    coco = _cfg(os.path.join(PAPER, "table3", "frcn_star.yaml"))
    model_keys = {k for k in _diff(baseline, coco) if k.startswith("MODEL.ION.")}
    assert model_keys == {"MODEL.ION.BOX_VOTING.IOU_THRESH"}  # unused: voting is off


def _dropouts(cfg):
    return (
        cfg["MODEL.ION.SKIP_POOL.CONCAT_DROPOUT"],
        cfg["MODEL.ION.CONTEXT.IRNN.CONCAT_DROPOUT"],
        cfg["MODEL.ION.FC_DROPOUT"],
    )


# Tables 1-3: (W, D) of each row.
WD = {
    "table1/ion": (False, False),
    "table1/r": (False, False),
    "table1/r_s": (False, False),
    "table1/r_s_w": (True, False),
    "table1/r_s_w_d": (True, True),
    "table2/r_s_w_d": (True, True),
    "table3/frcn_star": (False, None),
    "table3/r_s": (False, False),
    "table3/r_s_w": (True, False),
    "table3/r_s_d": (False, True),
    "table3/comp": (True, True),
    "table3/post": (True, True),
}


@pytest.mark.parametrize("row", sorted(WD))
def test_w_and_d_settings_of_tables_1_to_3(row):
    cfg = _cfg(os.path.join(PAPER, row + ".yaml"))
    w, d = WD[row]
    assert cfg["MODEL.ION.BOX_VOTING.ENABLED"] is w
    if d is not None:
        assert _dropouts(cfg) == ((0.0, 0.0, 0.0) if d else (0.25, 0.25, 0.5))
    coco = row.startswith("table3")
    if w:  # section 4.2's 0.5, but 0.85 for the COCO competition entry (section 4.4)
        assert cfg["MODEL.ION.BOX_VOTING.IOU_THRESH"] == (
            0.85 if row[7:] in ("comp", "post") else 0.5
        )
    assert cfg["TEST.AUG.ENABLED"] is (row == "table3/post")
    train = {"coco_2014_train"} if coco else {"voc_2007_trainval", "voc_2012_trainval"}
    if row == "table3/comp" or row == "table3/post":
        train.add("coco_2014_valminusminival")
    # The builtin datasets with segmentation labels (ion_d2.data.builtin_ionseg).
    assert set(cfg["DATASETS.TRAIN"]) == {d + ION_SEG_SUFFIX for d in train}


@pytest.mark.parametrize("path", [p for p in LEAVES if re.search(r"table([4-9]|10)/", p)], ids=_row)
def test_design_evaluation_rows_use_section_5_setting(path):
    cfg = _cfg(path)
    assert cfg["DATASETS.TRAIN"] == ("voc_2007_trainval_ionseg", "voc_2012_trainval_ionseg")
    assert cfg["DATASETS.TEST"] == ("voc_2007_test",)
    assert cfg["MODEL.ION.BOX_VOTING.ENABLED"] is False
    assert not cfg["TEST.AUG.ENABLED"]
    if _row(path) != "table4/c5_1x1":  # Fast R-CNN concatenates nothing
        assert _dropouts(cfg) == (0.25, 0.25, 0.5)


def test_doc_lists_every_row_and_only_existing_configs():
    with open(DOC) as f:
        doc = f.read()
    mentioned = set(re.findall(r"configs/paper/[\w/.-]+\.yaml", doc))
    for path in mentioned:
        assert os.path.exists(os.path.join(REPO, path)), path
    for path in LEAVES:
        assert os.path.relpath(path, REPO) in mentioned, path


# ----------------------------------------------------------------------------------------------
# Each row on selective-search proposals: the row's config with MODEL.ION.PROPOSALS
# selective_search (ion_d2.config.get_ion_cfg).
# ----------------------------------------------------------------------------------------------
SS = {"MODEL.ION.PROPOSALS": "selective_search"}
SS_KEYS = {
    "MODEL.ION.PROPOSALS",
    "MODEL.LOAD_PROPOSALS",
    "MODEL.PROPOSAL_GENERATOR.NAME",
    "DATASETS.PROPOSAL_FILES_TRAIN",
    "DATASETS.PROPOSAL_FILES_TEST",
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN",
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST",
}


def _proposal_file(dataset):
    # The files are matched by image_id: the builtin dataset's file serves its "_ionseg" copy.
    if dataset.endswith(ION_SEG_SUFFIX):
        dataset = dataset[: -len(ION_SEG_SUFFIX)]
    return f"datasets/ss_proposals/{dataset}.pkl"


@pytest.mark.parametrize("path", LEAVES, ids=_row)
def test_row_on_selective_search_changes_only_its_proposals_and_folders(path, monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    pairs = [(_cfg(path), _cfg(path, SS))]
    if path in TRAINED:  # and each of its stages is the row's stage on those boxes
        pairs += zip(_stages(path), _stages(path, SS))
    for row, ss in pairs:
        trained_weights = row["MODEL.WEIGHTS"].startswith("output/paper/")
        allowed = SS_KEYS | {"OUTPUT_DIR"} | ({"MODEL.WEIGHTS"} if trained_weights else set())
        assert _diff(row, ss) <= allowed, (path, ss["OUTPUT_DIR"])
        assert ss["MODEL.LOAD_PROPOSALS"] is True
        assert ss["MODEL.PROPOSAL_GENERATOR.NAME"] == "PrecomputedProposals"
        # Figure 1: "evaluate 2000 proposed regions of interest (ROI)".
        assert ss["DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN"] == 2000
        assert ss["DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST"] == 2000
        for split in ("TRAIN", "TEST"):
            files = [_proposal_file(d) for d in ss[f"DATASETS.{split}"]]
            assert list(ss[f"DATASETS.PROPOSAL_FILES_{split}"]) == files
        # Its outputs, and the model it loads (in stage 2 stage 1's, or the trained row's for a
        # test-time row), are the row's with "ss/" after the table.
        for key in ("OUTPUT_DIR", "MODEL.WEIGHTS") if trained_weights else ("OUTPUT_DIR",):
            table, rest = re.fullmatch(r"output/paper/(table\d+)/(.*)", row[key]).groups()
            assert ss[key] == f"output/paper/{table}/ss/{rest}", key
