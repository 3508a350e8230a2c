"""Paged KV-cache bookkeeping: a block allocator and the per-request block tables.

The cache tensors themselves are allocated by the backend's ``allocate_kv_cache`` op (through the model
runner) and are opaque here: this module only hands out block numbers. Token ``i`` of a request lives in
slot ``block_table[i // block_size] * block_size + i % block_size``.
"""

from __future__ import annotations

from collections import OrderedDict
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
    """Block tables of the live requests over one :class:`BlockAllocator` (all layers share block numbers).

    With ``enable_prefix_caching`` a full block whose keys and values were computed is kept, after its
    request frees it, under its **prefix key** ``(key id of the previous block, its block_size token ids)``
    (so a key names the whole token prefix up to the block's end, exactly: no hashing, no collisions). A new
    request whose prompt starts with cached full blocks takes them (shared, reference counted) instead of
    recomputing them (:meth:`match_prefix`); only full blocks are shared and a request always computes at
    least its last prompt token, so writes never touch a shared block. Cached blocks nobody holds are
    evicted least recently freed first when blocks run out; they count as free.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self._ref: dict[int, int] = {}  # block -> requests holding it
        self._cached: dict[tuple[int, tuple[int, ...]], int] = {}  # prefix key -> block
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # registered block -> its key
        self._id_of: dict[int, int] = {}  # registered block -> key id (the parent of the next block's key)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered blocks nobody holds, LRU first
        self._chain: dict[str, list[int]] = {}  # request -> key ids of its leading full, committed blocks
        self._next_id = 0
        #: prompt tokens looked up / found in the prefix cache (statistics)
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a cached prefix (held by requests or evictable)."""
        return len(self._key_of)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_hold(self, request_id: str, num_tokens: int) -> bool:
        have = len(self.block_tables.get(request_id, ()))
        return self.blocks_needed(num_tokens) - have <= self.num_free_blocks

    def _take(self, n: int) -> list[int]:
        """``n`` blocks: free ones first, then evicted cached ones (least recently freed first)."""
        if n > self.num_free_blocks:
            raise CacheFullError(f"{n} blocks requested, {self.num_free_blocks} free of {self.num_blocks}")
        direct = min(n, self.allocator.num_free)
        out = self.allocator.allocate(direct)
        for _ in range(n - direct):
            b, _ = self._evictable.popitem(last=False)
            key = self._key_of.pop(b)
            del self._id_of[b]
            if self._cached.get(key) == b:
                del self._cached[key]
            out.append(b)
        for b in out:
            self._ref[b] = 1
        return out

    def allocate_slots(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's block table to hold ``num_tokens`` tokens; raises CacheFullError (nothing
        allocated) if there are not enough free blocks."""
        table = self.block_tables.setdefault(request_id, [])
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra > 0:
            table.extend(self._take(extra))
        return table

    def match_prefix(self, request_id: str, token_ids: list[int], max_tokens: int) -> int:
        """Give a request without blocks the cached blocks its ``token_ids`` start with (at most
        ``max_tokens`` tokens, whole blocks); returns the number of tokens they hold (0 without caching)."""
        if not self.enable_prefix_caching or self.block_tables.get(request_id):
            return 0
        bs = self.block_size
        table = self.block_tables.setdefault(request_id, [])
        chain = self._chain.setdefault(request_id, [])
        parent = -1
        while (len(table) + 1) * bs <= max_tokens:
            i = len(table)
            b = self._cached.get((parent, tuple(token_ids[i * bs : (i + 1) * bs])))
            if b is None:
                break
            if b in self._evictable:
                del self._evictable[b]
            self._ref[b] = self._ref.get(b, 0) + 1
            table.append(b)
            parent = self._id_of[b]
            chain.append(parent)
        self.prefix_query_tokens += max(0, max_tokens)
        self.prefix_hit_tokens += len(table) * bs
        return len(table) * bs

    def commit(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Record that the first ``num_computed`` tokens' keys and values are in the request's blocks: its
        newly full blocks become cached prefixes (a prefix another block already holds is left alone)."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables.get(request_id)
        if not table:
            return
        chain = self._chain.setdefault(request_id, [])
        bs = self.block_size
        full = min(num_computed // bs, len(table))
        while len(chain) < full:
            i = len(chain)
            key = (chain[-1] if chain else -1, tuple(token_ids[i * bs : (i + 1) * bs]))
            holder = self._cached.get(key)
            if holder is None:
                b = table[i]
                self._cached[key] = b
                self._key_of[b] = key
                self._id_of[b] = self._next_id
                self._next_id += 1
                holder = b
            chain.append(self._id_of[holder])

    def free(self, request_id: str) -> None:
        table = self.block_tables.pop(request_id, None)
        self._chain.pop(request_id, None)
        if not table:
            return
        plain = []
        for b in table:
            left = self._ref[b] - 1
            if left:
                self._ref[b] = left
                continue
            del self._ref[b]
            if b in self._key_of:  # keep its prefix for later requests until the block is needed
                self._evictable[b] = None
            else:
                plain.append(b)
        self.allocator.free(plain)
