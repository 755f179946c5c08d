"""Settings shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread per test process: the test machines' cores are shared, and extra threads only
    oversubscribe them. Tests that spawn processes pass `torch.get_num_threads()` on, so results stay bit-identical."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
