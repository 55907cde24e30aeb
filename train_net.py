#!/usr/bin/env python
"""
Train and evaluate ION (Inside-Outside Net) with Detectron2's DefaultTrainer.

    python train_net.py --config-file configs/ION_VGG16_synthetic.yaml
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <checkpoint>
    python train_net.py --config-file <cfg> --resume          # continue an interrupted run
    python train_net.py --config-file <cfg> --num-gpus 8      # multi-GPU through launch()
    python train_net.py --config-file <cfg> --num-gpus 2      # no CUDA: 2 CPU processes, GLOO

The paper's two-stage schedule (section 4.1) is two commands: a stage-1 config, then the
stage-2 config, whose MODEL.WEIGHTS points at stage 1's model_final.pth (see README.md).
With TEST.AUG.ENABLED, evaluation also runs with test-time augmentation (IONTrainer.test_with_TTA,
e.g. left-right flipping), reported as "bbox_TTA".
"""

import logging
import os

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, hooks
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ion_d2 import add_ion_config
from ion_d2.checkpoint import IONCheckpointer
from ion_d2.engine import IONTrainer as Trainer
from ion_d2.launch import launch
from ion_d2.run_config import CONFIG_FILE, config_differences

logger = logging.getLogger("ion_d2.train_net")


def setup(args):
    cfg = get_cfg()
    add_ion_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    check_datasets(cfg, args)
    stored = os.path.join(cfg.OUTPUT_DIR, CONFIG_FILE)
    previous = None
    if args.resume and os.path.isfile(stored):
        with open(stored) as f:
            previous = f.read()
    default_setup(cfg, args)  # overwrites config.yaml
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ion_d2")
    diffs = config_differences(previous, cfg.dump()) if previous is not None else []
    if diffs:
        logger.warning(
            f"Resuming {cfg.OUTPUT_DIR} with a config that differs from the run's in: "
            + "; ".join(diffs)
        )
    return cfg


def check_datasets(cfg, args) -> None:
    """Refuse a config that names no dataset for what was asked (e.g. a ``Base-*.yaml``)."""
    key = "DATASETS.TEST" if args.eval_only else "DATASETS.TRAIN"
    if not (cfg.DATASETS.TEST if args.eval_only else cfg.DATASETS.TRAIN):
        raise ValueError(
            f"{args.config_file} names no dataset in {key}, so it cannot run on its own (a "
            "Base-*.yaml is meant as the _BASE_ of a leaf config). Use a leaf config such as "
            f"configs/ION_VGG16_synthetic.yaml, or add {key} ... to the command line."
        )


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        IONCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
