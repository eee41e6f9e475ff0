"""tests/models: tiny models, where torch's intra-op threads cost more than they give (measured 10x slower with
2 threads on the 2-core CI machine under load), so these tests run single-threaded."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
