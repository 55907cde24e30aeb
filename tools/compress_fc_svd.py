#!/usr/bin/env python
"""
Factor a trained checkpoint's box-head fc layers with truncated SVD (Fast R-CNN, section 3.1).

    python tools/compress_fc_svd.py --config-file configs/paper/table1/r_s.yaml \
        --weights model_final.pth --ranks 1024 256 --output model_final_svd.pth [KEY VALUE ...]

``--config-file`` (with the overrides) is the config the checkpoint was trained with; its box
head must be ``IONFCHead``. ``--ranks`` gives one rank per fc layer (0 keeps a layer). The output
holds only the weights ("model"; the optimizer and scheduler state refer to the unfactored
layers) and loads, with no missing or unexpected keys, into a model built from the same config
with ``MODEL.ION.FC_SVD_RANKS`` set to the ranks, the line this tool prints. A model with that
line also loads the uncompressed checkpoint and factors it the same way while loading
(``ion_d2.modeling.fc_svd``); this tool saves that work and reports how close each approximation is.
"""

import argparse
import os
from typing import List, Optional

import torch
from detectron2.modeling import build_model

from ion_d2 import get_ion_cfg
from ion_d2.modeling.box_head import IONFCHead
from ion_d2.modeling.fc_svd import FC_SVD_RANKS_KEY, IONFactoredLinear, factor_linear_state_dict


def _box_head(model: torch.nn.Module):
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, IONFCHead)]
    if len(heads) != 1:
        raise ValueError(
            f"Expected the config's model to have one IONFCHead (MODEL.ROI_BOX_HEAD.NAME "
            f'"IONFCHead"), found {len(heads)}: {[name for name, _ in heads]}.'
        )
    return heads[0]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--config-file", required=True, help="the checkpoint's training config")
    parser.add_argument("--weights", required=True, help="trained Detectron2 checkpoint (.pth)")
    parser.add_argument(
        "--ranks", type=int, nargs="+", required=True, help="one rank per fc layer; 0 keeps it"
    )
    parser.add_argument("--output", required=True, help="checkpoint to write (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if not args.output.endswith((".pth", ".pt")):
        # DetectionCheckpointer reads ".pkl" as a pickle, not as torch.save's format.
        parser.error(f"--output must end with .pth or .pt, got {args.output!r}")
    if os.path.abspath(args.output) == os.path.abspath(args.weights):
        parser.error(f"--output {args.output!r} would overwrite --weights; name another file")

    cfg = get_ion_cfg(args.config_file, args.opts)
    cfg.MODEL.ION.FC_SVD_RANKS = list(args.ranks)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    model = build_model(cfg)  # checks the ranks against the fc layers' shapes
    head_name, head = _box_head(model)

    # Read as Detectron2's checkpointer reads a .pth file.
    checkpoint = torch.load(args.weights, map_location="cpu")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ValueError(
            f"{args.weights} is not a Detectron2 checkpoint: expected a dict with the weights "
            "under 'model' (as DetectionCheckpointer.save writes)."
        )
    state = dict(checkpoint["model"])

    print(
        f"{'layer':<28}{'in -> out':>16}{'rank':>7}{'params before':>15}{'params after':>14}"
        f"{'rel. Frobenius error':>22}"
    )
    fc_layers = [(n, m) for n, m in head.named_children() if any(m is fc for fc in head.fcs)]
    for child_name, fc in fc_layers:
        name = f"{head_name}.{child_name}"
        if f"{name}.svd_v.weight" in state:
            raise ValueError(
                f"{args.weights} is already factored ({name}.svd_v.weight); factor the "
                "uncompressed checkpoint instead."
            )
        before = fc.in_features * fc.out_features + fc.out_features
        shape = f"{fc.in_features} -> {fc.out_features}"
        if not isinstance(fc, IONFactoredLinear):
            print(f"{name:<28}{shape:>16}{'-':>7}{before:>15}{before:>14}{'(kept)':>22}")
            continue
        error = factor_linear_state_dict(
            state,
            name + ".",
            rank=fc.rank,
            in_features=fc.in_features,
            out_features=fc.out_features,
        )
        after = sum(p.numel() for p in fc.parameters())
        print(f"{name:<28}{shape:>16}{fc.rank:>7}{before:>15}{after:>14}{error:>22.4g}")

    try:
        incompatible = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(
            f"{args.weights} does not fit the model of {args.config_file} (with the overrides): {e}"
        ) from e
    for kind, keys in (
        ("missing from", incompatible.missing_keys),
        ("unexpected in", incompatible.unexpected_keys),
    ):
        if keys:
            print(f"Warning: keys {kind} the checkpoint for the config's model: {keys}")
    dropped = sorted(k for k in checkpoint if k != "model")
    if dropped:
        print(f"Dropped the checkpoint's entries {dropped}: only the weights are written.")

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(
        {"model": state, "__author__": "ion_d2 compress_fc_svd", "matching_heuristics": False},
        args.output,
    )
    ranks = list(args.ranks)
    print(f"Wrote {args.output}. It loads into a model whose config adds:")
    print(f"  MODEL:\n    ION:\n      FC_SVD_RANKS: {ranks}")
    print(f'or, on the command line: MODEL.WEIGHTS {args.output} {FC_SVD_RANKS_KEY} "{ranks}"')


if __name__ == "__main__":
    main()
