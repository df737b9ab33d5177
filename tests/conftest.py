"""Shared fixtures: small policies and batches (everything made here; nothing is downloaded)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # Tests run on 2-core CI machines; leave intra-op threading at torch's default but keep it stable.
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
