"""
Training and inference plumbing around Detectron2's engine: the trainer (:mod:`.trainer`), the
learning-rate schedule and gradient clipping (:mod:`.solver`), checkpoints that resume exactly
(:mod:`.checkpoint`), multi-process launch on CPU or GPU (:mod:`.launch`), run folders
(:mod:`.run_folder`), the skip-pooling scale's measurement on the training set before the first
step, one hook for every trainer (:mod:`.skip_pool_scale`), the checks of a LazyConfig's
overrides and training values (:mod:`.overrides`) and the predictor (:mod:`.predictor`).
"""

from .predictor import IONPredictor
from .skip_pool_scale import SkipPoolScaleHook
from .trainer import IONTrainer, train_and_evaluate

__all__ = ["IONPredictor", "IONTrainer", "SkipPoolScaleHook", "train_and_evaluate"]
