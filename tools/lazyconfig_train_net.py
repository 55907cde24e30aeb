#!/usr/bin/env python
"""
Train or evaluate ion_d2's LazyConfigs (configs/lazy/*.py), in the style of Detectron2's
tools/lazyconfig_train_net.py:

    python tools/lazyconfig_train_net.py --config-file configs/lazy/ION_VGG16_synthetic.py
    python tools/lazyconfig_train_net.py --config-file <cfg.py> --num-gpus 8 train.max_iter=100
    python tools/lazyconfig_train_net.py --config-file <cfg.py> --eval-only \
        train.init_checkpoint=output/.../model_final.pth

Beyond Detectron2's script: ``import ion_d2`` registers ION's components and datasets; before
the first step the skip-pooling scale is measured when the config asks for it
(``model.heads.roi_heads.box_pooler.scale_init`` -1, section 5.2) by the hook IONTrainer
registers too (:class:`ion_d2.engine.SkipPoolScaleHook`); CPU models train in several
processes too (:func:`ion_d2.engine.launch.launch`); checkpoints are written atomically
(:class:`ion_d2.engine.checkpoint.IONCheckpointer`); a misspelt override key, a word for a
number and a training length or period that cannot run are refused before anything is built
(:func:`ion_d2.engine.overrides.apply_lazy_overrides`,
:func:`ion_d2.engine.overrides.check_lazy_train_config`); a second live training run in
``train.output_dir`` is refused (:func:`ion_d2.engine.run_folder.lock_run_dir`); the process's
malloc keeps freed memory for the next step unless ``train.ion_keep_freed_cpu_memory`` is False
(:func:`ion_d2.engine.cpu_memory.keep_freed_cpu_memory`, train_net.py's
``ION_KEEP_FREED_CPU_MEMORY``).
"""

import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

import ion_d2  # noqa: F401  (registers ION's components and datasets)
from ion_d2.engine import SkipPoolScaleHook
from ion_d2.engine.checkpoint import IONCheckpointer
from ion_d2.engine.cpu_memory import keep_freed_cpu_memory
from ion_d2.engine.launch import create_ddp_model_any_device, launch
from ion_d2.engine.overrides import apply_lazy_overrides, check_lazy_train_config
from ion_d2.engine.run_folder import lock_run_dir

logger = logging.getLogger("detectron2")


def _ddp(model, *, fp16_compression: bool = False, **kwargs):
    """Detectron2's ``create_ddp_model`` for CUDA and CPU models (one process: the model)."""
    model = create_ddp_model_any_device(model, **kwargs)
    if fp16_compression and isinstance(model, DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        model.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return model


def do_test(cfg, model):
    """Evaluate ``model`` on ``dataloader.test`` with ``dataloader.evaluator``, if any."""
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(ret)
        return ret


def do_train(args, cfg):
    """
    Detectron2's lazy training loop (see its tools/lazyconfig_train_net.py for the config
    entries it reads), with :class:`SkipPoolScaleHook` first.
    """
    # train_net.py's ION_KEEP_FREED_CPU_MEMORY (default True there too; ion_d2's LazyConfigs
    # set train.ion_keep_freed_cpu_memory), before the data loader's workers are forked.
    if OmegaConf.select(cfg, "train.ion_keep_freed_cpu_memory", default=True):
        keep_freed_cpu_memory()
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)

    train_loader = instantiate(cfg.dataloader.train)

    model = _ddp(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    checkpointer = IONCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks(
        [
            SkipPoolScaleHook(cfg),
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if comm.is_main_process()
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        # The checkpoint stores the iteration that just finished.
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = apply_lazy_overrides(cfg, args.opts)
    if not args.eval_only:
        check_lazy_train_config(cfg)
        if comm.is_main_process():
            lock_run_dir(cfg.train.output_dir)  # held until this process ends
    default_setup(cfg, args)
    # ion_d2's own log lines (the skip-pooling scale's measurement), as train_net.py.
    setup_logger(output=cfg.train.output_dir, distributed_rank=comm.get_rank(), name="ion_d2")

    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = _ddp(model)
        # Strict, as train_net.py --eval-only: no weights, or weights that leave part of the
        # model at its initial values, are refused naming the keys.
        IONCheckpointer(model, strict=True).load(cfg.train.init_checkpoint)
        print(do_test(cfg, model))
    else:
        do_train(args, cfg)


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
