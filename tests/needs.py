"""What a test does when something it needs is absent: skip on a developer's machine, fail in CI.

``.ci/run`` exports ``CI=1``, so a green CI run cannot hide a missing Redis, parity case, browser
or tool. Only the GPU-only tests may skip there (CI has no accelerator).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def missing(message: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{message} (CI is set: nothing may skip for a missing fixture or service)")
    pytest.skip(message)
