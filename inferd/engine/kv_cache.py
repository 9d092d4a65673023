"""Paged KV cache: a pool of fixed-size blocks and each request's block table.

The cache tensors live with the model runner; this module only hands out block
ids. A request owns `ceil(num_tokens_in_cache / block_size)` blocks, appended as
it grows; freeing returns them to the pool at once (abort, finish, preemption).
"""

from __future__ import annotations

from collections import deque

from inferd.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("KV cache budget is too small for a single block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_ids))

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Give `req` room for `num_new_tokens` more tokens; False if the pool is short."""
        need = self.blocks_needed(req, num_new_tokens)
        if need > len(self._free):
            return False
        req.block_ids.extend(self._free.popleft() for _ in range(need))
        return True

    def free(self, req: Request) -> None:
        self._free.extend(req.block_ids)
        req.block_ids = []
