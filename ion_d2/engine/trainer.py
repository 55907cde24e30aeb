"""The trainer used by train_net.py, the demo and the baseline comparison."""

import functools
import importlib.machinery
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, Tuple
from unittest import mock

from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.modeling import build_backbone
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..config import check_ion_config
from ..data.dataset_check import check_test_datasets, check_train_datasets, input_stride
from ..data.loader import IONTrainLoader, build_ion_train_loader, load_train_dicts, seeded_rngs
from ..data.mapper import IONDatasetMapper
from ..evaluation import PascalVOCBySizeEvaluator, PascalVOCComp4Writer
from ..modeling.meta_arch import IONRCNN
from ..modeling.test_time_augmentation import IONRCNNWithTTA
from .checkpoint import IONCheckpointer, extend_trainer_state, load_trainer_state
from .launch import create_ddp_model_any_device, unwrap_ddp
from .run_folder import claim_run
from .skip_pool_scale import measure_skip_pool_scale, skip_pooler, training_batches
from .solver import build_ion_lr_scheduler, build_ion_optimizer
from .stages import training_stages

__all__ = ["IONTrainer", "train_and_evaluate"]

logger = logging.getLogger(__name__)


class IONTrainer(DefaultTrainer):
    """
    :class:`DefaultTrainer` with the evaluator chosen by each test set's ``evaluator_type``
    ("coco" or "pascal_voc"), ION's learning-rate schedule (:func:`build_ion_lr_scheduler`),
    gradient clipping (:func:`build_ion_optimizer`), ion_d2's data loaders and mapper, the
    dataset check before training (:func:`check_train_datasets`, :func:`check_test_datasets`:
    classes, boxes, files and image sizes; the segmentation labels), the skip-pooling scale measured
    before the first step when ``SKIP_POOL.SCALE_INIT`` is -1 (:func:`measure_skip_pool_scale`),
    checkpoints that resume exactly (README, "What is guaranteed") and test-time
    augmentation (:meth:`test_with_TTA`).
    """

    def __init__(self, cfg):
        """
        See :class:`DefaultTrainer`. With several CPU processes (GLOO,
        :func:`ion_d2.engine.launch.launch`) the model is wrapped by
        :func:`create_ddp_model_any_device` instead of Detectron2's ``create_ddp_model``, which
        passes CUDA ``device_ids`` that DistributedDataParallel refuses for a CPU model: the
        swap lasts for this call only, so ``DefaultTrainer.__init__`` runs unchanged.
        """
        if comm.get_world_size() == 1 or cfg.MODEL.DEVICE != "cpu":
            super().__init__(cfg)
            return
        if cfg.SOLVER.AMP.ENABLED:
            raise ValueError("SOLVER.AMP.ENABLED needs CUDA; set it False for CPU processes.")
        with mock.patch.object(d2_defaults, "create_ddp_model", create_ddp_model_any_device):
            super().__init__(cfg)

    def build_hooks(self):
        """
        See :meth:`DefaultTrainer.build_hooks`, with :class:`IONCheckpointer` (checkpoints
        written atomically, a newest unreadable one skipped on resume) in place of the
        ``DetectionCheckpointer`` that ``DefaultTrainer.__init__`` creates just before (the
        same model, folder and checkpointables).
        """
        if not isinstance(self.checkpointer, IONCheckpointer):
            stock = self.checkpointer
            self.checkpointer = IONCheckpointer(
                stock.model,
                stock.save_dir,
                save_to_disk=stock.save_to_disk,
                **stock.checkpointables,
            )
        return super().build_hooks()

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
        if evaluator_type == "pascal_voc_comp4":
            # No public annotations (voc_2012_test): the evaluation server's result files.
            return PascalVOCComp4Writer(dataset_name, output_folder)
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r}; "
            "ion_d2 supports 'coco', 'pascal_voc' and 'pascal_voc_comp4'."
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_ion_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_ion_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        """
        :func:`build_ion_train_loader` (iteration ``i``'s batch depends on ``(SEED, i)`` only,
        so a resumed run sees the same batches) with :class:`IONDatasetMapper` (labels checked),
        on the dataset dicts after :func:`check_train_datasets`; the datasets of
        ``DATASETS.TEST`` are checked too (:func:`check_test_datasets`), so that a problem
        there does not wait for the first evaluation.
        """
        min_side = cls.trunk_stride(cfg)
        dicts = check_train_datasets(cfg, load_train_dicts(cfg), min_side=min_side)
        check_test_datasets(cfg, min_side=min_side)
        return build_ion_train_loader(cfg, IONDatasetMapper(cfg, True), dicts)

    @classmethod
    def trunk_stride(cls, cfg) -> int:
        """
        :func:`input_stride` of ``cfg``'s backbone, built for this on the CPU; the random
        generators are put back afterwards, so the model and training draw what they would.
        """
        with seeded_rngs(0):
            return input_stride(build_backbone(cfg))

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

    def resume_or_load(self, resume: bool = True):
        """
        See :meth:`DefaultTrainer.resume_or_load`; the data loader continues there too. Then,
        before the first step, measures the skip-pooling scale on the training set when the
        config asks for it and the loaded weights do not hold it (section 5.2).
        """
        super().resume_or_load(resume=resume)
        if isinstance(self.data_loader, IONTrainLoader):
            self.data_loader.set_start_iter(self.start_iter)
        pooler = skip_pooler(self.model)
        if (
            pooler is not None
            and pooler.scale_pending
            and isinstance(unwrap_ddp(self.model), IONRCNN)
        ):
            batches = training_batches(self.cfg, self.cfg.MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES)
            measure_skip_pool_scale(self.model, batches, start_iter=self.start_iter)

    def state_dict(self):
        """Detectron2's trainer state and more (:func:`extend_trainer_state`)."""
        return extend_trainer_state(self, super().state_dict())

    def load_state_dict(self, state_dict):
        """See :func:`load_trainer_state`."""
        load_trainer_state(self, state_dict)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader with :class:`IONDatasetMapper` (sizes capped)."""
        return build_detection_test_loader(cfg, dataset_name, mapper=IONDatasetMapper(cfg, False))


def train_and_evaluate(
    cfg, *, resume: bool = True, retrain: bool = False
) -> Tuple[IONTrainer, Dict[str, Any]]:
    """
    Train ``cfg`` with :class:`IONTrainer` (resuming from the last checkpoint in
    ``cfg.OUTPUT_DIR`` when ``resume``; a finished run is not trained again), then evaluate the
    final model once on ``cfg.DATASETS.TEST``. With ``SOLVER.ION_STAGE2.ENABLED``, section
    4.1's two stages train one after the other (:func:`training_stages`) and the second is
    evaluated.

    The config is checked first (:func:`check_ion_config`). The run folders are claimed as
    train_net.py claims them (:func:`claim_run`) and locked until the evaluation is done: each
    stage's config is stored as its ``OUTPUT_DIR/config.yaml``; a run there of another config
    is refused, naming the differing keys (with ``resume``, a longer or shorter schedule
    continues the run), unless ``retrain``, which moves any previous run aside and trains from
    scratch.

    Returns:
        tuple: the (last stage's) trainer, whose ``model`` is the trained model, and the
        evaluation results, as returned by :meth:`DefaultTrainer.test`.
    """
    check_ion_config(cfg)
    stages = training_stages(cfg)
    with claim_run(cfg, resume=resume, retrain=retrain):
        for stage in stages:
            trainer = _train(stage, resume=resume)
        trainer.model.eval()
        return trainer, IONTrainer.test(stages[-1], trainer.model)


def _train(cfg, *, resume: bool) -> IONTrainer:
    train_cfg = cfg.clone()
    train_cfg.defrost()
    # Evaluate once, in train_and_evaluate, instead of in the trainer's final EvalHook as well.
    train_cfg.DATASETS.TEST = ()
    train_cfg.freeze()
    # Section 4.1: a fixed seed, so that variants trained one after the other in one process
    # see the same images in the same order.
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    trainer = IONTrainer(train_cfg)
    # The trainer checked the training set; the test sets it was not given are checked here,
    # before training rather than after it.
    check_test_datasets(cfg, min_side=IONTrainer.trunk_stride(cfg))
    trainer.resume_or_load(resume=resume)
    if trainer.start_iter < train_cfg.SOLVER.MAX_ITER:
        trainer.train()
    else:
        logger.info(f"{train_cfg.OUTPUT_DIR} holds a finished run; not training again.")
    return trainer


@functools.lru_cache(maxsize=None)
def has_compiled_ops() -> bool:
    """
    Returns:
        bool: True when ``detectron2._C`` is a compiled extension module, False when it is
        missing or a Python stand-in (such as the one ``make setup`` installs without a
        compiler-built detectron2, see ``tools/bootstrap/``), whose compiled-only ops raise.
    """
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return str(getattr(_C, "__file__", "")).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
