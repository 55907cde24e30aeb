"""Pascal VOC semantic labels for ION's segmentation regularizer: reading SBD's and VOC2012's
class labels, writing the label PNGs that the ``voc_*_ionseg`` datasets load.

Table 1's "07+12+S" is "07+12 plus SBD segmentation labels". Two sources label VOC images with
the same 20 classes:

- SBD (Hariharan et al., ICCV 2011; ``benchmark_RELEASE/dataset``): ``cls/<id>.mat`` holds a
  MATLAB 1x1 struct ``GTcls`` with fields ``Boundaries``, ``Segmentation`` (uint8 (H, W): 0
  background, 1..20 the classes) and ``CategoriesPresent``. 11355 images of VOC2011.
- VOC2012 ``SegmentationClass/<id>.png``: palette PNGs whose palette INDICES are 0 background,
  1..20 the classes and 255 the "void" border around objects (the RGB colours are only a
  rendering). 2913 images, among them VOC2007 images renamed ``2007_<VOC2007 id>``.

Both number the classes in the VOC devkit's order, :data:`VOC_SEGMENTATION_CLASSES`. An image
labelled by both gets VOC2012's labels: they are the official ones, drawn finer than SBD's,
with an ignored border where the class of a pixel is ambiguous.

Output: one single-channel ("L") uint8 PNG per image, 0 background, ``i + 1`` for
``CLASS_NAMES[i]`` of ``detectron2.data.datasets.pascal_voc`` and 255 ignored (VOC's void), at
:func:`voc_label_path`::

    <root>/VOC2007/ION_SegmentationLabels/<VOC2007 id>.png   ids "2007_NNNNNN" -> "NNNNNN"
    <root>/VOC2012/ION_SegmentationLabels/<id>.png           every other id (2008_... 2011_...)

where ``<root>`` is the Detectron2 datasets root (``$DETECTRON2_DATASETS``). The label of
``<VOC folder>/JPEGImages/<id>.jpg`` is thus ``<VOC folder>/ION_SegmentationLabels/<id>.png``,
which :func:`ion_d2.data.attach_sem_seg_files` finds. Each PNG records its source in a text
chunk (:data:`SOURCE_KEY`), so that a later run can tell what it would replace.
"""

import os
import re
from typing import Optional

import numpy as np
from detectron2.data.datasets.pascal_voc import CLASS_NAMES
from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = [
    "VOC_SEGMENTATION_CLASSES",
    "LABEL_DIR_NAME",
    "IGNORE_LABEL",
    "SOURCE_KEY",
    "read_sbd_mat",
    "read_voc_segmentation_png",
    "to_ion_labels",
    "voc_label_path",
    "write_label_png",
    "read_label_source",
]

# fmt: off
# Class index i (1..20) of SBD and of VOC's SegmentationClass is VOC_SEGMENTATION_CLASSES[i - 1]
# (the devkit's VOCopts.classes).
VOC_SEGMENTATION_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# fmt: on

# Folder of the label PNGs, beside the VOC folder's JPEGImages.
LABEL_DIR_NAME = "ION_SegmentationLabels"
# VOC's "void" border; MODEL.SEM_SEG_HEAD.IGNORE_VALUE of the VOC presets.
IGNORE_LABEL = 255
# PNG text chunk naming the source a label PNG was converted from ("sbd" or "voc2012").
SOURCE_KEY = "ion_d2_source"

# Source class index -> output label (the devkit's order -> 1 + Detectron2's CLASS_NAMES index).
_LOOKUP = np.full(256, -1, dtype=np.int16)
_LOOKUP[0] = 0
for _i, _name in enumerate(VOC_SEGMENTATION_CLASSES):
    _LOOKUP[_i + 1] = CLASS_NAMES.index(_name) + 1
_LOOKUP[IGNORE_LABEL] = IGNORE_LABEL

_VOC2007_ID = re.compile(r"2007_(\d{6})")


def _check_values(labels: np.ndarray, path: str, *, void_allowed: bool) -> None:
    num_classes = len(VOC_SEGMENTATION_CLASSES)
    bad = [
        int(v)
        for v in np.unique(labels)
        if v < 0 or v > num_classes and not (void_allowed and v == IGNORE_LABEL)
    ]
    if bad:
        accepted = "0 (background), 1..20" + (" and 255 (void)" if void_allowed else "")
        raise ValueError(f"{path}: unexpected label values {bad}; accepted: {accepted}.")


def read_sbd_mat(path: str) -> np.ndarray:
    """
    Read SBD's class labels of one image.

    Args:
        path (str): ``<SBD>/dataset/cls/<id>.mat`` (MATLAB v5 file with the struct ``GTcls``).

    Returns:
        ndarray: (H, W) uint8, 0 background and 1..20 in :data:`VOC_SEGMENTATION_CLASSES`'s
        order.

    Raises:
        ValueError: naming ``path``, when it cannot be read, has no ``GTcls.Segmentation``,
            or holds anything but a 2D array of integers in 0..20.
    """
    # scipy is needed only here, not to import ion_d2.
    from scipy.io import loadmat

    try:
        # Not squeeze_me, which would turn a 1-pixel-high map into a vector.
        mat = loadmat(path, struct_as_record=False)
    except Exception as e:  # scipy raises several types for truncated or foreign files
        raise ValueError(f"{path}: cannot read it as a MATLAB .mat file ({e!r}).") from e
    gt = mat.get("GTcls")
    # A MATLAB struct loads as a (1, 1) array of one mat_struct.
    if isinstance(gt, np.ndarray) and gt.size == 1:
        gt = gt.flat[0]
    labels = getattr(gt, "Segmentation", None)
    if labels is None:
        raise ValueError(
            f"{path}: no struct GTcls with a field Segmentation (found variables "
            f"{sorted(k for k in mat if not k.startswith('__'))}); expected SBD's dataset/cls "
            "layout."
        )
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: GTcls.Segmentation is a {labels.dtype} array of shape {labels.shape}; "
            "expected a 2D integer array."
        )
    _check_values(labels, path, void_allowed=False)
    return labels.astype(np.uint8)


def read_voc_segmentation_png(path: str) -> np.ndarray:
    """
    Read VOC's class labels of one image from a ``SegmentationClass`` PNG.

    Args:
        path (str): ``<VOC2012>/SegmentationClass/<id>.png``, a palette ("P") PNG; its palette
            indices are the labels. A single-channel ("L") PNG of indices is accepted too.

    Returns:
        ndarray: (H, W) uint8, 0 background, 1..20 in :data:`VOC_SEGMENTATION_CLASSES`'s
        order, 255 void.

    Raises:
        ValueError: naming ``path``, when it cannot be read, is a colour (RGB) rendering, or
            holds values other than 0..20 and 255.
    """
    try:
        with Image.open(path) as image:
            mode = image.mode
            labels = np.array(image)  # mode "P": the palette indices, not the colours
    except Exception as e:  # PIL raises several types for truncated or foreign files
        raise ValueError(f"{path}: cannot read it as an image ({e!r}).") from e
    if mode not in ("P", "L"):
        raise ValueError(
            f"{path}: image mode {mode!r}; expected a palette ('P') PNG as VOC's "
            "SegmentationClass ships, whose palette indices are the labels (or an 'L' PNG of "
            "indices), not a colour rendering."
        )
    _check_values(labels, path, void_allowed=True)
    return labels.astype(np.uint8)


def to_ion_labels(source_labels: np.ndarray) -> np.ndarray:
    """
    Map labels read by :func:`read_sbd_mat` or :func:`read_voc_segmentation_png` to the output
    format: 0 background, ``i + 1`` for Detectron2's ``CLASS_NAMES[i]``, 255 ignored.
    """
    labels = _LOOKUP[source_labels]
    if (labels < 0).any():
        bad = sorted(int(v) for v in np.unique(source_labels[labels < 0]))
        raise ValueError(f"Label values {bad} have no mapping; accepted: 0..20 and 255.")
    return labels.astype(np.uint8)


def voc_label_path(root: str, image_id: str) -> str:
    """
    Where the label PNG of one VOC image goes (see the module docstring).

    Args:
        root (str): the Detectron2 datasets root (``$DETECTRON2_DATASETS``).
        image_id (str): the id as SBD and VOC2012 name it, e.g. "2008_000002"; "2007_000032"
            is VOC2007's image "000032".

    Returns:
        str: ``<root>/VOC2007/ION_SegmentationLabels/000032.png`` for VOC2007 images,
        ``<root>/VOC2012/ION_SegmentationLabels/<image_id>.png`` for the others.
    """
    match = _VOC2007_ID.fullmatch(image_id)
    if match:
        return os.path.join(root, "VOC2007", LABEL_DIR_NAME, match.group(1) + ".png")
    return os.path.join(root, "VOC2012", LABEL_DIR_NAME, image_id + ".png")


def write_label_png(path: str, labels: np.ndarray, source: str) -> None:
    """
    Write a label map as a single-channel uint8 PNG, atomically (a temporary file in the same
    folder, then a rename), so that an interrupted run never leaves a partial file.

    Args:
        path (str): output file; its folder is created if missing.
        labels (ndarray): (H, W) uint8 labels.
        source (str): recorded in the PNG's :data:`SOURCE_KEY` text chunk.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    info = PngInfo()
    info.add_text(SOURCE_KEY, source)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        # A 2D uint8 array is an "L" PNG, which DatasetMapper's read_image(..., "L") returns
        # unchanged.
        Image.fromarray(np.asarray(labels, dtype=np.uint8)).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_label_source(path: str) -> Optional[str]:
    """
    Returns:
        str or None: the source recorded by :func:`write_label_png` in ``path``; None when the
        file is missing, unreadable or has no record.
    """
    try:
        with Image.open(path) as image:
            return image.info.get(SOURCE_KEY)
    except (OSError, ValueError):
        return None
