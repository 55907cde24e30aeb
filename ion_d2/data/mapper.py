"""ION's dataset mapper: Detectron2's DatasetMapper that checks its files and labels."""

from typing import Optional, Tuple

import numpy as np
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

from .file_check import UnreadableImage, eight_bit_problem
from .transforms import cap_unresized_images

__all__ = [
    "IONDatasetMapper",
    "InvalidSemSegLabel",
    "SemSegLabelCheck",
    "UnreadableImage",
    "check_sem_seg_label",
]


class InvalidSemSegLabel(ValueError):
    """A semantic label map that does not fit its image or the model's classes."""


def check_sem_seg_label(
    sem_seg: np.ndarray,
    image_size: Tuple[int, int],
    num_classes: Optional[int],
    ignore_value: int,
) -> None:
    """
    Args:
        sem_seg (ndarray): (H, W) label map, as DatasetMapper reads it (uint8).
        image_size (tuple[int, int]): (H, W) of its image.
        num_classes (int or None): labels must be in [0, num_classes) or ``ignore_value``;
            None checks only the size.
        ignore_value (int): the label of unlabelled pixels.

    Raises:
        InvalidSemSegLabel: naming the bad size or values and the config keys they must fit.
    """
    if tuple(sem_seg.shape[:2]) != tuple(image_size):
        raise InvalidSemSegLabel(
            f"the label map is {sem_seg.shape[0]}x{sem_seg.shape[1]} (HxW) but its image is "
            f"{image_size[0]}x{image_size[1]}; each label map must have its image's size."
        )
    if num_classes is None:
        return
    # One max() is enough for the common case; find the offending values only when needed.
    if sem_seg.min() >= 0 and sem_seg.max() < num_classes:
        return
    bad = (sem_seg < 0) | ((sem_seg >= num_classes) & (sem_seg != ignore_value))
    if bad.any():
        values = np.unique(sem_seg[bad])
        raise InvalidSemSegLabel(
            f"the label map holds values {values[:10].tolist()}"
            + (f" (and {len(values) - 10} more)" if len(values) > 10 else "")
            + f"; labels must be in [0, {num_classes}) (MODEL.SEM_SEG_HEAD.NUM_CLASSES = "
            f"{num_classes}) or {ignore_value} (MODEL.SEM_SEG_HEAD.IGNORE_VALUE)."
        )


class SemSegLabelCheck(T.Augmentation):
    """
    An augmentation that transforms nothing and runs :func:`check_sem_seg_label` on the image
    and label map it is given. First in :class:`IONDatasetMapper`'s list, it sees both as read
    from disk, before any transform.
    """

    def __init__(self, num_classes: Optional[int], ignore_value: int):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_value = ignore_value

    def get_transform(self, image, sem_seg):
        if sem_seg is not None:
            check_sem_seg_label(sem_seg, image.shape[:2], self.num_classes, self.ignore_value)
        return T.NoOpTransform()


class IONDatasetMapper(DatasetMapper):
    """
    :class:`DatasetMapper` whose augmentations (the config's, through
    :func:`cap_unresized_images`: "no resizing" still caps the longer edge) are preceded by
    :class:`SemSegLabelCheck`: a label map of another size than its image, or (in training,
    with ``MODEL.ION.SEG_LOSS_ON``) with values outside ``[0, NUM_CLASSES)`` and not
    ``IGNORE_VALUE``, raises :class:`InvalidSemSegLabel` naming the file. An image or label
    file that is not 8-bit (which ``read_image`` would clip to 0..255) or fails to decode
    raises :class:`UnreadableImage` naming it.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations,
        sem_seg_num_classes: Optional[int] = None,
        sem_seg_ignore_value: int = 255,
        **kwargs,
    ):
        """
        Args:
            is_train, augmentations, kwargs: see :class:`DatasetMapper`.
            sem_seg_num_classes (int or None): check label values against it; None checks
                only label sizes.
            sem_seg_ignore_value (int): the label of unlabelled pixels.
        """
        check = SemSegLabelCheck(sem_seg_num_classes, sem_seg_ignore_value)
        super().__init__(is_train, augmentations=[check, *augmentations], **kwargs)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = cap_unresized_images(ret["augmentations"])
        seg_on = is_train and cfg.MODEL.ION.SEG_LOSS_ON
        ret["sem_seg_num_classes"] = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES if seg_on else None
        ret["sem_seg_ignore_value"] = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        return ret

    def __call__(self, dataset_dict):
        """See :meth:`DatasetMapper.__call__`."""
        files = [dataset_dict["file_name"], dataset_dict.get("sem_seg_file_name")]
        files = [f for f in files if f is not None]
        try:
            for path in files:
                problem = eight_bit_problem(path)
                if problem is not None:
                    raise UnreadableImage(f"{path} cannot be read as an 8-bit image: {problem}.")
            return super().__call__(dataset_dict)
        except InvalidSemSegLabel as e:
            raise InvalidSemSegLabel(
                f"{dataset_dict.get('sem_seg_file_name')} (labels of "
                f"{dataset_dict.get('file_name')}): {e}"
            ) from None
        except UnreadableImage:
            raise
        except (OSError, SyntaxError) as e:
            raise UnreadableImage(f"{' or '.join(files)} cannot be read: {e}") from e
