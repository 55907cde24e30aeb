import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Two cores on CI: keep torch from oversubscribing them.
    torch.set_num_threads(2)
    logging.getLogger("fvcore").setLevel(logging.WARNING)
