"""
What the dataset check reads from the files themselves, without decoding them: whether an image
file can be read as an 8-bit image (its header and its last bytes), and whether a COCO json's
images share ids.

Detectron2's ``read_image`` clips an image of more than 8 bits per channel to 0..255 (a 16-bit
grey PNG becomes all white) and stops on a truncated file with PIL's "image file is truncated",
naming no file; :func:`image_file_problem` finds both before training, and
:func:`eight_bit_problem` lets the mapper refuse the first before it reads the image.
"""

import json
import re
from typing import Any, Dict, List, Optional

from detectron2.utils.file_io import PathManager
from PIL import Image, ImageFile

__all__ = [
    "EIGHT_BIT_MODES",
    "UnreadableImage",
    "duplicate_coco_image_ids",
    "eight_bit_problem",
    "image_file_problem",
]

# PIL modes whose channels are 8-bit; detectron2's read_image converts them to RGB/BGR exactly.
# Others (16-bit "I;16", 32-bit "I", float "F") are clipped to 0..255 by that conversion.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")

_PNG = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_JPEG, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
# The header bytes read (a PNG's bit depth is byte 24) and the end bytes read (writers pad with
# zeros, which are stripped).
_HEAD, _TAIL = 32, 256


class UnreadableImage(OSError):
    """An image file that cannot be read as an 8-bit image."""


def _read_ends(path: str):
    with open(path, "rb") as f:
        head = f.read(_HEAD)
        size = f.seek(0, 2)
        f.seek(max(size - _TAIL, len(head)))
        return head, f.read().rstrip(b"\0")


def _header_problem(path: str, head: bytes) -> Optional[str]:
    if head.startswith(_PNG):
        # PIL opens a 16-bit RGB PNG as "RGB", keeping the high bytes; OpenCV and the predictor
        # (ion_d2.engine.predictor.read_image_file) see 16 bits.
        return "16-bit PNG" if len(head) > 24 and head[24] == 16 else None
    if head.startswith(_JPEG):
        return None  # PIL reads 8-bit JPEGs only ("L", "RGB", "CMYK")
    try:
        with Image.open(path) as image:
            mode = image.mode
    except (OSError, SyntaxError) as e:
        return f"not an image PIL can open: {e}"
    return None if mode in EIGHT_BIT_MODES else f"PIL mode {mode!r}, not 8-bit"


def eight_bit_problem(path: str) -> Optional[str]:
    """
    Why ``path`` is not an 8-bit image, from its header; None when it is (or is not an image
    at all, which decoding it tells).

    Raises:
        OSError: the file cannot be opened.
    """
    with open(path, "rb") as f:
        return _header_problem(path, f.read(_HEAD))


def _decode_problem(path: str) -> Optional[str]:
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError) as e:
        return f"truncated or corrupt: {e}"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return None


def image_file_problem(path: str) -> Optional[str]:
    """
    Why ``path`` cannot be read as an 8-bit image; None when it can. Reads the header (a PNG's
    bit depth, another format's PIL mode) and, for JPEG and PNG, the last bytes: a file that
    does not end with the format's end marker (JPEG's EOI, PNG's IEND chunk) is decoded once
    to tell a truncated file from one with trailing data. Other formats' ends are not checked.

    Raises:
        OSError: the file cannot be opened (e.g. it does not exist).
    """
    head, tail = _read_ends(path)
    problem = _header_problem(path, head)
    if problem is not None:
        return problem
    end = _PNG_END if head.startswith(_PNG) else _JPEG_END if head.startswith(_JPEG) else None
    if end is not None and not tail.endswith(end):
        return _decode_problem(path)
    return None


def _top_level_value(text: str, key: str) -> Any:
    # Decodes the object's values in order up to ``key``'s: COCO jsons list "images" before
    # "annotations", so most of the file is not decoded.
    decoder, space = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    pos = space.match(text).end()
    if text[pos : pos + 1] != "{":
        return None
    pos = space.match(text, pos + 1).end()
    while text[pos : pos + 1] == '"':
        name, pos = decoder.raw_decode(text, pos)
        pos = space.match(text, space.match(text, pos).end() + 1).end()  # past ":"
        value, pos = decoder.raw_decode(text, pos)
        if name == key:
            return value
        pos = space.match(text, pos).end()
        if text[pos : pos + 1] == ",":
            pos = space.match(text, pos + 1).end()
    return None


def duplicate_coco_image_ids(json_file: str) -> Dict[Any, List[str]]:
    """
    The image ids that several ``images`` entries of a COCO json share, each with those
    entries' ``file_name``s (pycocotools keeps the last entry of an id and gives it every
    entry's boxes). Decodes the file only up to its ``images``.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not JSON.
    """
    with PathManager.open(json_file, "r", encoding="utf-8") as f:
        images = _top_level_value(f.read(), "images") or []
    by_id: Dict[Any, List[str]] = {}
    for image in images:
        by_id.setdefault(image.get("id"), []).append(str(image.get("file_name")))
    return {i: names for i, names in by_id.items() if len(names) > 1}
