"""The trainer used by train_net.py, the demo and the baseline comparison."""

import logging
import os
from typing import Any, Dict, Tuple

from detectron2.data import (
    MetadataCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils.env import seed_all_rng

from .d2_compat import has_compiled_ops
from .data.semseg_check import check_sem_seg_labels
from .evaluation import PascalVOCBySizeEvaluator
from .skip_pool_scale import measure_skip_pool_scale
from .solver import build_ion_lr_scheduler, build_ion_optimizer

__all__ = ["IONTrainer", "train_and_evaluate"]

logger = logging.getLogger(__name__)


class IONTrainer(DefaultTrainer):
    """
    :class:`DefaultTrainer` with the evaluator chosen by each test set's ``evaluator_type``
    ("coco" or "pascal_voc"), ION's learning-rate schedule (:func:`build_ion_lr_scheduler`),
    gradient clipping (:func:`build_ion_optimizer`) and, with ``SKIP_POOL.SCALE_INIT`` -1, the
    skip-pooling scale measured in :meth:`resume_or_load` (:func:`measure_skip_pool_scale`).
    """

    def resume_or_load(self, resume: bool = True):
        """
        See :meth:`DefaultTrainer.resume_or_load`. Then, before the first step, measures the
        skip-pooling scale on the training set when the config asks for it and the loaded
        weights do not hold it (section 5.2).
        """
        super().resume_or_load(resume=resume)
        measure_skip_pool_scale(self.cfg, self.model, start_iter=self.start_iter)

    @classmethod
    def build_train_loader(cls, cfg):
        """
        See :meth:`DefaultTrainer.build_train_loader`. With ``MODEL.ION.SEG_LOSS_ON`` it first
        checks that training images carry segmentation labels (:func:`check_sem_seg_labels`:
        an error when none does), on the dataset dicts the loader then uses, so that they are
        loaded once.
        """
        # The dicts _train_loader_from_config would load.
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=(
                cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
            ),
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        if cfg.MODEL.ION.SEG_LOSS_ON:
            check_sem_seg_labels(dataset, cfg.DATASETS.TRAIN)
        return build_detection_train_loader(cfg, dataset=dataset)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if cfg.TEST.ION_VOC_AP_BY_SIZE and evaluator_type != "pascal_voc":
            raise ValueError(
                f"TEST.ION_VOC_AP_BY_SIZE is True but {dataset_name!r} has evaluator_type "
                f"{evaluator_type!r}; it applies to 'pascal_voc' datasets only (COCOEvaluator "
                "reports APs/APm/APl itself). Set it to False or test on VOC-format datasets only."
            )
        if evaluator_type == "coco":
            # Without detectron2's compiled ops, evaluate with the official pycocotools code.
            return COCOEvaluator(
                dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops()
            )
        if evaluator_type == "pascal_voc":
            if cfg.TEST.ION_VOC_AP_BY_SIZE:
                return PascalVOCBySizeEvaluator(dataset_name)
            return PascalVOCDetectionEvaluator(dataset_name)
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r}; "
            "ion_d2 supports 'coco' and 'pascal_voc'."
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_ion_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_ion_lr_scheduler(cfg, optimizer)


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
