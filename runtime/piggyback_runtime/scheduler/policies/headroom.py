"""`headroom`: Llumnix-style, BE on the accelerator within a reserved share of KV memory."""

from __future__ import annotations

from piggyback_runtime.scheduler.policies.base import Policy


class HeadroomPolicy(Policy):
    """Llumnix-style: BE on the accelerator within `engine.headroom_be_kv_share` of its KV blocks."""

    name = "headroom"
    listing_rank = 30

    def be_kv_block_limit(self, num_blocks: int) -> int | None:
        return int(self.headroom_be_kv_share * num_blocks)
