#!/usr/bin/env python
"""ion_d2: Inside-Outside Net (ION) for Detectron2.

detectron2 itself is not listed in install_requires: it is not on PyPI under its own name.
`make setup` (tools/setup_env.sh) installs it; see README.md.
"""

from setuptools import find_packages, setup

setup(
    name="ion_d2",
    version="0.1.0",
    description="Inside-Outside Net (Bell et al., CVPR 2016) as a Detectron2 plugin",
    packages=find_packages(include=["ion_d2", "ion_d2.*"]),
    python_requires=">=3.8",
    install_requires=[
        "torch>=1.8",
        "torchvision",
        "fvcore",
        "pycocotools>=2.0.2",
        # Headless: ion_d2 never opens a window, and the GUI build needs libGL / X libraries
        # that servers and CI machines lack.
        "opencv-python-headless",
        "numpy",
        # tools/voc_to_semseg.py reads SBD's MATLAB label files with scipy.io.loadmat.
        "scipy",
        # Progress bars of the data tools.
        "tqdm",
    ],
    extras_require={"test": ["pytest"]},
)
