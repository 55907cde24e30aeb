"""Test- and train-time resizing for configs that keep images at their own size."""

from typing import List

from detectron2.data import transforms as T
from PIL import Image

__all__ = ["ResizeLongestEdgeCap", "cap_unresized_images"]


class ResizeLongestEdgeCap(T.Augmentation):
    """
    Keep an image at its own size unless its longer edge exceeds ``max_size``; then scale it
    down, keeping the aspect ratio, so that the longer edge is ``max_size``.

    Detectron2's :class:`ResizeShortestEdge` with a shortest edge of 0 (``MIN_SIZE_TRAIN: (0,)``
    or ``MIN_SIZE_TEST: 0``, "no resizing") skips resizing entirely and ignores ``max_size``.
    """

    def __init__(self, max_size: int, interp=Image.BILINEAR):
        super().__init__()
        if max_size <= 0:
            raise ValueError(f"ResizeLongestEdgeCap needs max_size > 0; got {max_size}.")
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        if max(h, w) <= self.max_size:
            return T.NoOpTransform()
        scale = self.max_size / max(h, w)
        newh, neww = int(h * scale + 0.5), int(w * scale + 0.5)
        return T.ResizeTransform(h, w, newh, neww, self.interp)


def cap_unresized_images(augmentations: List[T.Augmentation]) -> List[T.Augmentation]:
    """
    Replace each :class:`ResizeShortestEdge` whose only shortest edge is 0 (it would never
    resize) by :class:`ResizeLongestEdgeCap` with its ``max_size``
    (``INPUT.MAX_SIZE_TRAIN/TEST``): images keep their size up to that cap.
    """
    return [
        (
            ResizeLongestEdgeCap(a.max_size, a.interp)
            if isinstance(a, T.ResizeShortestEdge) and all(s == 0 for s in a.short_edge_length)
            else a
        )
        for a in augmentations
    ]
