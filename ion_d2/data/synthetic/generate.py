"""
A small synthetic detection dataset on which ION's two ideas matter: context and scale.

ion_d2 ships no data. This module generates, caches and registers, deterministically from a
seed, a COCO-format detection dataset with semantic label maps, small enough that ``make demo``
trains ION on a 2-core CPU. The images are drawn by :mod:`ion_d2.data.synthetic.render`; the
classes and the rules' parameters are in :mod:`ion_d2.data.synthetic.meta`.

* Context (section 3.2 of the paper): two pairs of classes are *pixel-identical inside their
  box* and are told apart only by what lies outside it. The "vehicle" glyph is a ``car`` on a
  road band and a ``boat`` on a water band; the "orb" glyph is a ``lamp`` in an image that shows
  a moon anywhere (at least :data:`MOON_MIN_GAP` pixels away) and a ``ball`` in an image that
  shows none.
* Scale (section 3.1): more than half of the objects are COCO-"small" (mask area < 32 x 32),
  most others "medium", a few "large"; objects partially occlude each other and lie among
  clutter.
* ``sign`` and ``ring`` are told apart by their own shape and colour.
* Context just outside the box (the "local" variant, registered as
  :data:`LOCAL_TRAIN_DATASET_NAME` / :data:`LOCAL_VAL_DATASET_NAME` under
  ``<root>/ion_synth_local``): the same images plus ``kite`` and ``bird``, one glyph, told
  apart only by a 2-px string from a kite's box outwards, with free strings elsewhere
  (:mod:`ion_d2.data.synthetic.local`).

docs/DATASET.md states the rules in plain words, with measured statistics.

Layout on disk, for ``root`` and a split directory ``split``::

    <root>/ion_synth/<split>/images/000000.png        RGB image
    <root>/ion_synth/<split>/sem_seg/000000.png       uint8 label map (see SEM_SEG_CLASSES)
    <root>/ion_synth/<split>/COMPLETE.json            written last: generator version + params
    <root>/ion_synth/annotations/instances_<split>.json   COCO instances json

COCO conventions: ``bbox`` is ``[x, y, w, h]`` in absolute pixels, the tight box of the *whole*
object (occluded parts included, as occlusion never hides more than
:data:`MAX_OCCLUDED_FRACTION` of an object); ``area`` is the pixel count of the *visible* mask and
``segmentation`` is that mask as compressed RLE; ``iscrowd`` is 0; category ids are 1..K in the
order of :data:`THING_CLASSES`.
"""

import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image
from tqdm import tqdm

from . import render
from .meta import (
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    DEFAULT_SEED,
    GENERATOR_VERSION,
    IGNORE_LABEL,
    VariantSpec,
    variant_spec,
)
from .render import SyntheticSample

__all__ = ["split_dir_name", "generate_synthetic_dataset", "register_ion_synthetic"]

logger = logging.getLogger(__name__)

_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def split_dir_name(split: str, num_images: int, seed: int) -> str:
    """
    The directory :func:`register_ion_synthetic` generates a split in: ``split`` itself for the
    default size and seed, else ``"<split>_n<num_images>_seed<seed>"``, so slices of another
    size or seed never overwrite the default dataset under the same root.

    Args:
        split (str): "train" or "val".
        num_images (int): number of images.
        seed (int): generator seed.

    Returns:
        str: the split directory name.
    """
    default = {"train": DEFAULT_NUM_TRAIN, "val": DEFAULT_NUM_VAL}.get(split)
    if num_images == default and seed == DEFAULT_SEED:
        return split
    return f"{split}_n{num_images}_seed{seed}"


def _paths(root: str, split: str, spec: VariantSpec) -> Dict[str, str]:
    base = os.path.join(root, spec.directory)
    return {
        "image_root": os.path.join(base, split, "images"),
        "sem_seg_root": os.path.join(base, split, "sem_seg"),
        "marker": os.path.join(base, split, "COMPLETE.json"),
        "json_file": os.path.join(base, "annotations", f"instances_{split}.json"),
    }


def _marker_content(split: str, num_images: int, seed: int, spec: VariantSpec) -> Dict[str, Any]:
    content = {
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "num_images": num_images,
        "seed": seed,
    }
    if spec.name != "base":  # the base dataset's marker predates variants
        content["variant"] = spec.name
    return content


def _read_json(path: str) -> Optional[Any]:
    try:
        with open(path, "r") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _split_lock(paths: Dict[str, str]):
    # Every training process calls DatasetCatalog.get and so generates: the first one holding
    # the lock draws the split, the others then find it complete.
    lock_file = os.path.dirname(paths["marker"]) + ".lock"
    os.makedirs(os.path.dirname(lock_file), exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _save_png(path: str, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _validate(split: str, num_images: int, seed: int) -> None:
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(
            f"split={split!r} is not a valid split directory name; accepted: letters, digits, "
            "'_', '.', '-' (not starting with '_', '.' or '-'), e.g. 'train' or 'val'."
        )
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be an int >= 1.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0.")


def generate_synthetic_dataset(
    root: str, *, split: str, num_images: int, seed: int, variant: str = "base"
) -> str:
    """
    Generate one split of the synthetic dataset (see the module docstring for the layout), or do
    nothing if ``<root>/ion_synth/<split>/COMPLETE.json`` records the same generator version,
    split, size and seed.

    The output is a function of ``(split, num_images, seed)`` and the generator version: the
    same arguments write a byte-identical json and identical label maps. Image ``i`` depends on
    ``(split, seed, i)`` only.

    Args:
        root (str): datasets root directory (e.g. ``$DETECTRON2_DATASETS``).
        split (str): split directory name, e.g. "train" or "val"; it also seeds the images.
        num_images (int): number of images (>= 1).
        seed (int): generator seed (>= 0).
        variant (str): "base" (under ``<root>/ion_synth``) or "local" (the base images plus the
            kite/bird pair, under ``<root>/ion_synth_local``); see
            :func:`ion_d2.data.synthetic.meta.variant_spec`.

    Returns:
        str: path of the COCO instances json.
    """
    spec = variant_spec(variant)
    _validate(split, num_images, seed)
    paths = _paths(root, split, spec)
    with _split_lock(paths):
        return _generate_locked(paths, root, split, num_images, seed, spec)


def _generate_locked(
    paths: Dict[str, str], root: str, split: str, num_images: int, seed: int, spec: VariantSpec
):
    expected = _marker_content(split, num_images, seed, spec)
    previous = _read_json(paths["marker"])
    if previous == expected and os.path.isfile(paths["json_file"]):
        logger.debug(f"ion_synth split {split!r} under {root!r} is complete; skipping.")
        return paths["json_file"]
    if previous is not None:
        logger.warning(
            f"ion_synth split {split!r} under {root!r} was generated with {previous}; "
            f"generating it again with {expected}."
        )
    # Drawing all of a split takes seconds: start from an empty split directory rather than
    # reconciling what an earlier or interrupted generation left.
    shutil.rmtree(os.path.dirname(paths["marker"]), ignore_errors=True)
    for key in ("image_root", "sem_seg_root"):
        os.makedirs(paths[key])
    os.makedirs(os.path.dirname(paths["json_file"]), exist_ok=True)
    logger.info(
        f"Generating ion_synth split {split!r}: {num_images} images, seed {seed}, under {root!r}."
    )
    images, annotations = [], []
    for index in tqdm(range(num_images), desc=f"ion_synth {split}", unit="img"):
        sample = render.render_sample(split, seed, index, variant=spec.name)
        file_name = f"{index:06d}.png"
        _save_png(os.path.join(paths["image_root"], file_name), sample.image)
        _save_png(os.path.join(paths["sem_seg_root"], file_name), sample.label)
        height, width = sample.label.shape
        images.append({"id": index + 1, "file_name": file_name, "height": height, "width": width})
        annotations += _coco_annotations(sample, image_id=index + 1, first_id=len(annotations) + 1)
    coco = _coco_dict(split, seed, images, annotations, spec)
    with open(paths["json_file"], "w") as f:
        json.dump(coco, f)
    # Written last: a split without it (e.g. an interrupted one) is drawn again.
    with open(paths["marker"], "w") as f:
        json.dump(expected, f, sort_keys=True)
    logger.info(f"Wrote {len(images)} images, {len(annotations)} objects: {paths['json_file']}")
    return paths["json_file"]


def _coco_annotations(
    sample: SyntheticSample, *, image_id: int, first_id: int
) -> List[Dict[str, Any]]:
    annotations = []
    height, width = sample.label.shape
    for obj in sample.objects:
        rle = mask_util.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
        annotations.append(
            {
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": obj.category_id,
                "bbox": obj.bbox,
                "area": int(obj.mask.sum()),
                "iscrowd": 0,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
            }
        )
    return annotations


def _coco_dict(
    split: str,
    seed: int,
    images: List[Dict[str, Any]],
    annotations: List[Dict[str, Any]],
    spec: VariantSpec,
) -> Dict[str, Any]:
    return {
        "info": {
            "description": "ion_d2 synthetic context/scale detection dataset",
            "version": str(GENERATOR_VERSION),
            "split": split,
            "seed": seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {
                "id": i + 1,
                "name": name,
                "supercategory": "context" if name in spec.context_classes else "appearance",
            }
            for i, name in enumerate(spec.thing_classes)
        ],
    }


def _load_split(
    dataset_name: str, root: str, split: str, num_images: int, seed: int, variant: str
) -> List[Dict[str, Any]]:
    """Generate the split if needed, then load it as detectron2 dataset dicts."""
    json_file = generate_synthetic_dataset(
        root, split=split, num_images=num_images, seed=seed, variant=variant
    )
    paths = _paths(root, split, variant_spec(variant))
    dicts = load_coco_json(json_file, paths["image_root"], dataset_name=dataset_name)
    for d in dicts:
        d["sem_seg_file_name"] = os.path.join(
            paths["sem_seg_root"], os.path.basename(d["file_name"])
        )
    return dicts


def _default_root() -> str:
    # As detectron2's builtin datasets (detectron2/data/datasets/builtin.py).
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_ion_synthetic(
    root: Optional[str] = None,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = DEFAULT_SEED,
    name_prefix: Optional[str] = None,
    variant: str = "base",
) -> Tuple[str, str]:
    """
    Register the train and val splits as ``<name_prefix>_train`` and ``<name_prefix>_val``
    (by default :data:`TRAIN_DATASET_NAME` and :data:`VAL_DATASET_NAME`, or for the "local"
    variant :data:`LOCAL_TRAIN_DATASET_NAME` and :data:`LOCAL_VAL_DATASET_NAME`).

    Registration is lazy: the data is generated (:func:`generate_synthetic_dataset`, into
    :func:`split_dir_name`'s directory) the first time ``DatasetCatalog.get`` is called, then
    loaded with ``load_coco_json``; each dict also gets ``sem_seg_file_name``.

    Registering a name again with the same arguments does nothing; registering it with other
    arguments, or a name that something else registered, raises ``ValueError`` (remove it first
    with ``DatasetCatalog.remove`` and ``MetadataCatalog.remove``).

    Args:
        root (str or None): datasets root; None means ``$DETECTRON2_DATASETS`` or "datasets",
            like detectron2's builtin datasets.
        num_train (int): number of training images.
        num_val (int): number of validation images.
        seed (int): generator seed of both splits (their images differ: the split name is part
            of each image's seed).
        name_prefix (str or None): prefix of the registered names; None: the variant's
            directory name ("ion_synth" or "ion_synth_local").
        variant (str): "base" or "local" (see :func:`generate_synthetic_dataset`).

    Returns:
        tuple[str, str]: the registered train and val dataset names.
    """
    spec = variant_spec(variant)
    name_prefix = spec.directory if name_prefix is None else name_prefix
    root = _default_root() if root is None else root
    # Check both names before registering either, so that an error leaves nothing half done.
    to_register = []
    for split, num_images in (("train", num_train), ("val", num_val)):
        name = f"{name_prefix}_{split}"
        directory = split_dir_name(split, num_images, seed)
        _validate(directory, num_images, seed)
        params = {"root": root, **_marker_content(directory, num_images, seed, spec)}
        if not _is_registered(name, params):
            to_register.append((name, directory, num_images, params))
    for name, directory, num_images, params in to_register:
        DatasetCatalog.register(
            name,
            functools.partial(_load_split, name, root, directory, num_images, seed, spec.name),
        )
        MetadataCatalog.get(name).set(**_metadata(_paths(root, directory, spec), params, spec))
    return f"{name_prefix}_train", f"{name_prefix}_val"


def _is_registered(name: str, params: Dict[str, Any]) -> bool:
    """True if ``name`` is registered with ``params``; raises if registered otherwise."""
    previous = (
        MetadataCatalog.get(name).get("ion_synth_params")
        if name in MetadataCatalog.list()
        else None
    )
    if name in DatasetCatalog.list():
        if previous == params:
            logger.debug(f"Dataset {name!r} is already registered with the same arguments.")
            return True
        raise ValueError(
            f"Dataset {name!r} is already registered "
            + (f"with {previous}" if previous else "by something other than ion_d2")
            + f", not {params}. Pick another name_prefix, or call "
            f"DatasetCatalog.remove({name!r}) and MetadataCatalog.remove({name!r}) first."
        )
    if previous is not None and previous != params:
        raise ValueError(
            f"MetadataCatalog still holds metadata of {name!r} for {previous}, not {params}; "
            f"call MetadataCatalog.remove({name!r}) first."
        )
    return False


def _metadata(paths: Dict[str, str], params: Dict[str, Any], spec: VariantSpec) -> Dict[str, Any]:
    return dict(
        thing_classes=list(spec.thing_classes),
        thing_colors=[list(c) for c in spec.thing_colors],
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(spec.thing_classes))},
        stuff_classes=list(spec.sem_seg_classes),
        stuff_colors=[list(c) for c in spec.sem_seg_colors],
        num_sem_seg_classes=len(spec.sem_seg_classes),
        context_classes=list(spec.context_classes),
        context_pairs=[list(p) for p in spec.context_pairs],
        json_file=paths["json_file"],
        image_root=paths["image_root"],
        sem_seg_root=paths["sem_seg_root"],
        evaluator_type="coco",
        ignore_label=IGNORE_LABEL,
        ion_synth_params=params,
    )
