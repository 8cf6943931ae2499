"""Per-rule tests run torch single-threaded: their tensors are tiny, and a 2-thread pool on a
loaded 2-core machine makes each float32 conv ~30x slower (thread hand-off, not arithmetic)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
