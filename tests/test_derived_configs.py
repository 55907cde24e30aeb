"""Configs derived rather than stored: each config file that commit 7bdb391 stored and that a rule
now derives (``MODEL.ION.PROPOSALS selective_search`` for the selective-search twins and _SS
presets, ``SOLVER.ION_STAGE2`` for the stage-2 presets) resolves to what the stored file resolved
to then (fixtures/derived_configs_7bdb391.json, written by
fixtures/make_derived_configs_fixture.py), but for the run folders listed as moved; and the
``MODEL.ION.PROPOSALS`` switch acts wherever a config is loaded, or the model refuses it."""

import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile

import pytest
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from model_utils import flat_cfg, load_cfg, load_script

from ion_d2 import add_ion_config, get_ion_cfg
from ion_d2.engine.stages import training_stages

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
COMMIT = "7bdb391"
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
with open(os.path.join(FIXTURES, f"derived_configs_{COMMIT}.json")) as f:
    FIXTURE = json.load(f)
STORED = FIXTURE["configs"]
OLD_KEYS = set(FIXTURE["keys"])  # the keys of that commit's config
SS = {"MODEL.ION.PROPOSALS": "selective_search"}
canonical_dump = load_script("tests/fixtures/make_derived_configs_fixture.py").canonical_dump


def _nested(flat):
    out = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# Deliberate changes since that commit, {key: (value then, value now)}, undone in a derived
# config whose source now has the new value: the synthetic presets moved to Figure 3's IRNN
# wiring (issue 28; tests/test_irnn_wiring.py checks every preset's).
CHANGED_SINCE = {"MODEL.ION.CONTEXT.IRNN.WIRING": ("per_layer", "paper")}
SYNTHETIC_PRESETS = ("configs/ION_VGG16_synthetic.yaml", "configs/FastRCNN_VGG16_synthetic.yaml")


def _derive(entry):
    cfg = get_ion_cfg(os.path.join(REPO, entry["config_file"]), entry["opts"])
    if entry["stage"]:
        cfg.freeze()
        cfg = training_stages(cfg)[entry["stage"] - 1]
    return flat_cfg(cfg)


def _old_resolved(path):
    """The file ``path`` as commit 7bdb391 stored it, resolved with today's code; None without
    git or that commit."""
    try:
        archive = subprocess.run(
            ["git", "-C", REPO, "archive", COMMIT, "configs"], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp)
        return flat_cfg(load_cfg(os.path.join(tmp, path)))


@pytest.mark.parametrize("path", sorted(STORED))
def test_derived_config_resolves_to_what_the_stored_one_did(path, monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)  # the stored files' datasets/
    entry = STORED[path]
    derived = _derive(entry)
    for key, (stored, now) in entry["moved"].items():
        assert derived[key] == now, (key, derived[key])
        derived[key] = stored
    if entry["config_file"] in SYNTHETIC_PRESETS:
        for key, (then, now) in CHANGED_SINCE.items():
            assert derived[key] == now, (key, derived[key])
            derived[key] = then
    # Keys added since that commit are not in its dump.
    derived_node = CfgNode(_nested({k: v for k, v in derived.items() if k in OLD_KEYS}))
    dump = canonical_dump(derived_node)
    if hashlib.sha256(dump.encode()).hexdigest() == entry["sha256"]:
        return
    old = _old_resolved(path)
    if old is None:
        pytest.fail(f"{path} ({entry['derived_from']}) now resolves to:\n{derived_node.dump()}")
    differing = sorted(k for k in OLD_KEYS if old.get(k) != derived.get(k))
    lines = [f"{k}: {old.get(k)!r} (stored) -> {derived.get(k)!r} (derived)" for k in differing]
    pytest.fail(f"{path} vs {entry['derived_from']}:\n" + "\n".join(lines or [dump]))


def test_fixture_covers_the_61_files_and_none_is_stored_again():
    # 50 configs/paper/tableN/ss/ twins, 8 _SS presets, 3 stage-2 presets.
    assert len(STORED) == 61
    for path in STORED:
        assert not os.path.exists(os.path.join(REPO, path)), path


ROW = os.path.join(REPO, "configs", "paper", "table1", "r_s.yaml")
TEST_TIME_ROW = os.path.join(REPO, "configs", "paper", "table1", "r_s_w.yaml")


def test_command_line_keys_keep_their_value():
    cfg = load_cfg(TEST_TIME_ROW, {**SS, "MODEL.WEIGHTS": "mine.pth", "OUTPUT_DIR": "out/x"})
    assert cfg.MODEL.WEIGHTS == "mine.pth" and cfg.OUTPUT_DIR == "out/x"
    assert cfg.MODEL.PROPOSAL_GENERATOR.NAME == "PrecomputedProposals"


def test_expansion_honours_detectron2_datasets(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    cfg = load_cfg(ROW, SS)
    assert cfg.DATASETS.PROPOSAL_FILES_TEST == (str(tmp_path / "ss_proposals/voc_2007_test.pkl"),)


def test_a_run_config_loads_back_unchanged(tmp_path):
    """A run's stored config.yaml (train_net.py writes the expanded config, each stage's too)
    resolves to itself: nothing moves into a second "ss" folder."""
    cfg = load_cfg(ROW, SS)
    cfg.freeze()
    for stage in [cfg] + training_stages(cfg):
        path = tmp_path / "config.yaml"
        path.write_text(stage.dump())
        loaded = get_ion_cfg(str(path))
        assert yaml.safe_load(loaded.dump()) == yaml.safe_load(stage.dump())
    stage2 = training_stages(cfg)[1]
    assert stage2.MODEL.WEIGHTS == "output/paper/table1/ss/r_s/stage1/model_final.pth"


def test_unknown_proposals_value_is_refused():
    with pytest.raises(ValueError, match="MODEL.ION.PROPOSALS must be one of .*'edge_boxes'"):
        load_cfg(ROW, {"MODEL.ION.PROPOSALS": "edge_boxes"})


def test_model_of_an_unexpanded_selective_search_config_is_refused():
    cfg = get_cfg()
    add_ion_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml"))
    cfg.merge_from_list(["MODEL.ION.PROPOSALS", "selective_search"])
    with pytest.raises(ValueError, match="get_ion_cfg"):
        build_model(cfg)


def test_train_net_evaluates_a_test_time_row_on_selective_search(monkeypatch):
    """One command per proposal setting; a test-time row then evaluates the weights its trained
    row's selective-search run wrote."""
    script = load_script("train_net.py")
    # default_setup and setup_logger would attach file loggers to the test process.
    monkeypatch.setattr(script, "default_setup", lambda cfg, args: None)
    monkeypatch.setattr(script, "setup_logger", lambda *args, **kwargs: None)
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    argv = ["--config-file", TEST_TIME_ROW, "--eval-only"]
    argv += ["MODEL.ION.PROPOSALS", "selective_search"]
    cfg = script.setup(script.argument_parser().parse_args(argv))
    assert cfg.MODEL.WEIGHTS == "output/paper/table1/ss/r_s/stage2/model_final.pth"
    assert cfg.OUTPUT_DIR == "output/paper/table1/ss/r_s_w"
    assert cfg.MODEL.PROPOSAL_GENERATOR.NAME == "PrecomputedProposals" and cfg.MODEL.LOAD_PROPOSALS
    assert cfg.DATASETS.PROPOSAL_FILES_TEST == ("datasets/ss_proposals/voc_2007_test.pkl",)
