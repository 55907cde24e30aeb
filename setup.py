#!/usr/bin/env python
"""ion_d2: Inside-Outside Net (ION) for Detectron2.

detectron2 itself is not listed in install_requires: it is not on PyPI under its own name.
`make setup` (tools/bootstrap/setup_env.sh) installs it; see README.md.

OpenCV: the plain, contrib and GUI wheels of OpenCV all install the same `cv2` package, so an
environment must hold exactly one of them (two overwrite each other's files, and removing
either breaks `cv2`). A pip extra cannot swap one for another, so the environment variable
ION_D2_OPENCV picks the one ion_d2 requires:
  headless (default)  opencv-python-headless
  contrib             opencv-contrib-python-headless: the same plus cv2.ximgproc, which
                      tools/selective_search_proposals.py needs (`make setup` uses it)
  none                require none: keep the cv2 you installed yourself (e.g. a CUDA build)
"""

import os

from setuptools import find_packages, setup


def get_version() -> str:
    """ion_d2/__init__.py's ``__version__``, read as text (importing ion_d2 needs torch), as
    Detectron2's setup.py reads its own."""
    init_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ion_d2", "__init__.py")
    with open(init_py) as f:
        lines = [line for line in f if line.startswith("__version__")]
    if len(lines) != 1:
        raise ValueError(f"{init_py} has {len(lines)} lines starting with __version__; expected 1")
    return lines[0].split("=")[-1].strip().strip("'\"")


# Headless: ion_d2 never opens a window, and the GUI build needs libGL / X libraries that servers
# and CI machines lack.
OPENCV_WHEELS = {
    "headless": ["opencv-python-headless"],
    "contrib": ["opencv-contrib-python-headless"],
    "none": [],
}
opencv_choice = os.environ.get("ION_D2_OPENCV") or "headless"
if opencv_choice not in OPENCV_WHEELS:
    raise ValueError(
        f"ION_D2_OPENCV={opencv_choice!r}; expected one of {sorted(OPENCV_WHEELS)} "
        "(see setup.py's docstring)."
    )

setup(
    name="ion_d2",
    version=get_version(),
    description="Inside-Outside Net (Bell et al., CVPR 2016) as a Detectron2 plugin",
    packages=find_packages(include=["ion_d2", "ion_d2.*"]),
    python_requires=">=3.8",
    # Exactly what the ion_d2 package imports. detectron2 brings the rest of what the tools use
    # (torchvision, matplotlib for tools/run_demo.py and its Visualizer).
    install_requires=[
        "torch>=1.8",
        "fvcore",
        "numpy",
        "Pillow",
        "PyYAML",
        "pycocotools>=2.0.2",
        # Progress bars of the dataset generator and of selective search.
        "tqdm",
        # Imported lazily: ion_d2.data.voc_semseg reads SBD's MATLAB label files with
        # scipy.io.loadmat (tools/voc_to_semseg.py).
        "scipy",
        # Imported lazily, by selective search (the contrib wheel); tools/predict.py and
        # tools/run_demo.py read and write images with it.
        *OPENCV_WHEELS[opencv_choice],
    ],
    extras_require={"test": ["pytest"]},
)
