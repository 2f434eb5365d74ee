"""A paged KV cache: fixed-size blocks of positions shared by every request, sized by the memory plan.

Each request owns a list of blocks (its block table) that grows as it generates and is freed when
it ends, so how many requests run at once is bounded by the positions they hold, not by slots x
capacity. Storage is token-major per layer, ``[blocks * block_size, kv_heads, head_dim]``, so the
positions a forward writes and reads are two index tensors, computed once per forward and shared
by all layers (``PagedCache.plan``). Attention reads each request's positions gathered from its
blocks, left-padded to the longest with block 0 (kept at zero, never handed out) and masked, and
runs the model's own attention (SDPA) on them. Behind transformers' ``Cache`` interface, so
``LlamaForCausalLM`` runs unchanged.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

PADDING_BLOCK = 0


class BlockPool:
    """Every layer's keys and values, preallocated, and the free list of their blocks."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (one is padding), got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, kv_heads, head_dim)
        # empty, not zeros: untouched pages of a CPU pool are never committed; only block 0 is read unwritten
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for tensor in (*self.keys, *self.values):
            tensor[:block_size].zero_()
        self._free = list(range(num_blocks - 1, PADDING_BLOCK, -1))  # a stack: freed blocks are reused first
        # holders per block: the n choices of one request share their prompt's full blocks
        self._holders = [0] * num_blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        return 1.0 - self.free_blocks / self.usable_blocks

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"{count} KV blocks asked for, {len(self._free)} free")
        taken, self._free = self._free[len(self._free) - count :], self._free[: len(self._free) - count]
        for block in taken:
            self._holders[block] = 1
        return taken

    def share(self, blocks: list[int]) -> list[int]:
        """One more holder of ``blocks`` (full blocks, never written again): they are freed when the
        last holder releases them."""
        for block in blocks:
            self._holders[block] += 1
        return list(blocks)

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                self._free.append(block)

    def copy_block(self, source: int, target: int) -> None:
        """Every layer's keys and values of block ``source`` into block ``target``."""
        size = self.block_size
        for tensor in (*self.keys, *self.values):
            tensor[target * size : (target + 1) * size] = tensor[source * size : (source + 1) * size]

    def positions(self, table: list[int], start: int, stop: int) -> torch.Tensor:
        """Flat storage rows of positions ``start..stop-1`` of a sequence with block table ``table``."""
        index = torch.arange(start, stop)
        blocks = torch.tensor(table, dtype=torch.long)[index // self.block_size]
        return blocks * self.block_size + index % self.block_size


class _PagedLayer(CacheLayerMixin):
    is_compileable = False

    def __init__(self, owner: PagedCache, layer: int) -> None:
        super().__init__()
        self.owner, self.layer = owner, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the pool is allocated up front

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write this forward's keys/values [n, h, q, d] to their positions, return every position each
        row attends to, gathered: [n, h, kv_length, d]."""
        owner, pool = self.owner, self.owner.pool
        keys, values = pool.keys[self.layer], pool.values[self.layer]
        n, heads, q, dim = key_states.shape
        keys.index_copy_(0, owner.write, key_states.transpose(1, 2).reshape(n * q, heads, dim))
        values.index_copy_(0, owner.write, value_states.transpose(1, 2).reshape(n * q, heads, dim))
        return keys[owner.read].transpose(1, 2), values[owner.read].transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_length, 0

    def get_seq_length(self) -> int:
        return self.owner.kv_length - self.owner.query_length

    def get_max_length(self) -> int:
        return -1


class PagedCache(Cache):
    """The ``past_key_values`` of one forward over a ``BlockPool``: ``plan`` says where it writes
    and reads."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.write = self.read = torch.empty(0, dtype=torch.long)
        self.kv_length = self.query_length = 0
        super().__init__(layers=[_PagedLayer(self, i) for i in range(len(pool.keys))])

    def plan(self, write: torch.Tensor, read: torch.Tensor, query_length: int) -> None:
        """``write``: [n * q] storage rows of the new positions; ``read``: [n, kv_length] rows each of the
        n sequences attends to, oldest first, left-padded with the zeroed padding block."""
        device = self.pool.keys[0].device
        self.write, self.read = write.to(device), read.to(device)
        self.kv_length, self.query_length = read.shape[1], query_length
