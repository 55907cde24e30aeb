"""The trainer used by train_net.py, the demo and the baseline comparison."""

import functools
import importlib.machinery
import logging
import os
import weakref
from collections import OrderedDict
from typing import Any, Dict, Tuple, Type

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, PascalVOCDetectionEvaluator
from detectron2.modeling import build_backbone
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ..config import check_ion_config
from ..data.dataset_check import check_test_datasets, check_train_datasets, input_stride
from ..data.loader import IONTrainLoader, build_ion_train_loader, load_train_dicts, seeded_rngs
from ..data.mapper import IONDatasetMapper
from ..evaluation import ContextPairEvaluator, PascalVOCBySizeEvaluator, PascalVOCComp4Writer
from ..modeling.test_time_augmentation import IONRCNNWithTTA
from .checkpoint import IONCheckpointer, extend_trainer_state, load_trainer_state
from .cpu_memory import keep_freed_cpu_memory
from .launch import create_ddp_model_any_device, unwrap_ddp
from .run_folder import claim_run
from .skip_pool_scale import SkipPoolScaleHook
from .solver import build_ion_lr_scheduler, build_ion_optimizer
from .stages import training_stages

__all__ = ["IONTrainer", "train_and_evaluate", "train_stages"]

logger = logging.getLogger(__name__)


class IONTrainer(DefaultTrainer):
    """
    :class:`DefaultTrainer` with the evaluator chosen by each test set's ``evaluator_type``
    ("coco" or "pascal_voc"), ION's learning-rate schedule (:func:`build_ion_lr_scheduler`),
    gradient clipping (:func:`build_ion_optimizer`), ion_d2's data loaders and mapper, the
    dataset check before training (:func:`check_train_datasets`, :func:`check_test_datasets`:
    classes, boxes, files and image sizes; the segmentation labels), the skip-pooling scale measured
    before the first step when ``SKIP_POOL.SCALE_INIT`` is -1 (:class:`SkipPoolScaleHook`),
    checkpoints that resume exactly (README, "What is guaranteed") and test-time
    augmentation (:meth:`test_with_TTA`).
    """

    def __init__(self, cfg):
        """
        See :class:`DefaultTrainer`. With ``ION_KEEP_FREED_CPU_MEMORY`` the process's malloc
        keeps freed memory for the next step (:func:`keep_freed_cpu_memory`). With several CPU
        processes (GLOO, :func:`ion_d2.engine.launch.launch`) Detectron2's ``create_ddp_model``
        cannot wrap the model (it passes CUDA ``device_ids``, which DistributedDataParallel
        refuses for a CPU model), so for that case only the lines of ``DefaultTrainer.__init__``
        (the same in v0.6 and upstream) run here with :func:`create_ddp_model_any_device` in its
        place.
        """
        if cfg.ION_KEEP_FREED_CPU_MEMORY:
            # Before the data loader's workers are forked: they inherit it.
            keep_freed_cpu_memory()
        if comm.get_world_size() == 1 or cfg.MODEL.DEVICE != "cpu":
            super().__init__(cfg)
            return
        if cfg.SOLVER.AMP.ENABLED:
            raise ValueError("SOLVER.AMP.ENABLED needs CUDA; set it False for CPU processes.")
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        # In DefaultTrainer's order: the model, the optimizer, the data loader.
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model_any_device(model, broadcast_buffers=False)
        self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """
        See :meth:`DefaultTrainer.build_hooks`, after :class:`SkipPoolScaleHook` (section 5.2's
        scale measured before the first step, when pending), with :class:`IONCheckpointer`
        (checkpoints written atomically, a newest unreadable one skipped on resume) in place of
        the ``DetectionCheckpointer`` that ``DefaultTrainer.__init__`` creates just before (the
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
        return [SkipPoolScaleHook(self.cfg), *super().build_hooks()]

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """
        The stock evaluator of the dataset's ``evaluator_type`` and, for a dataset whose
        metadata names ``context_pairs`` (the bundled data), :class:`ContextPairEvaluator`
        beside it: per pair, the objects found and the share given the right class.
        """
        evaluator = cls._stock_evaluator(cfg, dataset_name, output_folder)
        if MetadataCatalog.get(dataset_name).get("context_pairs", None):
            return DatasetEvaluators([evaluator, ContextPairEvaluator(dataset_name)])
        return evaluator

    @classmethod
    def _stock_evaluator(cls, cfg, dataset_name, output_folder):
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
        For :meth:`build_train_loader`, which gets no model (once per trainer); where a model is
        built, its ``input_stride(model.backbone)`` is read instead (:func:`train_stages`).
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
        """See :meth:`DefaultTrainer.resume_or_load`; the data loader continues there too."""
        super().resume_or_load(resume=resume)
        if isinstance(self.data_loader, IONTrainLoader):
            self.data_loader.set_start_iter(self.start_iter)

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
    Train ``cfg`` and evaluate it, as train_net.py does: :func:`train_stages` (with
    ``SOLVER.ION_STAGE2.ENABLED``, section 4.1's two stages; ``resume``: from the last
    checkpoint of each stage's ``OUTPUT_DIR``; a finished stage is not trained again; the last
    stage is evaluated once at its end on ``cfg.DATASETS.TEST``, with ``TEST.AUG``'s
    test-time augmentation when enabled).

    The config is checked first (:func:`check_ion_config`). The run folders are claimed as
    train_net.py claims them (:func:`claim_run`) and locked until the evaluation is done: each
    stage's config is stored as its ``OUTPUT_DIR/config.yaml``; a run there of another config
    is refused, naming the differing keys (with ``resume``, a longer or shorter schedule
    continues the run), unless ``retrain``, which moves any previous run aside and trains from
    scratch.

    Returns:
        tuple: the (last stage's) trainer, whose ``model`` is the trained model (in eval mode),
        and the evaluation results (see :func:`train_stages`).
    """
    check_ion_config(cfg)
    with claim_run(cfg, resume=resume, retrain=retrain):
        trainer, results = train_stages(cfg, resume=resume)
        trainer.model.eval()
        return trainer, results


def train_stages(
    cfg: CfgNode, *, resume: bool, trainer_class: Type[IONTrainer] = IONTrainer
) -> Tuple[IONTrainer, Dict[str, Any]]:
    """
    The one training loop of train_net.py and :func:`train_and_evaluate`: train ``cfg``'s
    stages (:func:`training_stages`: section 4.1's two with ``SOLVER.ION_STAGE2.ENABLED``,
    else ``cfg`` alone) one after the other, each in its own ``OUTPUT_DIR``. The config check
    and the run folders' claim are the caller's, before this.

    Each stage sets the random generators from ``SEED`` (plus the process's rank, as
    Detectron2's ``default_setup``), so that it draws the same whether or not the stage before
    it trained in this process; builds a ``trainer_class``; and resumes from the last checkpoint
    in its folder (``resume``) or loads its ``MODEL.WEIGHTS``. Then:

    * a stage before the last trains to its ``SOLVER.MAX_ITER``, unless its run is finished
      (then it is not trained again, on resume); it is not evaluated, its model being only the
      next stage's start, but its ``DATASETS.TEST`` is checked before it trains
      (:func:`check_test_datasets`), as the last stage's trainer checks it;
    * the last stage trains to its ``SOLVER.MAX_ITER`` (no step when its run is finished) and
      is evaluated by the trainer's ``EvalHook`` (:meth:`DefaultTrainer.test`), as in
      Detectron2's tools/train_net.py: every ``TEST.EVAL_PERIOD`` iterations (0: never) and
      once at the end, also when it was finished already, then, with ``TEST.AUG.ENABLED``,
      with test-time augmentation (:meth:`IONTrainer.test_with_TTA`).

    Args:
        cfg (CfgNode): the config to train, as given to train_net.py.
        resume (bool): continue each stage from the last checkpoint in its folder.
        trainer_class (type): the trainer of each stage (train_net.py's ``Trainer``).

    Returns:
        tuple: the last stage's trainer, and the final evaluation's results: those of
        :meth:`DefaultTrainer.test` (``{"bbox": {"AP": ...}}`` for one test set) with the
        "_TTA" tasks of :meth:`IONTrainer.test_with_TTA` added; empty in a process other than
        the main one.
    """
    stages = training_stages(cfg)
    for stage in stages[:-1]:
        _train_stage(stage, resume=resume, trainer_class=trainer_class, last=False)
        comm.synchronize()  # its model_final.pth is written before the next stage reads it
    return _train_stage(stages[-1], resume=resume, trainer_class=trainer_class, last=True)


def _train_stage(
    cfg: CfgNode, *, resume: bool, trainer_class: Type[IONTrainer], last: bool
) -> Tuple[IONTrainer, Dict[str, Any]]:
    """One stage of :func:`train_stages`; ``last``: the stage that is evaluated."""
    # Section 4.1: a fixed seed, so that variants trained one after the other in one process
    # see the same images in the same order.
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
    if last:
        trainer = trainer_class(cfg)
    else:
        trainer = trainer_class(_without_evaluation(cfg))
        # The trainer checked the training set; the test sets it was not given are checked
        # here, before training, at the stride of the model it built.
        stride = input_stride(unwrap_ddp(trainer.model).backbone)
        check_test_datasets(cfg, min_side=stride)
    trainer.resume_or_load(resume=resume)
    finished = trainer.start_iter >= cfg.SOLVER.MAX_ITER
    if finished:
        logger.info(f"{cfg.OUTPUT_DIR} holds a finished run; not training it again.")
    results: Dict[str, Any] = OrderedDict()
    if not last:
        if not finished:
            trainer.train()
        return trainer, results
    tta_results: Dict[str, Any] = OrderedDict()
    if cfg.TEST.AUG.ENABLED:

        def test_with_tta():
            tta_results.update(trainer.test_with_TTA(cfg, trainer.model))
            return tta_results

        # After the trainer's own EvalHook, as in Detectron2's tools/train_net.py.
        trainer.register_hooks([hooks.EvalHook(0, test_with_tta)])
    # A finished run takes no step; the hooks' after_train still evaluates it.
    trainer.train()
    # What DefaultTrainer's EvalHook stored (DefaultTrainer.train verifies the same).
    results.update(getattr(trainer, "_last_eval_results", None) or {})
    results.update(tta_results)
    return trainer, results


def _without_evaluation(cfg: CfgNode) -> CfgNode:
    """``cfg`` for a stage that is not evaluated: no test set, no expected results."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = ()
    cfg.TEST.EXPECTED_RESULTS = []
    cfg.freeze()
    return cfg


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
