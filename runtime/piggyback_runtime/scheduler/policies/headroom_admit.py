"""`headroom-admit`: `headroom` with the planner's LS admission control and SLO-sized BE share (a fair baseline)."""

from __future__ import annotations

from piggyback_runtime.scheduler.policies.base import Policy


class HeadroomAdmitPolicy(Policy):
    """Llumnix-style BE on the accelerator within `engine.headroom_be_kv_share` of its KV blocks, with the same
    latency-model LS admission, BE prefill share and token budget as `hybrid`: what admission alone is worth,
    without CPU attention or hybrid placement."""

    name = "headroom-admit"
    listing_rank = 35
    slo_controlled = True

    def be_kv_block_limit(self, num_blocks: int) -> int | None:
        return int(self.headroom_be_kv_share * num_blocks)
