#!/usr/bin/env python
"""Convert SBD's and VOC2012's class labels into the label PNGs of the voc_*_ionseg datasets.

ION's VOC presets (configs/ION_VGG16_VOC0712_stage1.yaml, configs/paper/) train on
voc_2007_trainval_ionseg and voc_2012_trainval_ionseg: Detectron2's VOC 07+12 trainval plus a
semantic label map for each image that has one (Table 1's "07+12+S": "07+12 plus SBD
segmentation labels").

Sources (give at least one):
  --sbd DIR            SBD's "dataset" folder (benchmark_RELEASE/dataset): reads cls/<id>.mat,
                       MATLAB struct GTcls, field Segmentation (0 background, 1..20 classes).
  --voc2012-seg DIR    VOC2012's SegmentationClass folder of palette PNGs (palette index 0
                       background, 1..20 classes, 255 void border). Default:
                       <root>/VOC2012/SegmentationClass when it exists.
An image labelled by both gets VOC2012's official labels, drawn finer than SBD's.

Output (uint8 "L" PNGs: 0 background, 1 + the index in Detectron2's VOC CLASS_NAMES, 255
ignored), under --root (default $DETECTRON2_DATASETS, else "datasets"):
  <root>/VOC2007/ION_SegmentationLabels/NNNNNN.png   for ids 2007_NNNNNN (VOC2012 names VOC2007's
                                                     image NNNNNN "2007_NNNNNN")
  <root>/VOC2012/ION_SegmentationLabels/<id>.png     for every other id
Labels of images outside the training splits are written too and simply never read.

The run is resumable: an output already written from the same source (or from VOC2012 when SBD
is the source now) is skipped; one written from SBD is replaced when VOC2012 labels it now.
Files are written atomically. A file that cannot be read, or holds unexpected label values, is
reported by name and skipped; the others are converted, and the exit status is then 1.
"""

import argparse
import glob
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from ion_d2.data.voc_semseg import (
    read_label_source,
    read_sbd_mat,
    read_voc_segmentation_png,
    to_ion_labels,
    voc_label_path,
    write_label_png,
)

logger = logging.getLogger("ion_d2.voc_to_semseg")

# Which source wins for an image both label (higher wins).
PRIORITY = {"sbd": 0, "voc2012": 1}
READERS = {"sbd": read_sbd_mat, "voc2012": read_voc_segmentation_png}
# Where each source keeps its files, and what its folder is.
LAYOUT = {
    "sbd": ("cls/*.mat", "SBD's dataset folder (holding cls/)"),
    "voc2012": ("*.png", "VOC2012's SegmentationClass folder"),
}


@dataclass
class Stats:
    written: int = 0
    replaced: int = 0
    skipped: int = 0
    failed: List[str] = field(default_factory=list)


def _list_sources(sbd: Optional[str], voc2012_seg: Optional[str]) -> Dict[str, Tuple[str, str]]:
    """Returns: image id -> (source name, source file), the preferred source per image."""
    chosen: Dict[str, Tuple[str, str]] = {}
    for source, folder in (("sbd", sbd), ("voc2012", voc2012_seg)):
        if folder is None:
            continue
        pattern, what = LAYOUT[source]
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        if not files:
            raise FileNotFoundError(f"No {pattern} files in {folder!r}; expected {what}.")
        logger.info(f"{source}: {len(files)} label files in {folder}.")
        for path in files:
            image_id = os.path.splitext(os.path.basename(path))[0]
            if image_id not in chosen or PRIORITY[source] > PRIORITY[chosen[image_id][0]]:
                chosen[image_id] = (source, path)
    return chosen


def _is_done(output: str, source: str) -> Tuple[bool, bool]:
    """Returns: (skip it, it exists)."""
    if not os.path.exists(output):
        return False, False
    previous = read_label_source(output)
    return previous in PRIORITY and PRIORITY[previous] >= PRIORITY[source], True


def convert(root: str, sbd: Optional[str], voc2012_seg: Optional[str]) -> Stats:
    """Convert every label file of the sources; see the module docstring."""
    stats = Stats()
    sources = _list_sources(sbd, voc2012_seg)
    for image_id, (source, path) in tqdm(sorted(sources.items()), desc="VOC labels", unit="img"):
        output = voc_label_path(root, image_id)
        skip, exists = _is_done(output, source)
        if skip:
            stats.skipped += 1
            continue
        try:
            labels = to_ion_labels(READERS[source](path))
        except ValueError as e:
            logger.error(str(e))
            stats.failed.append(path)
            continue
        write_label_png(output, labels, source)
        if exists:
            stats.replaced += 1
        else:
            stats.written += 1
    return stats


def main(argv: Optional[List[str]] = None) -> int:
    """Run the conversion; returns the exit status (1 when a label file failed)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        default=os.getenv("DETECTRON2_DATASETS", "datasets"),
        help="Detectron2 datasets root holding VOC2007/ and VOC2012/ (default: "
        "$DETECTRON2_DATASETS, else 'datasets')",
    )
    parser.add_argument("--sbd", help="SBD's dataset folder, with cls/<id>.mat")
    parser.add_argument(
        "--voc2012-seg",
        help="VOC2012's SegmentationClass folder (default: <root>/VOC2012/SegmentationClass "
        "when it exists)",
    )
    args = parser.parse_args(argv)
    voc2012_seg = args.voc2012_seg
    if voc2012_seg is None:
        default = os.path.join(args.root, "VOC2012", "SegmentationClass")
        voc2012_seg = default if os.path.isdir(default) else None
    if args.sbd is None and voc2012_seg is None:
        parser.error(
            "no label source: pass --sbd <SBD>/dataset and/or --voc2012-seg <dir> (none found "
            f"at {os.path.join(args.root, 'VOC2012', 'SegmentationClass')})."
        )
    try:
        stats = convert(args.root, args.sbd, voc2012_seg)
    except FileNotFoundError as e:
        parser.error(str(e))
    logger.info(
        f"Wrote {stats.written}, replaced {stats.replaced} (SBD -> VOC2012 labels), skipped "
        f"{stats.skipped} (already converted), failed {len(stats.failed)}; under {args.root}."
    )
    if stats.failed:
        logger.error(
            f"{len(stats.failed)} label files could not be converted (see the errors above): "
            + ", ".join(stats.failed[:20])
            + (f" and {len(stats.failed) - 20} more" if len(stats.failed) > 20 else "")
        )
        return 1
    return 0


if __name__ == "__main__":
    setup_logger(name="ion_d2")
    sys.exit(main())
