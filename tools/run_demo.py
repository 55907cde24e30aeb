#!/usr/bin/env python
"""
ion_d2's main job on the bundled data (`make demo`): generate the synthetic dataset, train ION
on the CPU, evaluate with the stock COCOEvaluator, run IONPredictor (DefaultPredictor with
checked inputs) on held-out images, and plot the training losses and the first IRNN layer's
context features (section 3.2, Figure 4). Run again after an interruption to resume from the
last checkpoint; a run of another config in the output folder is refused unless --retrain.
"""

import argparse
import json
import logging
import os
import time
from typing import Optional

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from ion_d2 import get_ion_cfg  # noqa: E402
from ion_d2.engine import train_and_evaluate  # noqa: E402
from ion_d2.engine.predictor import IONPredictor  # noqa: E402
from ion_d2.modeling.context import IRNN  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("ion_d2.demo")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument(
        "--config-file", default=os.path.join(REPO, "configs", "ION_VGG16_synthetic.yaml")
    )
    parser.add_argument("--output-dir", default=os.path.join(REPO, "output", "demo"))
    parser.add_argument("--num-vis", type=int, default=8, help="held-out images to visualise")
    parser.add_argument(
        "--vis-score", type=float, default=0.5, help="minimum score of a drawn prediction"
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train from scratch, moving a previous run in the output folder aside (a run "
        "trained with another config is otherwise refused)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args()


def setup_cfg(args):
    cfg = get_ion_cfg(args.config_file, args.opts)
    cfg.OUTPUT_DIR = args.output_dir
    cfg.freeze()
    return cfg


def format_ap_table(bbox: dict) -> str:
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    head = " | ".join(f"{k:>6}" for k in keys)
    row = " | ".join(f"{bbox.get(k, float('nan')):6.2f}" for k in keys)
    per_class = [k for k in bbox if k.startswith("AP-")]
    lines = [head, row]
    if per_class:
        lines.append("per class: " + ", ".join(f"{k[3:]} {bbox[k]:.2f}" for k in per_class))
    return "\n".join(lines)


def format_pair_table(pairs: dict) -> str:
    """ContextPairEvaluator's results, one line per pair."""
    names = [k[: -len(" objects")] for k in pairs if k.endswith(" objects")]
    return "\n".join(
        f"{n}: {pairs[n + ' objects']:.0f} objects, {pairs[n + ' found']:.1f} % found, "
        f"{pairs[n + ' right class']:.1f} % of those given the right class of the pair"
        for n in names
    )


def plot_losses(metrics_file: str, out_file: str) -> None:
    records = []
    with open(metrics_file) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    records = [r for r in records if "total_loss" in r]
    keys = sorted(k for k in records[0] if k.startswith("loss_")) + ["total_loss"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for k in keys:
        its = [r["iteration"] for r in records if k in r]
        ax.plot(its, [r[k] for r in records if k in r], label=k, lw=2 if k == "total_loss" else 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (median over the logging window)")
    ax.set_yscale("log")
    ax.set_title("ION training losses on the bundled synthetic data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def visualise_predictions(cfg, dataset_dicts, metadata, out_dir: str, num: int, min_score: float):
    os.makedirs(out_dir, exist_ok=True)
    pred_cfg = cfg.clone()
    pred_cfg.defrost()
    pred_cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    predictor = IONPredictor(pred_cfg)
    written = []
    for d in dataset_dicts[:num]:
        image = cv2.imread(d["file_name"])  # BGR uint8, as DefaultPredictor expects
        instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= min_score]
        rgb = image[:, :, ::-1]
        boxes_only = {k: v for k, v in d.items() if k != "sem_seg_file_name"}
        gt = Visualizer(rgb, metadata, scale=2.0).draw_dataset_dict(boxes_only).get_image()
        pred = Visualizer(rgb, metadata, scale=2.0).draw_instance_predictions(instances)
        panel = np.concatenate([gt, pred.get_image()], axis=1)
        path = os.path.join(out_dir, os.path.splitext(os.path.basename(d["file_name"]))[0])
        path += "_gt_vs_pred.png"
        cv2.imwrite(path, panel[:, :, ::-1])
        written.append(path)
    return written


def irnn_of(context: Optional[torch.nn.Module]) -> Optional[IRNN]:
    """The context module's IRNN: the module itself, or a branch of it (Table 10c); or None."""
    if context is None:
        return None
    return next((m for m in context.modules() if isinstance(m, IRNN)), None)


def plot_context_features(model, cfg, dataset_dict: dict, out_file: str) -> None:
    """
    Figure 4's idea on one held-out image: the first IRNN layer's hidden state per direction
    (mean over channels; what each cell summarises to its left/right/above/below), and for the
    centre cell, which conv5 cells each direction's state depends on (gradient magnitude).
    """
    bgr = cv2.imread(dataset_dict["file_name"])
    image = bgr if cfg.INPUT.FORMAT == "BGR" else bgr[:, :, ::-1]
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
    model.eval()
    images = model.preprocess_image([{"image": tensor}])
    with torch.no_grad():
        features = model.backbone(images.tensor)
    in_feature = cfg.MODEL.ION.CONTEXT.IN_FEATURE
    x = features[in_feature].clone().requires_grad_(True)
    layer = irnn_of(model.context).layers[0]
    states = layer.direction_states(x)
    _, _, h, w = x.shape
    ci, cj = h // 2, w // 2
    names = {"right": "left of me", "left": "right of me", "down": "above me", "up": "below me"}

    fig, axes = plt.subplots(2, len(states) + 1, figsize=(3.2 * (len(states) + 1), 6.2))
    axes[0, 0].imshow(bgr[:, :, ::-1])
    axes[0, 0].set_title("input")
    axes[1, 0].imshow(bgr[:, :, ::-1])
    stride = images.tensor.shape[-1] / w
    axes[1, 0].add_patch(
        plt.Rectangle((cj * stride, ci * stride), stride, stride, fill=False, color="yellow", lw=2)
    )
    axes[1, 0].set_title("centre cell (yellow)")
    for k, (direction, state) in enumerate(states.items(), start=1):
        axes[0, k].imshow(state[0].mean(dim=0).detach().numpy(), cmap="viridis")
        axes[0, k].set_title(f"IRNN-1 moving {direction}:\nsummary of what is {names[direction]}")
        grad = torch.autograd.grad(state[0, :, ci, cj].sum(), x, retain_graph=True)[0]
        dep = grad[0].abs().sum(dim=0).numpy()
        axes[1, k].imshow(dep > 0, cmap="gray")
        axes[1, k].plot([cj], [ci], "y*", ms=10)
        axes[1, k].set_title(f"{in_feature} cells the centre\ncell's '{direction}' state sees")
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("First IRNN layer of the context module (cf. the paper's Figure 4)")
    fig.tight_layout()
    fig.savefig(out_file, dpi=90)
    plt.close(fig)


def main():
    args = parse_args()
    cfg = setup_cfg(args)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logger(output=cfg.OUTPUT_DIR)
    setup_logger(output=cfg.OUTPUT_DIR, name="ion_d2")
    start = time.time()

    train_name, test_name = cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST[0]
    logger.info("Preparing the bundled dataset (generated on first use) ...")
    logger.info(f"{train_name}: {len(DatasetCatalog.get(train_name))} images")
    test_dicts = DatasetCatalog.get(test_name)
    logger.info(f"{test_name}: {len(test_dicts)} images")

    trainer, results = train_and_evaluate(cfg, resume=True, retrain=args.retrain)
    bbox = results["bbox"]
    with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    loss_png = os.path.join(cfg.OUTPUT_DIR, "losses.png")
    plot_losses(os.path.join(cfg.OUTPUT_DIR, "metrics.json"), loss_png)
    context_png = os.path.join(cfg.OUTPUT_DIR, "context_features.png")
    if irnn_of(trainer.model.context) is not None:
        plot_context_features(trainer.model, cfg, test_dicts[0], context_png)
    else:
        context_png = None
    vis_dir = os.path.join(cfg.OUTPUT_DIR, "predictions")
    written = visualise_predictions(
        cfg, test_dicts, MetadataCatalog.get(test_name), vis_dir, args.num_vis, args.vis_score
    )

    minutes = (time.time() - start) / 60
    print("\n" + "=" * 78)
    print(f"ion_d2 demo finished in {minutes:.1f} min. Written under {cfg.OUTPUT_DIR}:")
    print(f"  model:             {os.path.join(cfg.OUTPUT_DIR, 'model_final.pth')}")
    print(f"  training log:      {os.path.join(cfg.OUTPUT_DIR, 'log.txt')} (metrics.json)")
    print(f"  evaluation:        {os.path.join(cfg.OUTPUT_DIR, 'results.json')}")
    print(f"  loss curves:       {loss_png}")
    if context_png:
        print(f"  context features:  {context_png}")
    print(
        f"  predictions:       {vis_dir}/ ({len(written)} PNGs: ground truth | predictions "
        f"with score >= {args.vis_score})"
    )
    print(f"\nCOCO bbox AP on {test_name} ({len(test_dicts)} images):")
    print(format_ap_table(bbox))
    if "context_pairs" in results:
        print("\nContext pairs (ContextPairEvaluator: found at IoU >= 0.5 by either class):")
        print(format_pair_table(results["context_pairs"]))
    print("=" * 78)


if __name__ == "__main__":
    main()
