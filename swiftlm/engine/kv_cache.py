"""Block allocator for the paged KV cache. Block 0 is reserved as a scratch block that padded rows write into."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockAllocator:
    """A free list of fixed-size blocks. Blocks are handed out lowest-first so a fresh cache stays compact."""

    NULL_BLOCK = 0

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, 0, -1))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, have: int, num_tokens: int) -> int:
        """Extra blocks for a table of `have` blocks to hold `num_tokens` tokens."""
        return max(0, cdiv(num_tokens, self.block_size) - have)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"out of KV blocks: asked {n}, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
