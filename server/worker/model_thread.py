"""All model work of a process on one thread, in small steps.

Every running request submits its steps here (one chunk of frames, one prefill, one batched
decode step), and the executor's FIFO order interleaves them: a long extraction never holds up
questions about cached videos for more than one chunk, and the batched decoder's state is only
ever touched from this one thread, so it needs no lock. Everything else (cache, registry,
events) stays async on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ModelThread:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llamavid-model")

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
