"""Block allocator for a paged KV cache. Pure Python: the scheduler and the simulator use it without torch."""

from __future__ import annotations


def flat_slot(blocks: list[int], position: int, block_size: int) -> int:
    """Where token `position` of a block table lives in a paged cache: block * block_size + offset, the flat
    slot index every cache writer takes."""
    return blocks[position // block_size] * block_size + position % block_size


class OutOfBlocks(Exception):
    """Not enough free blocks; the scheduler preempts or waits, it never surfaces this to a client."""


class BlockAllocator:
    """Hands out fixed-size KV blocks; freed blocks are reused (LIFO, so recently used memory stays warm)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} × {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._owner_blocks: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_of(self, owner: str) -> list[int]:
        return self._owner_blocks.get(owner, [])

    def can_hold(self, owner: str, num_tokens: int) -> bool:
        return self.blocks_for_tokens(num_tokens) - len(self.blocks_of(owner)) <= len(self._free)

    def ensure(self, owner: str, num_tokens: int) -> list[int]:
        """Grow `owner`'s block table to hold `num_tokens` tokens; all or nothing."""
        blocks = self._owner_blocks.setdefault(owner, [])
        extra = self.blocks_for_tokens(num_tokens) - len(blocks)
        if extra > len(self._free):
            if not blocks:
                del self._owner_blocks[owner]
            raise OutOfBlocks(f"{owner} needs {extra} more blocks, {len(self._free)} free")
        for _ in range(extra):
            blocks.append(self._free.pop())
        return blocks

    def free(self, owner: str) -> int:
        blocks = self._owner_blocks.pop(owner, [])
        self._free.extend(reversed(blocks))
        return len(blocks)

    def owners(self) -> list[str]:
        return list(self._owner_blocks)
