"""Reusable output memory for whole videos read from the cache.

Kept apart from the readers because it is about memory, not the network: any reader that fills a
large fresh tensor pays the same page faults.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Sequence

import numpy as np
import torch

_RECYCLE_MIN = 32 << 20  # smaller outputs come from torch's allocator (glibc reuses its heap)


class BufferRecycler:
    """Output buffers for whole videos, reused once the caller has dropped every tensor on them.

    Why: a fresh 434 MB tensor is written at ~1.4 GB/s on the benchmark host against ~7 GB/s for
    memory already mapped, the difference being one page fault per 4 KiB; reading a video into a
    fresh tensor lost half the wire's speed to faults. (Huge pages fault less but ran slower here.)
    Each buffer is a numpy array that only this recycler and the tensors made from it reference,
    so a reference count of one (ours) means no tensor is left and the memory can be reused.
    At most ``max_bytes`` are kept; 0 keeps none (every read allocates). Outputs under
    ``min_bytes`` come from torch's allocator, whose heap glibc reuses anyway.
    """

    def __init__(self, max_bytes: int, min_bytes: int = _RECYCLE_MIN) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """Bytes of buffers kept for reuse (in use by a caller or idle)."""
        with self._lock:
            return sum(buffer.nbytes for buffer in self._buffers)

    def _idle(self, index: int) -> bool:
        return sys.getrefcount(self._buffers[index]) == 2  # the list's reference and the argument's

    def _take(self, nbytes: int) -> np.ndarray | None:
        """An idle buffer of at least ``nbytes``, else a new one kept if it fits ``max_bytes``."""
        with self._lock:
            fitting = [i for i in range(len(self._buffers)) if self._buffers[i].nbytes >= nbytes and self._idle(i)]
            if fitting:
                return self._buffers[min(fitting, key=lambda i: self._buffers[i].nbytes)]
            if nbytes > self.max_bytes:
                return None
            for i in reversed(range(len(self._buffers))):  # make room by dropping idle buffers
                if sum(b.nbytes for b in self._buffers) + nbytes <= self.max_bytes:
                    break
                if self._idle(i):
                    del self._buffers[i]
            buffer = np.empty(nbytes, dtype=np.uint8)
            if sum(b.nbytes for b in self._buffers) + nbytes <= self.max_bytes:
                self._buffers.append(buffer)
            return buffer

    def empty(self, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised CPU float16 tensor of ``shape``, on recycled memory where possible."""
        nbytes = 2 * math.prod(shape)
        buffer = self._take(nbytes) if nbytes >= self.min_bytes else None
        if buffer is None:
            return torch.empty(list(shape), dtype=torch.float16)
        return torch.from_numpy(buffer[:nbytes]).view(torch.float16).view(list(shape))

    def clear(self) -> None:
        """Forget every buffer (those still in use stay valid: their tensors keep them alive)."""
        with self._lock:
            self._buffers.clear()
