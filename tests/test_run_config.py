"""ion_d2.engine.run_folder: a stored run is reused only as the same config."""

import os

import pytest
import yaml

from ion_d2.config import get_ion_cfg
from ion_d2.engine.run_folder import CONFIG_FILE, config_differences, prepare_run_dir


def _cfg(tmp_path):
    cfg = get_ion_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    return cfg


def _without(yaml_text, dotted_key):
    data = yaml.safe_load(yaml_text)
    *parents, last = dotted_key.split(".")
    node = data
    for p in parents:
        node = node[p]
    del node[last]
    return yaml.safe_dump(data)


def test_key_added_since_the_run_counts_only_when_not_at_its_default(tmp_path):
    cfg = _cfg(tmp_path)
    defaults = _cfg(tmp_path).dump()
    old_run = _without(cfg.dump(), "MODEL.ION.FC_SVD_RANKS")
    assert config_differences(old_run, cfg.dump(), defaults) == []
    # Without the defaults, any key one side lacks is a difference.
    assert config_differences(old_run, cfg.dump()) == ["MODEL.ION.FC_SVD_RANKS: (absent) -> []"]
    cfg.MODEL.ION.FC_SVD_RANKS = [16, 8]
    assert config_differences(old_run, cfg.dump(), defaults) == [
        "MODEL.ION.FC_SVD_RANKS: (absent) -> [16, 8]"
    ]


def test_prepare_run_dir_reuses_a_run_stored_before_a_new_key(tmp_path):
    cfg = _cfg(tmp_path)
    with open(os.path.join(tmp_path, CONFIG_FILE), "w") as f:
        f.write(_without(cfg.dump(), "MODEL.ION.FC_SVD_RANKS"))
    with open(os.path.join(tmp_path, "last_checkpoint"), "w") as f:
        f.write("model_final.pth")
    prepare_run_dir(cfg)  # no error: the run is this config's
    cfg.SOLVER.BASE_LR = 0.5
    with pytest.raises(ValueError, match="SOLVER.BASE_LR"):
        prepare_run_dir(cfg)
