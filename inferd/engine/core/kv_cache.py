"""Paged KV cache bookkeeping, with automatic prefix caching.

The cache tensors live with the model runner; this module hands out block ids.
A request owns `ceil(num_computed_tokens / block_size)` blocks (its block table),
appended as it grows and released at once on finish, abort or preemption (and,
after a speculative step, the blocks past its accepted tokens). The
manager is the only writer of a request's block fields (`block_ids`,
`block_hashes`, `num_cached_blocks`) and never writes its progress: it says how
many tokens a cached prefix holds, and the scheduler counts them as computed.
A draft model's KV (engine/spec_decode/draft_model.py) lives in a pool of its own
indexed by the same block ids, so it is valid only while the request holds them:
the manager also cuts `num_draft_computed_tokens` when it takes blocks away.

Prefix caching: once a block is full, it is identified by a hash chained to its
parent block's hash (sha256 over the parent digest and the block's token ids),
so equal hashes mean equal prefixes. A block holding image tokens also hashes the
images they stand for (`ImagePrompt.block_key`): the same prompt with another image
shares no block past the image. Full blocks are registered in
`cached_blocks`; a new request walks its own block hashes and takes every leading
block that is already cached, by reference, skipping their computation (they
advance `num_computed_tokens` for free, which is all the scheduler needs to know).

A released block whose reference count drops to 0 stays cached but becomes
evictable: the free queue is ordered least recently used first, and a block is
only evicted (its hash forgotten) when it is handed out again. Blocks that hold
nothing cacheable go to the front of the queue so they are reused first, and a
request's blocks are queued tail first so its prefix outlives its suffix.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from inferd.engine.core.request import Request


def block_hash(parent: bytes | None, tokens: list[int] | tuple[int, ...], extra: bytes = b"") -> bytes:
    h = hashlib.sha256(parent or b"")
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    h.update(extra)
    return h.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("KV cache budget is too small for a single block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        # every block with ref_count 0, least recently used first (the values are unused)
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached_blocks: dict[bytes, int] = {}
        self.prefix_queries = 0   # prompt tokens looked up
        self.prefix_hits = 0      # of those, found in the cache

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any request (cached ones included: they are evictable)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def _hashes(self, req: Request, num_tokens: int) -> list[bytes]:
        """The request's chained block hashes for its first num_tokens // block_size blocks."""
        bs, hashes, n = self.block_size, req.block_hashes, num_tokens // self.block_size
        images = req.image_prompt
        while len(hashes) < n:
            i = len(hashes)
            extra = images.block_key(i * bs, (i + 1) * bs) if images is not None else b""
            hashes.append(block_hash(hashes[-1] if hashes else None, req.token_ids[i * bs:(i + 1) * bs], extra))
        return hashes[:n]

    def attach_cached_prefix(self, req: Request) -> int:
        """Give a request with nothing computed the cached blocks of its longest cached
        prefix; returns the number of tokens they hold, which the scheduler counts as computed."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt position computed
        # at least the last token is always computed, to get logits to sample from
        hashes = self._hashes(req, req.num_tokens - 1)
        self.prefix_queries += req.num_tokens
        hit: list[int] = []
        for h in hashes:
            block = self.cached_blocks.get(h)
            if block is None:
                break
            hit.append(block)
        for block in hit:
            self._ref(block)
        req.block_ids = hit
        req.num_cached_blocks = len(hit)
        self.prefix_hits += len(hit) * self.block_size
        return len(hit) * self.block_size

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_ids))

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Give `req` room for `num_new_tokens` more tokens; False if the pool is short."""
        need = self.blocks_needed(req, num_new_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self.ref_count[block] = 1
            req.block_ids.append(block)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's blocks that became full of computed tokens."""
        # most steps (decode) complete no block: skip the hash list entirely
        if not self.enable_prefix_caching or req.num_computed_tokens // self.block_size <= req.num_cached_blocks:
            return
        hashes = self._hashes(req, req.num_computed_tokens)
        for i in range(req.num_cached_blocks, len(hashes)):
            block, h = req.block_ids[i], hashes[i]
            # an equal block computed concurrently by another request keeps the entry;
            # this copy then simply holds no hash and is reused first when freed
            if h not in self.cached_blocks:
                self.cached_blocks[h] = block
                self.block_hash[block] = h
        req.num_cached_blocks = len(hashes)

    def release_tail(self, req: Request, num_tokens: int | None = None) -> None:
        """Give back the blocks past the request's first num_tokens (default: its computed tokens; the blocks
        past them held rejected draft tokens only, or were taken for drafts that did not come)."""
        if num_tokens is None:
            num_tokens = req.num_computed_tokens
        req.num_draft_computed_tokens = min(req.num_draft_computed_tokens, num_tokens)
        keep = -(-num_tokens // self.block_size)
        tail = req.block_ids[keep:]
        if tail:
            del req.block_ids[keep:]
            self._release(tail)

    def free(self, req: Request) -> None:
        self._release(req.block_ids)
        req.block_ids = []
        req.num_cached_blocks = 0
        req.num_draft_computed_tokens = 0

    def _release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self._free[block] = None
                if self.block_hash[block] is None:
                    self._free.move_to_end(block, last=False)

    def _ref(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self._free[block]
        self.ref_count[block] += 1

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            del self.cached_blocks[h]
            self.block_hash[block] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their contents)."""
        self.cached_blocks.clear()
        self.block_hash = [None] * self.num_blocks
