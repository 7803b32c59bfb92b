"""Fixed-size KV blocks of one virtual engine's region, with prefix caching.

A full block is named by a hash chain: its parent block's key, its own token ids and the
request's cache salt (anything else that changes the KV). Blocks are reference counted:
sequences with the same prefix share its blocks read-only. A block whose last user is
gone keeps its KV and its key, and is evicted (least recently freed first) only when a
block is needed and no never-cached one is left.

A block is keyed when a microbatch that computes its last token is *scheduled*, not when
it returns: a later microbatch of this VE that reads it runs after that one on every
stage (stages keep submission order), so the KV is there before it is read, even for
chunks still in flight. A failed microbatch's blocks are un-keyed (`uncache`).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from asyncpp.engine.sequence import Sequence

BlockKey = tuple[int, tuple[int, ...], str | None]  # (hash of parent's key, token ids, salt)


@dataclass(slots=True)
class PrefixCacheCounters:
    queries: int = 0  # prompt tokens looked up (at each admission)
    hits: int = 0  # of those, tokens found cached


class BlockHolder(Protocol):
    """What allocation reads of a sequence: a Sequence, or a draft model's view of one."""
    block_table: list[int]
    num_offered_blocks: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.counters = PrefixCacheCounters()
        self._free = list(range(num_blocks - 1, -1, -1))  # never keyed (or un-keyed); a stack, low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # keyed, unused; least recently freed first
        self._refs = [0] * num_blocks
        self._key_of: list[BlockKey | None] = [None] * num_blocks
        self._cached: dict[BlockKey, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take (cached-but-unused ones included)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_free(self) -> int:
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation ---------------------------------------------------------------------
    def allocate(self, seq: BlockHolder, num_tokens: int) -> bool:
        """Grow seq's block table to cover num_tokens; False (and nothing taken) if short."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing <= 0:
            return True
        if missing > self.num_free:
            return False
        seq.block_table.extend(self._take_fresh() for _ in range(missing))
        return True

    def _take_fresh(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._forget_key(block)
        self._refs[block] = 1
        return block

    def free(self, seq: BlockHolder) -> None:
        """Drop seq's blocks; the tail goes first, so it is evicted before the shared head."""
        self._release(reversed(seq.block_table))
        seq.block_table = []
        seq.num_offered_blocks = 0

    def truncate(self, seq: BlockHolder, num_tokens: int) -> None:
        """Roll seq's block table back to cover `num_tokens` (speculative decoding: the blocks
        taken only for rejected proposals). Those blocks were never keyed: keys follow
        `num_scheduled`, which never counts a proposal."""
        keep = self.blocks_for(num_tokens)
        if keep >= len(seq.block_table):
            return
        assert keep >= seq.num_offered_blocks, "a keyed block holds rejected tokens"
        self._release(reversed(seq.block_table[keep:]))
        del seq.block_table[keep:]

    def _release(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._key_of[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None

    # -- prefix caching -----------------------------------------------------------------
    def take_cached_prefix(self, seq: Sequence) -> int:
        """Give a sequence with nothing scheduled the longest cached prefix of its tokens;
        returns how many tokens it covers. At least the last token is left to compute, so
        the sequence has logits to sample from."""
        assert not seq.block_table and seq.num_scheduled == 0
        blocks = self.match(self.keys(seq, (seq.num_tokens - 1) // self.block_size))
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        seq.block_table = blocks
        seq.num_offered_blocks = len(blocks)
        return len(blocks) * self.block_size

    def count_lookup(self, seq: Sequence, hit_tokens: int) -> None:
        if not self.enable_caching:
            return
        self.counters.queries += seq.num_tokens
        self.counters.hits += hit_tokens

    def match(self, keys: list[BlockKey]) -> list[int]:
        """Cached blocks of the longest prefix of `keys` (nothing taken)."""
        blocks = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Key seq's blocks that `num_tokens` fills (see the module docstring on when)."""
        full = num_tokens // self.block_size
        if not self.enable_caching or full <= seq.num_offered_blocks:
            return
        keys = self.keys(seq, full)
        for i in range(seq.num_offered_blocks, full):  # only the blocks filled since the last call
            block, key = seq.block_table[i], keys[i]
            if self._key_of[block] is None and key not in self._cached:
                self._key_of[block] = key
                self._cached[key] = block
        seq.num_offered_blocks = full

    def keys(self, seq: Sequence, num_blocks: int) -> list[BlockKey]:
        """Keys of seq's first `num_blocks` full blocks (memoized on the sequence: its
        tokens never change once a block is full)."""
        if not self.enable_caching:
            return []
        keys, size, salt = seq.block_keys, self.block_size, seq.request.cache_salt
        while len(keys) < num_blocks:
            i = len(keys)
            parent = hash(keys[-1]) if keys else 0
            keys.append((parent, tuple(seq.tokens(i * size, (i + 1) * size)), salt))
        return keys if len(keys) == num_blocks else keys[:num_blocks]

    def written_by(self, seq: Sequence, epoch: int, block_table: list[int], start: int, end: int) -> set[int]:
        """The blocks whose KV a microbatch computing seq's tokens [start, end) wrote, as
        they stand now: all of them while seq still holds them (same epoch, not finished);
        after an abort or preemption freed them, only those still keyed as seq keyed them
        (another's block_table may hold one again, reallocated and rewritten by it)."""
        size = self.block_size
        written = range(start // size, -(-end // size))
        if not seq.finished and seq.epoch == epoch:
            return {block_table[i] for i in written}
        return {block_table[i] for i in written
                if i < len(seq.block_keys) and self._key_of[block_table[i]] == seq.block_keys[i]}

    def uncache(self, blocks: set[int]) -> None:
        """Un-key these blocks (their KV may be wrong): no new sequence will share them."""
        for block in blocks:
            if self._key_of[block] is not None:
                self._forget_key(block)
                if block in self._evictable:
                    del self._evictable[block]
                    self._free.append(block)

    def reset_cache(self) -> int:
        """Un-key every block; returns how many cached, unused blocks that freed."""
        freed = len(self._evictable)
        self.uncache(set(self._cached.values()))
        return freed

    def _forget_key(self, block: int) -> None:
        key = self._key_of[block]
        self._key_of[block] = None
        if key is not None and self._cached.get(key) == block:
            del self._cached[key]
