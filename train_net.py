#!/usr/bin/env python
"""
Train and evaluate ION (Inside-Outside Net) with Detectron2's DefaultTrainer.

    python train_net.py --config-file configs/ION_VGG16_synthetic.yaml
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <checkpoint>
    python train_net.py --config-file <cfg> --resume          # continue an interrupted run
    python train_net.py --config-file <cfg> --resume SOLVER.MAX_ITER <more>  # train longer
    python train_net.py --config-file <cfg> --retrain         # move a previous run aside
    python train_net.py --config-file <cfg> --num-gpus 8      # multi-GPU through launch()
    python train_net.py --config-file <cfg> --num-gpus 2      # no CUDA: 2 CPU processes, GLOO

The paper's two-stage schedule (section 4.1) is one command with SOLVER.ION_STAGE2.ENABLED (the
paper rows under configs/paper/): stage 1 in OUTPUT_DIR/stage1, then stage 2 from its
model_final.pth in OUTPUT_DIR/stage2 (ion_d2.engine.stages.training_stages), by the loop that
train_and_evaluate runs too (ion_d2.engine.trainer.train_stages): only stage 2 is evaluated, and
with --resume a finished stage 1 is not trained again. MODEL.ION.PROPOSALS selective_search
trains or evaluates any config on selective-search proposals, as the paper does
(ion_d2.get_ion_cfg derives the rest).
With TEST.AUG.ENABLED, evaluation also runs with test-time augmentation (IONTrainer.test_with_TTA,
e.g. left-right flipping), reported as "bbox_TTA".
"""

from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ion_d2 import get_ion_cfg
from ion_d2.config import check_config_file, check_ion_config
from ion_d2.engine import IONTrainer as Trainer
from ion_d2.engine.checkpoint import IONCheckpointer
from ion_d2.engine.launch import launch
from ion_d2.engine.run_folder import claim_run, kept_run_config
from ion_d2.engine.trainer import train_stages


def setup(args):
    check_config_file(args.config_file)
    cfg = get_ion_cfg(args.config_file, args.opts)
    cfg.freeze()
    check_datasets(cfg, args)
    if not args.eval_only:
        check_ion_config(cfg)
    # Before the claim, so that what it logs (a schedule changed on --resume, a run moved
    # aside) reaches the console and log.txt.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ion_d2")
    if not args.eval_only:
        # One run-folder policy with train_and_evaluate: the folders are locked for as long as
        # this process lives (run_folder holds the locks), and a folder holding a run of
        # another config is refused, naming the differing keys, unless --retrain moves it aside.
        if comm.is_main_process():
            claim_run(cfg, resume=args.resume, retrain=args.retrain)
        comm.synchronize()
    with kept_run_config(cfg.OUTPUT_DIR):
        default_setup(cfg, args)
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
        # Strict: no weights, or weights of another model, would be evaluated as if trained.
        strict = not cfg.MODEL.ION.ALLOW_PARTIAL_WEIGHTS
        IONCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=strict).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    # The loop of train_and_evaluate (the demo, the comparison, the gate): each stage trained
    # (a finished one not again), the last one evaluated by the trainer's EvalHook, with TTA
    # under TEST.AUG.ENABLED.
    _, results = train_stages(cfg, resume=args.resume, trainer_class=Trainer)
    return results


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="move a previous run in OUTPUT_DIR (of this or another config) aside and train again",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
