"""The resolved config stored with each run, and the check that a run is reused only as itself."""

import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import yaml
from detectron2.config import CfgNode, get_cfg

from ..config import add_ion_config

__all__ = [
    "CONFIG_FILE",
    "IGNORED_KEYS",
    "config_differences",
    "prepare_run_dir",
    "write_run_config",
]

logger = logging.getLogger(__name__)

# Where Detectron2's default_setup (train_net.py) writes the resolved config; we use the same.
CONFIG_FILE = "config.yaml"
# Keys whose change leaves a trained model as it is, so a run trained with other values is
# still this config's run. Keys under a listed node are ignored too.
IGNORED_KEYS = (
    # Where the run lives, how fast data is read, and how often it is saved: with ion_d2's
    # iteration-indexed loader and exact resume (README "What is guaranteed") the weights do
    # not depend on them.
    "OUTPUT_DIR",
    "DATALOADER.NUM_WORKERS",
    "SOLVER.CHECKPOINT_PERIOD",
    "VIS_PERIOD",
    # Test-time settings: train_and_evaluate evaluates again with the current values each time.
    "DATASETS.TEST",
    "DATASETS.PROPOSAL_FILES_TEST",
    "INPUT.MIN_SIZE_TEST",
    "INPUT.MAX_SIZE_TEST",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "MODEL.ROI_HEADS.NMS_THRESH_TEST",
    "MODEL.ION.BOX_VOTING",
    "TEST.DETECTIONS_PER_IMAGE",
    "TEST.EXPECTED_RESULTS",
    "TEST.AUG",
)
# Files of a run that a retrain moves aside (log.txt stays: it may be open).
_RUN_FILES = ("last_checkpoint", "metrics.json", CONFIG_FILE, "inference")
_RUN_PREFIXES = ("model_", "events.out.tfevents")


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def config_differences(stored: str, current: str, defaults: Optional[str] = None) -> List[str]:
    """
    Args:
        stored, current (str): two configs as YAML (:meth:`CfgNode.dump`).
        defaults (str or None): the defaults of ``current`` as YAML. A key that ``stored`` lacks
            and whose current value is its default is no difference: it was added after the
            stored run was trained, which then ran with that default.

    Returns:
        list[str]: "KEY: stored -> current" for each key, not in :data:`IGNORED_KEYS`, whose
        value differs or that only one of them has.
    """
    old, new = _flatten(yaml.safe_load(stored)), _flatten(yaml.safe_load(current))
    default = _flatten(yaml.safe_load(defaults)) if defaults is not None else {}
    missing = object()
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a is missing and key in default and b == default[key]:
            continue
        if a != b and not _ignored(key):
            a = "(absent)" if a is missing else repr(a)
            b = "(absent)" if b is missing else repr(b)
            diffs.append(f"{key}: {a} -> {b}")
    return diffs


def write_run_config(cfg: CfgNode) -> str:
    """Write ``cfg`` to ``OUTPUT_DIR/config.yaml`` (as default_setup does); returns the path."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    path = os.path.join(cfg.OUTPUT_DIR, CONFIG_FILE)
    with open(path, "w") as f:
        f.write(cfg.dump())
    return path


def _move_run_aside(output_dir: str) -> str:
    target = os.path.join(output_dir, "replaced_" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(target)
    for name in sorted(os.listdir(output_dir)):
        if name in _RUN_FILES or name.startswith(_RUN_PREFIXES):
            shutil.move(os.path.join(output_dir, name), os.path.join(target, name))
    return target


def _default_config() -> CfgNode:
    cfg = get_cfg()
    add_ion_config(cfg)
    return cfg


def prepare_run_dir(cfg: CfgNode, *, retrain: bool = False) -> None:
    """
    Make ``cfg.OUTPUT_DIR`` safe to resume or reuse as ``cfg``'s run, then store ``cfg`` there.

    A run (a ``last_checkpoint``) trained with another config, or whose config was not stored,
    is refused with the differing keys (ignoring :data:`IGNORED_KEYS`); with ``retrain`` any
    previous run is moved to ``OUTPUT_DIR/replaced_<time>/`` so training starts again.

    Raises:
        ValueError: the folder holds a run of another (or an unknown) config and not ``retrain``.
    """
    out = cfg.OUTPUT_DIR
    has_run = os.path.isfile(os.path.join(out, "last_checkpoint"))
    if has_run and retrain:
        logger.info(f"Retraining: the previous run in {out} is moved to {_move_run_aside(out)}.")
    elif has_run:
        path = os.path.join(out, CONFIG_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"{out} holds a run without its config ({path}), so it cannot be told apart "
                "from another config's run. Pass retrain=True (--retrain) to move it aside and "
                "train again, or choose another OUTPUT_DIR."
            )
        with open(path) as f:
            diffs = config_differences(f.read(), cfg.dump(), _default_config().dump())
        if diffs:
            raise ValueError(
                f"{out} holds a run trained with another config ({path}); it differs in "
                f"{len(diffs)} key(s):\n  " + "\n  ".join(diffs) + "\nPass retrain=True "
                "(--retrain) to move that run aside and train again, or choose another "
                "OUTPUT_DIR."
            )
    write_run_config(cfg)
