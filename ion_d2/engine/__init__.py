"""
Training and inference plumbing around Detectron2's engine: the trainer (:mod:`.trainer`), the
learning-rate schedule and gradient clipping (:mod:`.solver`), checkpoints that resume exactly
(:mod:`.checkpoint`), multi-process launch on CPU or GPU (:mod:`.launch`), run folders
(:mod:`.run_folder`), the skip-pooling scale's measurement on the training set
(:mod:`.skip_pool_scale`) and the predictor (:mod:`.predictor`).
"""

from .predictor import IONPredictor
from .trainer import IONTrainer, train_and_evaluate

__all__ = ["IONPredictor", "IONTrainer", "train_and_evaluate"]
