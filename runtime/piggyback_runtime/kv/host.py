"""Host-KV bookkeeping for requests on the CPU attention path: blocks in host DRAM and buffer slots.

Pure Python: the planner reserves here at admission, the runtime's piggyback path (or the simulator's model
of it) frees here when a request is done. Each request on the path owns one slot (its row in the shared
q/k/v/out buffers) and host KV blocks for its whole length, reserved up front so decode never runs out.
"""

from __future__ import annotations

from piggyback_runtime.kv.allocator import BlockAllocator


class HostKV:
    def __init__(self, num_blocks: int, block_size: int, max_requests: int) -> None:
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        self.max_requests = max_requests
        self.free_slots: list[int] = list(range(max_requests - 1, -1, -1))
        # Bumped on every release, so a late completion for a slot's previous owner is recognised as stale.
        self.generation = [0] * max_requests
        self.slot_of: dict[str, int] = {}  # request id -> slot, from reservation to release

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.block_size

    def reserve(self, request_id: str, num_tokens: int) -> bool:
        """Reserve blocks for `num_tokens` and a slot; False (nothing taken) while either is exhausted."""
        if not self.free_slots or not self.hold_blocks(request_id, num_tokens):
            return False
        self.slot_of[request_id] = self.free_slots.pop()
        return True

    def hold_blocks(self, request_id: str, num_tokens: int) -> bool:
        """Blocks for `num_tokens` (those it holds count), no slot taken; False (nothing taken) while they do not
        fit. `reserve` takes them with a slot; a row that released its blocks (`release_blocks`) takes them
        again here for a new prefill, in the slot it kept."""
        if not self.allocator.can_hold(request_id, num_tokens):
            return False
        self.allocator.ensure(request_id, num_tokens)
        return True

    def blocks_of(self, request_id: str) -> list[int]:
        return self.allocator.blocks_of(request_id)

    def release_blocks(self, request_id: str) -> int:
        """Free the request's blocks but keep its slot (its row in the shared buffers): a remote node's row, once
        its staged KV has been shipped to the node, holds no host KV. The number of blocks freed."""
        return self.allocator.free(request_id)

    def free(self, request_id: str) -> None:
        self.allocator.free(request_id)
        slot = self.slot_of.pop(request_id, None)
        if slot is not None:
            self.generation[slot] += 1
            self.free_slots.append(slot)

    def usage(self) -> float:
        return self.allocator.usage()
