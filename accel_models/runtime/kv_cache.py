"""Paged KV-cache bookkeeping: a block allocator and the per-request block tables.

The cache tensors themselves are allocated by the backend's ``allocate_kv_cache`` op (through the model
runner) and are opaque here: this module only hands out block numbers. Token ``i`` of a request lives in
slot ``block_table[i // block_size] * block_size + i % block_size``.
"""

from __future__ import annotations

from collections.abc import Iterable


class CacheFullError(RuntimeError):
    """No free blocks are left (the scheduler preempts a request or reports this per request)."""


class BlockAllocator:
    """A free list of ``num_blocks`` block numbers. Allocation is O(n) in the blocks handed out."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        # Pop from the end: low block numbers are handed out first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise CacheFullError(f"{n} blocks requested, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated (double free?)")
            self._used.remove(b)
            self._free.append(b)


class KVCacheManager:
    """Block tables of the live requests over one :class:`BlockAllocator` (all layers share block numbers)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_hold(self, request_id: str, num_tokens: int) -> bool:
        have = len(self.block_tables.get(request_id, ()))
        return self.blocks_needed(num_tokens) - have <= self.allocator.num_free

    def allocate_slots(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's block table to hold ``num_tokens`` tokens; raises CacheFullError (nothing
        allocated) if there are not enough free blocks."""
        table = self.block_tables.setdefault(request_id, [])
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra > 0:
            table.extend(self.allocator.allocate(extra))
        return table

    def free(self, request_id: str) -> None:
        table = self.block_tables.pop(request_id, None)
        if table:
            self.allocator.free(table)
