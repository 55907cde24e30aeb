import logging

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Two cores on CI: keep torch from oversubscribing them.
    torch.set_num_threads(2)
    logging.getLogger("fvcore").setLevel(logging.WARNING)


@pytest.fixture
def registered():
    """``register(name, dicts, **metadata)``: a dataset of 6 classes, removed after the test."""
    names = []

    def register(name, dicts, **meta):
        DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
        MetadataCatalog.get(name).set(thing_classes=[str(i) for i in range(6)], **meta)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
