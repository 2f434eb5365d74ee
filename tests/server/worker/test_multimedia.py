"""The frame budget of a question about several videos, split across them."""

from __future__ import annotations

import pytest

from server.worker.multimedia import allocate


@pytest.mark.parametrize(("keep", "counts", "expected"), [
    (100, [30, 20], [30, 20]),  # everything fits
    (10, [60, 40], [6, 4]),  # in proportion to the frames each has
    (3, [100, 1, 1], [1, 1, 1]),  # every video keeps one
    (11, [5, 5, 5], [4, 4, 3]),  # the remainder goes to the largest fractions
    (7, [100, 2], [6, 1]),
    (10, [20, 1, 1], [8, 1, 1]),  # the floor of one each comes out of the largest share
    (30, [40, 1], [29, 1]),  # never more than a video has
])
def test_allocate(keep: int, counts: list[int], expected: list[int]) -> None:
    shares = allocate(keep, counts)
    assert shares == expected
    assert all(1 <= s <= c for s, c in zip(shares, counts))
