"""tests/model runs torch single-threaded.

The tiny models' ops are microseconds long, so a second intra-op thread adds only barrier waits;
on a shared CI box (two cores, other jobs running) those waits dominate: the suite took 144 s
with torch's default 2 threads and 16 s with 1 under the same load. Package-scoped, so other
test folders in the same session get torch's default back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def single_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
