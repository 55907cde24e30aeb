"""The trainer used by train_net.py, the demo and the baseline comparison."""

import logging
import os
from collections import OrderedDict
from typing import Any, Dict, Tuple

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils.env import seed_all_rng

from .d2_compat import has_compiled_ops
from .solver import build_ion_lr_scheduler
from .test_time_augmentation import IONRCNNWithTTA

__all__ = ["IONTrainer", "train_and_evaluate"]

logger = logging.getLogger(__name__)


class IONTrainer(DefaultTrainer):
    """
    :class:`DefaultTrainer` with the evaluator chosen by each test set's ``evaluator_type``
    ("coco" or "pascal_voc"), ION's learning-rate schedule (:func:`build_ion_lr_scheduler`) and
    test-time augmentation (:meth:`test_with_TTA`).
    """

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "coco":
            # Without detectron2's compiled ops, evaluate with the official pycocotools code.
            return COCOEvaluator(
                dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops()
            )
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r}; "
            "ion_d2 supports 'coco' and 'pascal_voc'."
        )

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_ion_lr_scheduler(cfg, optimizer)

    @classmethod
    def test_with_TTA(cls, cfg, model) -> "OrderedDict[str, Any]":
        """
        Evaluate ``model`` on ``cfg.DATASETS.TEST`` with test-time augmentation
        (:class:`IONRCNNWithTTA`, ``cfg.TEST.AUG``), as detectron2's tools/train_net.py does.

        Returns:
            OrderedDict: :meth:`DefaultTrainer.test`'s results, with "_TTA" appended to every
            task name ("bbox_TTA").
        """
        logger.info("Running inference with test-time augmentation ...")
        model = IONRCNNWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name)
            )
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())


def train_and_evaluate(cfg, *, resume: bool = True) -> Tuple[IONTrainer, Dict[str, Any]]:
    """
    Train ``cfg`` with :class:`IONTrainer` (resuming from the last checkpoint in
    ``cfg.OUTPUT_DIR`` when ``resume``; a finished run is not trained again), then evaluate the
    final model once on ``cfg.DATASETS.TEST``.

    Returns:
        tuple: the trainer (its ``model`` is the trained model) and the evaluation results,
        as returned by :meth:`DefaultTrainer.test`.
    """
    train_cfg = cfg.clone()
    train_cfg.defrost()
    # Evaluate once, below, instead of in the trainer's final EvalHook as well.
    train_cfg.DATASETS.TEST = ()
    train_cfg.freeze()
    # Section 4.1: a fixed seed, so that variants trained one after the other in one process
    # see the same images in the same order.
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    trainer = IONTrainer(train_cfg)
    trainer.resume_or_load(resume=resume)
    if trainer.start_iter < train_cfg.SOLVER.MAX_ITER:
        trainer.train()
    else:
        logger.info(f"{train_cfg.OUTPUT_DIR} holds a finished run; not training again.")
    trainer.model.eval()
    return trainer, IONTrainer.test(cfg, trainer.model)
